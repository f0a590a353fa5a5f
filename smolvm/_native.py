"""Loads the C extension smolvm._smolvm on first use, so `import smolvm` works without it."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from ._paths import PACKAGE_DIR
from .errors import SmolVMError

_module: ModuleType | None = None


def native() -> ModuleType:
    """The smolvm._smolvm extension; SmolVMError with the fix if it was not built."""
    global _module
    if _module is None:
        try:
            from . import _smolvm  # type: ignore[attr-defined]
        except ImportError as e:
            raise SmolVMError(
                f"smolvm's C extension is not built in {PACKAGE_DIR} ({e}). "
                "Install the package with `pip install .` and run Python from outside the "
                "source checkout (or with `python3 -P`), or build it in place with "
                "`python3 setup.py build_ext --inplace`."
            ) from e
        _module = _smolvm
    return _module


def vmm_path() -> Path:
    """The smolvm-vmm executable: $SMOLVM_VMM, else the one installed inside the package."""
    override = os.environ.get("SMOLVM_VMM")
    path = Path(override) if override else PACKAGE_DIR / "smolvm-vmm"
    if not os.access(path, os.X_OK):
        raise SmolVMError(
            f"the VMM executable {path} is missing or not executable: reinstall smolvm "
            "(`pip install .` builds it), or point SMOLVM_VMM at a built smolvm-vmm"
        )
    return path

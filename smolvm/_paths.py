"""Where smolvm keeps its caches and VM state ($SMOLVM_HOME, default ~/.cache/smolvm)."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def home() -> Path:
    """The smolvm state directory; created on first use."""
    base = os.environ.get("SMOLVM_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "smolvm"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir(name: str) -> Path:
    """A data folder shipped with the package (kernel-config, guest) or next to it in a checkout."""
    for cand in (PACKAGE_DIR / "_data" / name, PACKAGE_DIR.parent / name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"smolvm data folder {name!r} not found next to {PACKAGE_DIR}; reinstall smolvm"
    )

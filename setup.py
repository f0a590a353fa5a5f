"""Builds smolvm: the _smolvm extension and the programs from csrc/ (smolvm/_binaries.py says which file goes where), plus package data.

SMOLVM_SANITIZE=1 builds both with ASan+UBSan; Python then needs
LD_PRELOAD=$(gcc -print-file-name=libasan.so) (scripts/test.sh does this).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_binaries() -> ModuleType:
    """smolvm/_binaries.py by path: the package itself is not importable before it is built."""
    spec = importlib.util.spec_from_file_location("_smolvm_binaries", ROOT / "smolvm" / "_binaries.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses looks the module up
    spec.loader.exec_module(mod)
    return mod


BIN = _load_binaries()
EXTENSION = "_smolvm"
PROGRAMS = [n for n, b in BIN.BINARIES.items() if not b.extension and not b.static]  # the agent: smolvm/build/agent.py
DATA_DIRS = ("csrc", "guest", "kernel-config")  # shipped as smolvm/_data/<name>
DATA_IGNORE = shutil.ignore_patterns("*.o", "*.a", "*.so", "__pycache__", "*.pyc", ".git*", "build")

CFLAGS = ["-std=gnu11", "-Wall", "-Wextra", "-Werror"]
SANITIZE_CFLAGS = [
    "-fsanitize=address,undefined",
    "-fno-omit-frame-pointer",
    "-fno-sanitize-recover=undefined",  # UB aborts, so tests notice it
]
SANITIZE_LDFLAGS = ["-fsanitize=address,undefined"]


def sanitize() -> bool:
    return os.environ.get("SMOLVM_SANITIZE", "").strip() not in ("", "0")


def cflags() -> list[str]:
    return CFLAGS + (SANITIZE_CFLAGS if sanitize() else [])


def ldflags() -> list[str]:
    return SANITIZE_LDFLAGS if sanitize() else []


def rel(paths: list[Path]) -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in paths]


class BuildExt(build_ext):
    """build_ext that also compiles and links smolvm-vmm into the package folder."""

    def finalize_options(self) -> None:
        super().finalize_options()
        # Always rebuild: objects left in build/ by a build with other flags (SMOLVM_SANITIZE) must not be reused.
        self.force = True

    def run(self) -> None:
        super().run()
        for name in PROGRAMS:
            self.build_program(name)

    def get_outputs(self) -> list[str]:
        programs = [os.path.join(self.build_lib, "smolvm", n) for n in PROGRAMS]
        return [*super().get_outputs(), *programs]

    def build_program(self, name: str) -> None:
        """Compile (in parallel) and link one executable into the package folder."""
        cc = self.compiler
        obj_dir = os.path.join(self.build_temp, name)
        deps = rel(BIN.headers(name, ROOT))
        incs = rel(BIN.include_dirs(name, ROOT))
        args = cflags()
        sources = rel(BIN.sources(name, ROOT))
        libraries = list(BIN.BINARIES[name].libraries)

        def compile_one(src: str) -> list[str]:
            return cc.compile([src], output_dir=obj_dir, include_dirs=incs, extra_postargs=args, depends=deps)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            objects = [o for objs in pool.map(compile_one, sources) for o in objs]
        out_dir = os.path.join(self.build_lib, "smolvm")
        os.makedirs(out_dir, exist_ok=True)
        cc.link_executable(objects, name, output_dir=out_dir, libraries=libraries, extra_postargs=ldflags())
        if self.inplace:  # `build_ext --inplace` / editable installs: next to the sources too
            shutil.copy2(os.path.join(out_dir, name), ROOT / "smolvm" / name)


class BuildPy(build_py):
    """build_py that ships csrc/, guest/ and kernel-config/ as smolvm/_data/ (see smolvm/_paths.py)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install finds them next to the package
        for name in DATA_DIRS:
            src = ROOT / name
            if not src.is_dir():
                continue
            dst = Path(self.build_lib) / "smolvm" / "_data" / name
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=DATA_IGNORE)


setup(
    ext_modules=[
        Extension(
            f"smolvm.{EXTENSION}",
            sources=rel(BIN.sources(EXTENSION, ROOT)),
            include_dirs=rel(BIN.include_dirs(EXTENSION, ROOT)),
            depends=rel(BIN.headers(EXTENSION, ROOT)),
            libraries=list(BIN.BINARIES[EXTENSION].libraries),
            extra_compile_args=cflags(),
            extra_link_args=ldflags(),
        )
    ],
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)

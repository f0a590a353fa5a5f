"""Builds smolvm: the _smolvm extension and the smolvm-vmm executable from csrc/, plus package data.

SMOLVM_SANITIZE=1 builds both with ASan+UBSan; Python then needs
LD_PRELOAD=$(gcc -print-file-name=libasan.so) (scripts/test.sh does this).
"""

from __future__ import annotations

import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
EXT_SOURCES = ["csrc/module.c", "csrc/exec_client.c", "csrc/file_client.c"]
VMM_MAIN = "csrc/vmm_main.c"
VMM_NAME = "smolvm-vmm"
# The nested profile's two programs (csrc/nested/, not part of the VMM): name -> sources.
NESTED_PROGRAMS = {
    "smolvm-hostd": ["csrc/nested/hostd.c", "csrc/nested/wire.c"],
    "smolvm-vmm-relay": ["csrc/nested/relay.c", "csrc/nested/wire.c"],
}
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


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def vmm_sources() -> list[str]:
    """Every csrc/**/*.c except the extension's own files and csrc/nested/."""
    return sorted(
        rel(p) for p in (ROOT / "csrc").rglob("*.c")
        if rel(p) not in EXT_SOURCES and not rel(p).startswith("csrc/nested/")
    )


def headers() -> list[str]:
    return sorted(rel(p) for p in (ROOT / "csrc").rglob("*.h"))


class BuildExt(build_ext):
    """build_ext that also compiles and links smolvm-vmm into the package folder."""

    def finalize_options(self) -> None:
        super().finalize_options()
        # Always rebuild: objects left in build/ by a build with other flags (SMOLVM_SANITIZE) must not be reused.
        self.force = True

    def run(self) -> None:
        super().run()
        sources = vmm_sources()
        if VMM_MAIN in sources:
            self.build_program(VMM_NAME, sources, ["uring", "pthread"])
        else:
            print(f"warning: {VMM_MAIN} not found: {VMM_NAME} is not built", file=sys.stderr)
        for name, nested_sources in NESTED_PROGRAMS.items():
            self.build_program(name, nested_sources, [])

    def get_outputs(self) -> list[str]:
        programs = [os.path.join(self.build_lib, "smolvm", n) for n in (VMM_NAME, *NESTED_PROGRAMS)]
        return [*super().get_outputs(), *programs]

    def build_program(self, name: str, sources: list[str], libraries: list[str]) -> None:
        """Compile (in parallel) and link one executable into the package folder."""
        cc = self.compiler
        obj_dir = os.path.join(self.build_temp, name)
        deps = headers()
        args = cflags()

        def compile_one(src: str) -> list[str]:
            return cc.compile([src], output_dir=obj_dir, include_dirs=["csrc"], extra_postargs=args, depends=deps)

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
            "smolvm._smolvm",
            sources=EXT_SOURCES,
            include_dirs=["csrc"],
            depends=headers(),
            libraries=["uring"],
            extra_compile_args=cflags(),
            extra_link_args=ldflags(),
        )
    ],
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)

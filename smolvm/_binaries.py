"""Which C files make which binary: the one place that says it.

A binary is a folder and its main file: it is built from every ``.c`` file below that folder
except the main files of the folder's other binaries. A new source file therefore joins the
binary of the folder it is put in, and cannot land in another. setup.py (loading this file by
path, before the package is importable), the guest agent's builder and the C tests all read it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Binary:
    folder: str  # relative to the source root (the repository, or smolvm/_data when installed)
    main: str  # relative to folder
    libraries: tuple[str, ...] = ()
    extension: bool = False  # a CPython extension module rather than an executable
    static: bool = False  # the guest agent: one static executable, nothing from the host at run time
    include: tuple[str, ...] = field(default=("csrc",))  # besides folder itself; csrc has proto.h


BINARIES: dict[str, Binary] = {
    "smolvm-vmm": Binary("csrc/vmm", "main.c", ("uring", "seccomp", "pthread")),
    "_smolvm": Binary("csrc/client", "module.c", ("uring",), extension=True),
    "smolvm-hostd": Binary("csrc/nested", "hostd.c"),
    "smolvm-vmm-relay": Binary("csrc/nested", "relay.c"),
    "smolvm-agent": Binary("guest/agent", "main.c", static=True),
}


def _mains_beside(name: str) -> set[str]:
    me = BINARIES[name]
    return {b.main for n, b in BINARIES.items() if n != name and b.folder == me.folder}


def sources(name: str, root: Path) -> list[Path]:
    """Every C file of binary name under root, its main file first."""
    b = BINARIES[name]
    folder = root / b.folder
    skip = _mains_beside(name) | {b.main}
    rest = sorted(p for p in folder.rglob("*.c") if p.relative_to(folder).as_posix() not in skip)
    return [folder / b.main, *rest]


def library(name: str, root: Path) -> list[Path]:
    """The binary's C files without its main file: what a C unit test links against."""
    return sources(name, root)[1:]


def headers(name: str, root: Path) -> list[Path]:
    """The headers a change to which must rebuild the binary."""
    b = BINARIES[name]
    own = (root / b.folder).rglob("*.h")
    shared = (p for d in b.include for p in (root / d).glob("*.h"))  # csrc/proto.h, not other binaries'
    return sorted({*own, *shared})


def include_dirs(name: str, root: Path) -> list[Path]:
    b = BINARIES[name]
    return [root / b.folder, *(root / d for d in b.include)]


if __name__ == "__main__":  # `python3 smolvm/_binaries.py NAME [--library]`: the files, one a line (Makefiles)
    root = Path(__file__).resolve().parent.parent
    files = library(sys.argv[1], root) if "--library" in sys.argv[2:] else sources(sys.argv[1], root)
    print("\n".join(str(p) for p in files))

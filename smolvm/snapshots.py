"""Snapshots on disk: the cached base snapshot of each boot configuration, and named user snapshots."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ._paths import data_dir, home
from .build._cache import digest
from .errors import SnapshotError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
META = "meta.json"
STATE = "state.bin"
MEMORY = "memory.bin"


@dataclass
class SnapshotInfo:
    name: str
    path: Path
    memory: int
    vcpus: int
    created: float
    source_vm: str
    size_bytes: int  # disk actually used (the memory file is sparse)


def root() -> Path:
    r = home() / "snapshots"
    r.mkdir(parents=True, exist_ok=True)
    return r


def base_key(kernel: Path, initrd: Path, cmdline: str, memory: int, vcpus: int, vmm: Path) -> str:
    """Changes whenever anything that shapes the booted guest changes."""

    def ident(p: Path) -> bytes:
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()

    # The VMM by its sources (shipped with the package) and build flavour: a reinstall of
    # the same code keeps hitting the cache (binaries differ by build path in debug info),
    # any change to the VMM (snapshot format, devices) misses it.
    h = hashlib.sha256()
    src = data_dir("csrc")
    for f in sorted(src.rglob("*")):
        if f.is_file() and f.suffix in (".c", ".h"):
            h.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes())
    h.update(b"asan" if b"__asan_init" in vmm.read_bytes() else b"plain")
    vmm_hash = h.digest()
    return digest(
        [b"base-v1", ident(kernel), ident(initrd), vmm_hash, cmdline.encode(),
         str(memory).encode(), str(vcpus).encode()]
    )  # fmt: skip


def base_dir(key: str) -> Path:
    return root() / ".base" / key


def complete(path: Path) -> bool:
    return (path / META).is_file() and (path / STATE).is_file() and (path / MEMORY).is_file()


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(
            f"snapshot name must be 1-64 characters of letters, digits, '.', '_' or '-' "
            f"starting with a letter or digit, got {name!r}"
        )
    return name


def user_dir(name: str) -> Path:
    return root() / check_name(name)


def staging_dir(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def publish(tmp: Path, final: Path, meta: dict[str, object], replace: bool = False) -> None:
    """Write meta.json, then move the finished snapshot folder into place."""
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if final.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return  # someone else finished the same snapshot first
        shutil.rmtree(final)
    os.rename(tmp, final)


def read_meta(path: Path) -> dict[str, object]:
    try:
        return dict(json.loads((path / META).read_text()))
    except FileNotFoundError:
        raise SnapshotError(f"{path} is not a snapshot (no {META})") from None
    except ValueError as e:
        raise SnapshotError(f"{path / META} is corrupt: {e}") from None


def info(name: str) -> SnapshotInfo:
    path = user_dir(name)
    if not path.exists():
        known = ", ".join(s.name for s in list_all()) or "none"
        raise SnapshotError(f"no snapshot named {name!r} (snapshots here: {known})")
    if not complete(path):
        raise SnapshotError(f"snapshot {name!r} at {path} is incomplete: delete it and take it again")
    meta = read_meta(path)
    used = sum(f.stat().st_blocks * 512 for f in path.iterdir() if f.is_file())
    return SnapshotInfo(
        name=name, path=path, memory=int(str(meta.get("memory", 0))),
        vcpus=int(str(meta.get("vcpus", 0))), created=float(str(meta.get("created", 0))),
        source_vm=str(meta.get("source_vm", "")), size_bytes=used,
    )  # fmt: skip


def list_all() -> list[SnapshotInfo]:
    out = []
    for p in sorted(root().iterdir()):
        if p.name.startswith(".") or not complete(p):
            continue
        try:
            out.append(info(p.name))
        except (SnapshotError, ValueError):
            continue
    return out


def delete(name: str) -> None:
    path = user_dir(name)
    if not path.exists():
        raise SnapshotError(f"no snapshot named {name!r}")
    shutil.rmtree(path)

"""Snapshots on disk: the cached base snapshot of each boot configuration, and named user snapshots."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import _binaries
from ._native import vmm_path
from ._paths import data_dir, home
from .build._cache import digest
from .errors import SnapshotError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
META = "meta.json"
STATE = "state.bin"
MEMORY = "memory.bin"
INSPECT_TIMEOUT_S = 60  # reading and checksumming at most 64 MiB of state


@dataclass
class SnapshotInfo:
    name: str
    path: Path
    memory: int
    vcpus: int
    created: float
    source_vm: str
    size_bytes: int  # disk actually used (the memory file is sparse)
    problem: str = ""  # why it cannot be restored (list_all() only; info() raises instead)
    image: str | None = None  # the root image of a VM with a disk
    disk_size: int | None = None  # why it cannot be restored (list_all() only; info() raises instead)


def root() -> Path:
    r = home() / "snapshots"
    r.mkdir(parents=True, exist_ok=True)
    return r


def file_ident(path: Path) -> bytes:
    """Which file this is, as far as a cache key needs: resolved path, size, modification time."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()


def base_key(
    kernel: Path, initrd: Path, cmdline: str, memory: int, vcpus: int, vmm: Path,
    extra: list[bytes] | None = None,
) -> str:  # fmt: skip
    """Changes whenever anything that shapes the booted guest changes."""
    # The VMM by its sources (shipped with the package) and build flavour: a reinstall of
    # the same code keeps hitting the cache (binaries differ by build path in debug info),
    # any change to the VMM (snapshot format, devices) misses it.
    h = hashlib.sha256()
    root = data_dir("csrc").parent
    for f in sorted({*_binaries.sources("smolvm-vmm", root), *_binaries.headers("smolvm-vmm", root)}):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    h.update(b"asan" if b"__asan_init" in vmm.read_bytes() else b"plain")
    vmm_hash = h.digest()
    return digest(
        [b"base-v1", file_ident(kernel), file_ident(initrd), vmm_hash, cmdline.encode(),
         str(memory).encode(), str(vcpus).encode(), *(extra or [])]
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


def inspect(path: Path) -> dict[str, object]:
    """What the VMM makes of the snapshot folder at path, without restoring it.

    The VMM is the one reader of its snapshot format: `smolvm-vmm --inspect` runs the checks
    its restore runs (csrc/vmm/snapshot.c, snapshot_open) and prints csrc/vmm/inspect.h's JSON:
    "problem" (None, or why it cannot be restored), "version", and for a whole snapshot
    "mem_size", "vcpus" and "devices". It needs no /dev/kvm, so it runs here in every profile.
    """
    argv = [str(vmm_path()), "--inspect", str(path)]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=INSPECT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SnapshotError(f"cannot check the snapshot at {path}: {argv[0]} --inspect: {e}") from None
    try:
        out = json.loads(done.stdout.decode("utf-8", "surrogateescape"))
    except ValueError:
        out = None
    if done.returncode != 0 or not isinstance(out, dict):
        err = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        raise SnapshotError(
            f"cannot check the snapshot at {path}: {argv[0]} --inspect failed ({err}); "
            "reinstall smolvm (`pip install .`)"
        )
    return out


def problem(path: Path) -> str | None:
    """Why the snapshot folder at path cannot be restored, or None if its files look whole.

    meta.json is this package's; state.bin (magic, version, length, checksum) and memory.bin
    (exactly the guest's memory size) are checked by the VMM itself, see inspect().
    """
    if not (path / META).is_file():
        return f"{META} is missing (incomplete snapshot)"
    why = inspect(path).get("problem")
    return None if why is None else str(why)


def check(path: Path, what: str, fix: str) -> None:
    """Raise SnapshotError naming the problem if the snapshot at path cannot be restored."""
    why = problem(path)
    if why is not None:
        raise SnapshotError(f"{what} at {path} cannot be restored: {why}. {fix}")


def info(name: str, *, verify: bool = True) -> SnapshotInfo:
    """The snapshot `name`; with verify, raises SnapshotError if its files are damaged."""
    path = user_dir(name)
    if not path.exists():
        known = ", ".join(s.name for s in list_all()) or "none"
        raise SnapshotError(f"no snapshot named {name!r} (snapshots here: {known})")
    if verify:
        check(
            path, f"snapshot {name!r}",
            f"Delete it (`smolvm snapshot rm {name}`) and take it again with vm.snapshot({name!r}).",
        )  # fmt: skip
    meta = read_meta(path)
    image = meta.get("image")
    used = _used(path)
    return SnapshotInfo(
        name=name, path=path, memory=int(str(meta.get("memory", 0))),
        vcpus=int(str(meta.get("vcpus", 0))), created=float(str(meta.get("created", 0))),
        source_vm=str(meta.get("source_vm", "")), size_bytes=used,
        image=str(image["name"]) if isinstance(image, dict) and "name" in image else None,
        disk_size=int(str(meta["disk_size"])) if meta.get("disk_size") else None,
    )  # fmt: skip


def list_all(*, damaged: bool = False) -> list[SnapshotInfo]:
    """The user snapshots; with damaged=True also those that cannot be restored (`problem` says why)."""
    out = []
    for p in sorted(root().iterdir()):
        if p.name.startswith(".") or not p.is_dir() or not NAME_RE.match(p.name):
            continue
        why = problem(p) if damaged else (None if complete(p) else "incomplete")
        if why is not None and not damaged:
            continue
        try:
            snap = info(p.name, verify=False)
        except (SnapshotError, ValueError) as e:
            if not damaged:
                continue
            snap = SnapshotInfo(p.name, p, 0, 0, 0.0, "", _used(p), problem=str(e))
        if why is not None:
            snap.problem = why
        out.append(snap)
    return out


def _used(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.iterdir() if f.is_file())


def delete(name: str) -> None:
    path = user_dir(name)
    if not path.exists():
        raise SnapshotError(f"no snapshot named {name!r}")
    shutil.rmtree(path)

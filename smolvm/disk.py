"""A VM's writable disk: a sparse ext4 file made on the host, the upper layer of the guest's root overlay."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ._process import tool_env
from .errors import SmolVMError

MIB = 1 << 20
LABEL = "smolvm-disk"
HINT = "apt-get install e2fsprogs"
# No journal (the disk lives and dies with its VM), no metadata checksums (guest kernel time
# is precious on emulating hosts), lazily initialised inode tables (the guest mounts it with
# noinit_itable, so nobody ever zeroes them: unwritten blocks of a sparse file read as zeros).
MKFS_OPTIONS = (
    "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", LABEL,
    "-O", "^has_journal,^metadata_csum,uninit_bg",
    "-E", "lazy_itable_init=1,nodiscard,root_owner=0:0",
)  # fmt: skip


class DiskError(SmolVMError):
    """The VM's disk could not be made."""


def _mkfs() -> str:
    path = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    if path is None:
        raise DiskError(f"mkfs.ext4 is not installed, and a VM's writable disk needs it: `{HINT}`")
    return path


def create(path: Path, size_mib: int) -> None:
    """A new sparse file of size_mib MiB holding an empty ext4 file system (a few MiB used)."""
    try:
        with open(path, "xb") as f:
            f.truncate(size_mib * MIB)
    except OSError as e:
        raise DiskError(f"could not create the VM disk {path}: {e}") from e
    res = subprocess.run(
        [_mkfs(), *MKFS_OPTIONS, str(path)], capture_output=True, text=True, env=tool_env(),
    )  # fmt: skip
    if res.returncode != 0:
        path.unlink(missing_ok=True)
        raise DiskError(
            f"mkfs.ext4 failed on the VM disk {path} (exit {res.returncode}): {res.stderr.strip()}"
        )


def placeholder(path: Path) -> None:
    """An empty (0-byte) disk: booted with it, a base snapshot can later be restored with a disk of any size."""
    path.touch(exist_ok=False)


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy src to dst keeping its holes (only the data the guest wrote is copied)."""
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        size = os.fstat(fi.fileno()).st_size
        off = 0
        while off < size:
            try:
                data = os.lseek(fi.fileno(), off, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(fi.fileno(), data, os.SEEK_HOLE)
            pos = data
            while pos < hole:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), hole - pos, pos, pos)
                if n == 0:
                    break
                pos += n
            off = hole
        fo.truncate(size)


def used_bytes(path: Path) -> int:
    """Host disk space the file really takes."""
    return path.stat().st_blocks * 512

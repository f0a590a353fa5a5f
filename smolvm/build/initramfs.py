"""Write the guest's initramfs (agent as /init, /dev nodes, and static busybox unless the root is a disk image)
as an uncompressed newc cpio, cached by input hash."""

from __future__ import annotations

import stat
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ._cache import cached, digest, progress
from .agent import ensure_agent

BUSYBOX = Path("/bin/busybox")
BUSYBOX_HINT = "apt-get install busybox-static"
WRITER_VERSION = b"newc-writer-v1"
INITRAMFS_NAME = "initramfs.cpio"
NEWC_MAGIC = b"070701"
NEWC_TRAILER = "TRAILER!!!"


class InitramfsError(RuntimeError):
    pass


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. name has no leading '/'; data is a file's bytes or a symlink's target."""

    name: str
    mode: int  # file type and permission bits: stat.S_IFDIR | 0o755, ...
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node
    mtime: int = 0


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _newc_header(ino: int, e: CpioEntry, nlink: int, namesize: int) -> bytes:
    fields = (
        ino, e.mode, e.uid, e.gid, nlink, e.mtime, len(e.data),
        0, 0, e.rdev[0], e.rdev[1], namesize, 0,
    )
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"cpio entry {e.name!r}: field value {value} does not fit newc's 32 bits")
    return NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)


def _check_entry(e: CpioEntry) -> None:
    path = PurePosixPath(e.name)
    if not e.name or e.name.startswith("/") or any(p in ("", ".", "..") for p in e.name.split("/")):
        raise ValueError(f"bad cpio entry name {e.name!r}: want a relative path without '.' or '..'")
    if e.name == NEWC_TRAILER or "\0" in e.name:
        raise ValueError(f"bad cpio entry name {e.name!r}")
    kind = stat.S_IFMT(e.mode)
    if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO):
        raise ValueError(f"cpio entry {path}: unsupported file type {oct(kind)}")
    if e.data and kind not in (stat.S_IFREG, stat.S_IFLNK):
        raise ValueError(f"cpio entry {path}: only files and symlinks carry data")


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """An uncompressed "newc" (070701) cpio archive of entries, in the given order, ending with TRAILER!!!.

    Each header plus its NUL-terminated name, and each member's data, is padded
    to a multiple of 4 bytes, as the format (and the kernel's unpacker) requires.
    Inode numbers are assigned from 1; no entries are hard links.
    """
    out = bytearray()
    seen: set[str] = set()
    ino = 0
    for e in entries:
        _check_entry(e)
        if e.name in seen:
            raise ValueError(f"duplicate cpio entry {e.name!r}")
        seen.add(e.name)
        ino += 1
        name = e.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        out += _newc_header(ino, e, nlink, len(name)) + name
        out += _pad4(len(out))
        out += e.data
        out += _pad4(len(out))
    trailer = NEWC_TRAILER.encode() + b"\0"
    out += _newc_header(0, CpioEntry(NEWC_TRAILER, 0), 1, len(trailer)) + trailer
    out += _pad4(len(out))
    return bytes(out)


def _is_static_elf(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF without a PT_INTERP (dynamic loader) program header."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            return False
        if struct.unpack_from("<I", data, off)[0] == 3:  # PT_INTERP
            return False
    return True


def read_busybox(path: Path = BUSYBOX) -> bytes:
    if not path.exists():
        raise InitramfsError(f"{path} is missing: the guest needs a static busybox, `{BUSYBOX_HINT}`")
    data = path.read_bytes()
    if not _is_static_elf(data):
        raise InitramfsError(
            f"{path} is not a statically linked x86-64 busybox (the guest has no libc): `{BUSYBOX_HINT}`"
        )
    return data


def busybox_applets(path: Path = BUSYBOX) -> list[str]:
    """Paths (relative, like 'usr/bin/env') of busybox's applets, from `busybox --list-full`."""
    try:
        res = subprocess.run([str(path), "--list-full"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise InitramfsError(f"`{path} --list-full` failed ({e}): `{BUSYBOX_HINT}`") from None
    return [line.strip().lstrip("/") for line in res.stdout.splitlines() if line.strip()]


def _text(name: str, text: str, mode: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | mode, text.encode())


def initramfs_entries(agent: bytes, busybox: bytes | None, applets: Iterable[str]) -> list[CpioEntry]:
    """The guest's root file system, parents before children. Without busybox (a VM whose commands
    run in a disk image) it holds the agent alone: less for the guest kernel to unpack at boot."""
    d = stat.S_IFDIR
    entries: dict[str, CpioEntry] = {}
    for name, mode in (
        ("dev", 0o755), ("dev/pts", 0o755), ("dev/shm", 0o1777), ("proc", 0o555), ("sys", 0o555),
        ("tmp", 0o1777), ("root", 0o700), ("etc", 0o755), ("run", 0o755), ("bin", 0o755),
        ("sbin", 0o755), ("usr", 0o755), ("usr/bin", 0o755), ("usr/sbin", 0o755),
    ):
        entries[name] = CpioEntry(name, d | mode)
    for e in (
        CpioEntry("init", stat.S_IFREG | 0o755, agent),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        _text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        _text("etc/group", "root:x:0:\n"),
        _text("etc/hosts", "127.0.0.1\tlocalhost smolvm\n"),
        _text("etc/hostname", "smolvm\n"),
    ):
        entries[e.name] = e
    if busybox is None:
        return sorted(entries.values(), key=lambda e: e.name.split("/"))
    entries["bin/busybox"] = CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox)
    for applet in applets:
        parts = applet.split("/")
        if not applet or any(p in ("", ".", "..") for p in parts) or applet in entries:
            continue
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, CpioEntry(parent, d | 0o755))
        entries[applet] = CpioEntry(applet, stat.S_IFLNK | 0o777, b"/bin/busybox")
    return sorted(entries.values(), key=lambda e: e.name.split("/"))


def initramfs_key(agent: Path, with_busybox: bool = True) -> str:
    if not with_busybox:
        return digest([b"initramfs-agent-only", WRITER_VERSION, agent.read_bytes()])
    return digest([b"initramfs", WRITER_VERSION, agent.read_bytes(), read_busybox()])


def ensure_initramfs(with_busybox: bool = True) -> Path:
    """Path of the guest's initramfs (uncompressed newc cpio), written on first use.

    with_busybox=False: the agent alone, for guests whose commands run in a disk image.
    """
    agent = ensure_agent()

    def build(out: Path) -> None:
        progress("writing the guest initramfs")
        if with_busybox:
            entries = initramfs_entries(agent.read_bytes(), read_busybox(), busybox_applets())
        else:
            entries = initramfs_entries(agent.read_bytes(), None, ())
        (out / INITRAMFS_NAME).write_bytes(newc_archive(entries))

    return cached("initramfs", initramfs_key(agent, with_busybox), build) / INITRAMFS_NAME

"""The newc cpio writer and the guest initramfs, checked with a small independent newc reader."""

from __future__ import annotations

import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from smolvm.build import initramfs  # noqa: E402
from smolvm.build.initramfs import CpioEntry, newc_archive  # noqa: E402

FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
          "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")


@dataclass
class Member:
    offset: int
    name: str
    hdr: dict[str, int]
    data: bytes


def read_newc(blob: bytes) -> list[Member]:
    """Parse a newc archive the way the kernel does, checking magic, 4-byte alignment and the trailer."""
    members = []
    off = 0
    while True:
        assert off % 4 == 0, f"header at {off} not 4-aligned"
        assert blob[off:off + 6] == b"070701", f"bad magic at {off}: {blob[off:off + 6]!r}"
        raw = blob[off + 6:off + 110]
        assert len(raw) == 104
        hdr = {k: int(raw[i * 8:i * 8 + 8], 16) for i, k in enumerate(FIELDS)}
        assert raw == raw.upper(), "newc hex digits are written in upper case here"
        name_end = off + 110 + hdr["namesize"]
        name_raw = blob[off + 110:name_end]
        assert name_raw.endswith(b"\0") and b"\0" not in name_raw[:-1]
        name = name_raw[:-1].decode()
        data_off = (name_end + 3) & ~3
        assert blob[name_end:data_off] == b"\0" * (data_off - name_end), "name padding must be NULs"
        data = blob[data_off:data_off + hdr["filesize"]]
        assert len(data) == hdr["filesize"], f"{name}: truncated data"
        next_off = (data_off + hdr["filesize"] + 3) & ~3
        assert blob[data_off + hdr["filesize"]:next_off] == b"\0" * (next_off - data_off - hdr["filesize"])
        members.append(Member(off, name, hdr, data))
        off = next_off
        if name == "TRAILER!!!":
            break
    assert off == len(blob), "bytes after the trailer"
    return members


def test_writer_small_archive() -> None:
    entries = [
        CpioEntry("d", stat.S_IFDIR | 0o755),
        CpioEntry("d/f", stat.S_IFREG | 0o644, b"hello", uid=1000, gid=100, mtime=1234),
        CpioEntry("d/odd-name-len", stat.S_IFREG | 0o600, b"x" * 7),
        CpioEntry("l", stat.S_IFLNK | 0o777, b"d/f"),
        CpioEntry("null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        CpioEntry("empty", stat.S_IFREG | 0o644),
    ]
    members = read_newc(newc_archive(entries))
    assert [m.name for m in members] == ["d", "d/f", "d/odd-name-len", "l", "null", "empty", "TRAILER!!!"]
    by = {m.name: m for m in members}
    assert by["d"].hdr["mode"] == stat.S_IFDIR | 0o755 and by["d"].hdr["nlink"] == 2
    f = by["d/f"]
    assert f.data == b"hello" and f.hdr["mode"] == stat.S_IFREG | 0o644
    assert (f.hdr["uid"], f.hdr["gid"], f.hdr["mtime"], f.hdr["nlink"]) == (1000, 100, 1234, 1)
    assert by["l"].data == b"d/f" and stat.S_ISLNK(by["l"].hdr["mode"])
    assert stat.S_ISCHR(by["null"].hdr["mode"]) and (by["null"].hdr["rdevmajor"], by["null"].hdr["rdevminor"]) == (1, 3)
    assert by["empty"].data == b""
    inos = [m.hdr["ino"] for m in members[:-1]]
    assert len(set(inos)) == len(inos) and 0 not in inos
    trailer = members[-1].hdr
    assert trailer["filesize"] == 0 and trailer["nlink"] == 1 and trailer["mode"] == 0
    assert all(m.hdr["check"] == 0 for m in members)


def test_writer_empty_archive_is_just_the_trailer() -> None:
    assert [m.name for m in read_newc(newc_archive([]))] == ["TRAILER!!!"]


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", "./a", "TRAILER!!!"])
def test_writer_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        newc_archive([CpioEntry(name, stat.S_IFREG | 0o644)])


def test_writer_rejects_duplicates_and_data_on_dirs() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        newc_archive([CpioEntry("a", stat.S_IFDIR | 0o755), CpioEntry("a", stat.S_IFDIR | 0o755)])
    with pytest.raises(ValueError, match="carry data"):
        newc_archive([CpioEntry("a", stat.S_IFDIR | 0o755, b"x")])


def _check_layout(members: list[Member], agent: bytes, busybox: bytes, applets: list[str]) -> None:
    by = {m.name: m for m in members}
    seen: set[str] = set()
    for m in members[:-1]:
        parent = m.name.rpartition("/")[0]
        assert not parent or parent in seen, f"{m.name} comes before its folder {parent}"
        assert not parent or stat.S_ISDIR(by[parent].hdr["mode"])
        seen.add(m.name)
    init = by["init"]
    assert init.data == agent and init.hdr["mode"] == stat.S_IFREG | 0o755
    bb = by["bin/busybox"]
    assert bb.data == busybox and bb.hdr["mode"] == stat.S_IFREG | 0o755
    for d in ("dev", "proc", "sys", "tmp", "root", "etc", "run", "dev/pts", "dev/shm"):
        assert stat.S_ISDIR(by[d].hdr["mode"]), d
    assert stat.S_IMODE(by["tmp"].hdr["mode"]) == 0o1777
    for name, rdev, perm in (("dev/console", (5, 1), 0o600), ("dev/null", (1, 3), 0o666)):
        h = by[name].hdr
        assert stat.S_ISCHR(h["mode"]) and stat.S_IMODE(h["mode"]) == perm, name
        assert (h["rdevmajor"], h["rdevminor"]) == rdev, name
    assert by["etc/passwd"].data.startswith(b"root:x:0:0:")
    assert by["etc/group"].data.startswith(b"root:x:0:")
    for applet in applets:
        m = by[applet]
        assert stat.S_ISLNK(m.hdr["mode"]) and m.data == b"/bin/busybox", applet
    assert all(m.hdr["uid"] == 0 and m.hdr["gid"] == 0 for m in members)


def test_initramfs_entries_layout() -> None:
    applets = ["bin/sh", "usr/bin/env", "sbin/init", "linuxrc", "usr/libexec/odd/tool", "bin/busybox", "../evil"]
    entries = initramfs.initramfs_entries(b"AGENT", b"BUSYBOX", applets)
    members = read_newc(newc_archive(entries))
    ok = [a for a in applets if a not in ("bin/busybox", "../evil")]
    _check_layout(members, b"AGENT", b"BUSYBOX", ok)
    names = {m.name for m in members}
    assert "usr/libexec" in names and "usr/libexec/odd" in names
    assert not any(".." in n for n in names)


def test_static_elf_check() -> None:
    assert initramfs._is_static_elf(initramfs.BUSYBOX.read_bytes()) if initramfs.BUSYBOX.exists() else True
    assert not initramfs._is_static_elf(Path(sys.executable).resolve().read_bytes()[:1 << 16])
    assert not initramfs._is_static_elf(b"#!/bin/sh\n")


def test_missing_busybox_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(initramfs.InitramfsError, match="apt-get install busybox-static"):
        initramfs.read_busybox(tmp_path / "busybox")
    dynamic = tmp_path / "dyn"
    dynamic.write_bytes(Path(sys.executable).resolve().read_bytes())
    with pytest.raises(initramfs.InitramfsError, match="apt-get install busybox-static"):
        initramfs.read_busybox(dynamic)


def test_ensure_initramfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc: apt-get install gcc libc6-dev")
    try:
        busybox = initramfs.read_busybox()
    except initramfs.InitramfsError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("SMOLVM_HOME", str(tmp_path))
    path = initramfs.ensure_initramfs()
    assert path.name == "initramfs.cpio" and path.is_relative_to(tmp_path)
    agent = (path.parents[2] / "agent").glob("*/agent")
    agent_bytes = next(agent).read_bytes()
    applets = initramfs.busybox_applets()
    assert "bin/sh" in applets and len(applets) > 100
    members = read_newc(path.read_bytes())
    _check_layout(members, agent_bytes, busybox, [a for a in applets if a != "bin/busybox"])
    assert initramfs.ensure_initramfs() == path

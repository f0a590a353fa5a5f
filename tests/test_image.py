"""The guest image builder for real: mmdebstrap + mkfs.ext4 -d, its cache, names and interrupted builds."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _helpers import processes_naming  # noqa: E402
from smolvm.build import image  # noqa: E402
from smolvm.build.image import ImageNotFoundError, ensure_image, image_path, list_images  # noqa: E402

EXT4_MAGIC = 0xEF53
MIB = 1 << 20


def superblock(path: Path) -> tuple[int, str]:
    """(magic, volume label) read straight from the primary superblock at byte 1024."""
    with open(path, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    magic = struct.unpack_from("<H", sb, 0x38)[0]
    label = sb[0x78:0x88].split(b"\0", 1)[0].decode()
    return magic, label


def debugfs(img: Path, request: str) -> str:
    res = subprocess.run(["debugfs", "-R", request, str(img)], capture_output=True, text=True, check=True)
    return res.stdout


def inode(img: Path, path: str) -> dict[str, str]:
    out = debugfs(img, f"stat {path}")
    m = re.search(r"Type: (\S+)\s+Mode:\s+(\d+)", out)
    assert m, f"{path} is not in the image:\n{out}"
    u = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    assert u
    link = re.search(r'Fast link dest: "([^"]*)"', out)
    return {"type": m[1], "mode": m[2], "uid": u[1], "gid": u[2], "link": link[1] if link else ""}


def fsck_clean(img: Path) -> None:
    res = subprocess.run(["e2fsck", "-f", "-n", str(img)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def default_image() -> Path:
    """The default image, built on the first run (about a minute) and cached in $SMOLVM_HOME after."""
    start = time.monotonic()
    path = ensure_image()
    print(f"\ndefault image {path}: {path.stat().st_size // MIB} MiB, ready in {time.monotonic() - start:.1f} s")
    return path


def test_default_image_is_a_labelled_ext4_file(default_image: Path) -> None:
    assert default_image.name == "rootfs.ext4" and default_image.is_file()
    magic, label = superblock(default_image)
    assert magic == EXT4_MAGIC
    assert label == image.LABEL == "smolvm-root"
    header = subprocess.run(["dumpe2fs", "-h", str(default_image)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"Filesystem volume name:\s+smolvm-root", header)
    features = re.search(r"Filesystem features:\s+(.*)", header)
    assert features and "extent" in features[1] and "has_journal" not in features[1]
    fsck_clean(default_image)
    assert default_image.stat().st_size < 400 * MIB


def test_default_image_content(default_image: Path) -> None:
    py = inode(default_image, "/usr/bin/python3")
    assert py["type"] == "symlink" and py["link"].startswith("python3.")
    real = inode(default_image, f"/usr/bin/{py['link']}")
    assert real["type"] == "regular" and real["uid"] == "0" and real["gid"] == "0"
    for tool in ("bash", "git", "curl", "ip", "less", "ps", "pip3"):
        assert inode(default_image, f"/usr/bin/{tool}")["uid"] == "0", tool
    # ownership other than root survives (shadow group) and so do setuid bits
    assert inode(default_image, "/etc/shadow")["gid"] == "42"
    assert inode(default_image, "/usr/bin/su")["mode"] == "04755"
    status = debugfs(default_image, "cat /var/lib/dpkg/status")
    installed = {
        m[1] for stanza in status.split("\n\n")
        if (m := re.search(r"^Package: (\S+)$", stanza, re.M)) and "\nStatus: install ok installed" in stanza
    }
    missing = set(image.default_packages()) - installed
    assert not missing, f"not installed: {missing}"
    assert "linux-image" not in status and "\nPackage: systemd\n" not in status
    for mount_point in ("/proc", "/sys", "/dev", "/tmp", "/run"):
        assert inode(default_image, mount_point)["type"] == "directory", mount_point
    assert inode(default_image, "/tmp")["mode"] == "01777"
    dev = debugfs(default_image, "ls /dev").split()
    assert sorted(n for n in dev if not n.startswith("(") and not n.isdigit()) == [".", ".."]
    assert debugfs(default_image, "cat /etc/hostname") == "smolvm\n"
    assert inode(default_image, "/etc/resolv.conf")["type"] == "regular"
    # lean: no docs, man pages, translations or package lists
    for folder in ("/usr/share/doc", "/usr/share/man", "/usr/share/locale"):
        names = [n for n in debugfs(default_image, f"ls {folder}").split() if not n.startswith("(")]
        assert not [n for n in names if not n.isdigit() and n not in (".", "..")], folder
    lists = debugfs(default_image, "ls /var/lib/apt/lists").split()
    assert not [n for n in lists if n.endswith("_Packages") or n.endswith("Release")]


def test_second_call_is_a_cache_hit(default_image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = default_image.stat()

    def no_rebuild(*args: object) -> None:
        raise AssertionError("the cached default image was rebuilt")

    monkeypatch.setattr(image, "_bootstrap", no_rebuild)
    again = ensure_image()
    assert again == default_image
    after = again.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert image_path("default") == default_image
    assert "default" in list_images()


def test_unknown_image_names_the_known_ones(default_image: Path) -> None:
    with pytest.raises(ImageNotFoundError, match=r"no image named 'no-such-image'.*built images: .*default"):
        ensure_image("no-such-image")
    with pytest.raises(LookupError, match=r"default"):
        image_path("no-such-image")


def test_bad_names_and_packages_are_refused_before_building() -> None:
    for name in ("", "../etc", "a/b", "-x", "A" * 65):
        with pytest.raises(ValueError, match="bad image name"):
            ensure_image(name, ["less"])
    for pkgs in (["--include=evil"], ["less,bash"], ["less bash"], [""]):
        with pytest.raises(ValueError, match="bad Debian package"):
            ensure_image("custom", pkgs)
    with pytest.raises(ValueError, match="built-in image"):
        ensure_image("default", ["less"])
    with pytest.raises(TypeError):
        ensure_image("custom", "less")  # type: ignore[arg-type]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def builders_of(marker: str, home: Path) -> list[str]:
    """Processes whose command line mentions marker (our interrupted mmdebstrap or tar) and
    that work for this test: their command line or environment (TMPDIR) names its build
    folders, so another suite's build on the same machine does not count."""
    ours = (f"smolvm-image.{os.getpid()}.".encode(), str(home).encode())
    found = []
    for pid, cmdline in processes_naming(marker):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            environ = b""  # gone meanwhile: its command line decides
        if not any(o in cmdline or o in environ for o in ours):
            continue
        shown = cmdline.replace(b"\0", b" ").decode(errors="replace")
        found.append(f"{pid}: {shown[:200]}")
    return found


def test_interrupted_build_is_rebuilt_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_HOME", str(tmp_path))
    name, packages = "interrupted", ["netbase", "less"]
    key = image.image_key(packages)
    images = tmp_path / "images"
    # what a build killed with SIGKILL leaves: its temporary folder with half an image, a tmpfs tree
    gone = dead_pid()
    stale = images / f".{name}-{key}.tmp-{gone}"
    stale.mkdir(parents=True)
    (stale / "rootfs.ext4").write_bytes(b"\0" * 1024 + b"half")
    stale_tree = image.TMPFS / f"smolvm-image.{gone}.test"
    if image.TMPFS.is_dir():
        (stale_tree / "rootfs" / "etc").mkdir(parents=True)
    # and a folder under the final name that never got its .complete marker
    unfinished = images / f"{name}-{key}"
    unfinished.mkdir()
    (unfinished / "rootfs.ext4").write_bytes(b"junk")

    def interrupt(img: str, msg: str) -> None:
        print(f"smolvm: image {img}: {msg}", file=sys.stderr)
        if msg.startswith("extracting archives"):  # mmdebstrap has downloaded, and is half-way
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(image, "_step", interrupt)
        with pytest.raises(KeyboardInterrupt):
            ensure_image(name, packages)

    assert not stale.exists() and not stale_tree.exists(), "stale build folders were not swept"
    assert sorted(p.name for p in images.iterdir()) == [unfinished.name]
    assert not list(image.TMPFS.glob(f"smolvm-image.{os.getpid()}.*"))
    deadline = time.monotonic() + 30
    while builders_of("--include=less,netbase", tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not builders_of("--include=less,netbase", tmp_path), "the interrupted mmdebstrap is still running"
    assert list_images() == []
    with pytest.raises(ImageNotFoundError, match="built images: none yet"):
        image_path(name)
    with pytest.raises(ImageNotFoundError):
        ensure_image(name)  # packages unknown: nothing finished was recorded

    built = ensure_image(name, packages)
    assert built == unfinished / "rootfs.ext4"
    assert superblock(built) == (EXT4_MAGIC, "smolvm-root")
    fsck_clean(built)
    assert inode(built, "/usr/bin/less")["type"] == "regular"
    assert not builders_of("--include=less,netbase", tmp_path)
    assert list_images() == [name]
    assert image_path(name) == built
    assert ensure_image(name) == built  # the recorded packages are reused
    assert sorted(p.name for p in images.iterdir()) == [unfinished.name]


def test_failed_build_says_why_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_HOME", str(tmp_path))
    with pytest.raises(image.ImageBuildError,
                       match=r"(?s)Unable to locate package no-such-package-smolvm.*full log: "):
        ensure_image("broken", ["no-such-package-smolvm"])
    assert list((tmp_path / "images").iterdir()) == []
    assert not list(image.TMPFS.glob(f"smolvm-image.{os.getpid()}.*"))
    assert "no-such-package-smolvm" in (tmp_path / "logs" / "image-broken.build.log").read_text()
    assert list_images() == []


def test_missing_tool_says_what_to_install() -> None:
    with pytest.raises(image.ImageBuildError, match=r"apt-get install mmdebstrap e2fsprogs"):
        image._tool("smolvm-no-such-tool")

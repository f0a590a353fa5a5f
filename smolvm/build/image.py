"""Build the guest root file system (Debian bookworm via mmdebstrap) as a read-only ext4 image, cached by hash."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .._paths import data_dir, home
from .._process import tool_env
from ..errors import SmolVMError
from ._cache import cached, digest, progress

BUILDER_VERSION = "image-v3"  # v2: no metadata_csum (guest kernel time is dear); v3: warm.list
SUITE = "bookworm"
ARCH = "amd64"  # the VMM runs x86-64 guests only
LABEL = "smolvm-root"
IMAGE_FILE = "rootfs.ext4"
META_FILE = "image.json"
LOG_FILE = "build.log"
DEFAULT_IMAGE = "default"
KIND = "images"
TOOLS_HINT = "apt-get install mmdebstrap e2fsprogs"
NONROOT_HINT = "apt-get install fakeroot uidmap, and give your user /etc/subuid and /etc/subgid ranges"
MIRROR = os.environ.get("SMOLVM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("SMOLVM_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
BLOCK = 4096
INODE_SIZE = 256
HEADROOM = 0.15
MIB = 1 << 20

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
# A Debian package name, optionally pinned: pkg, pkg=version or pkg/suite (no options, commas or spaces).
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+(?:=[A-Za-z0-9.+~:-]+|/[a-z0-9-]+)?")
_TMP_RE = re.compile(r"\.(?P<key>.+)\.tmp-(?P<pid>\d+)")
_WORK_RE = re.compile(r"smolvm-image\.(?P<pid>\d+)\..+")
TMPFS = Path("/dev/shm")
TMPFS_NEEDS = 2 << 30  # a build holds about twice the root file system there at its peak

# Options kept in the image (/etc/dpkg/dpkg.cfg.d/99mmdebstrap, /etc/apt/apt.conf.d/99mmdebstrap),
# so packages a guest installs later stay lean too.
APT_OPTIONS = (
    'APT::Install-Recommends "false"',
    'APT::Install-Suggests "false"',
    'Acquire::Languages "none"',
)
DPKG_OPTIONS = (
    "force-unsafe-io",  # no fsync per unpacked file: a build that stops is thrown away anyway
    "path-exclude=/usr/share/doc/*",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
)
# Runs inside mmdebstrap's namespace with the root as $1, after every package is installed.
# Essential packages are unpacked before dpkg's path-exclude applies, hence the second sweep.
CUSTOMIZE_HOOK = r"""set -eu
cd "$1"
rm -rf usr/share/doc/* usr/share/man/* usr/share/info/* usr/share/locale/* usr/share/lintian/*
rm -rf var/cache/apt/* var/lib/apt/lists/* var/cache/debconf/*-old var/lib/dpkg/*-old var/log/apt/*
mkdir -p proc sys dev tmp run root
rm -f etc/hostname etc/resolv.conf etc/hosts
printf 'smolvm\n' > etc/hostname
: > etc/resolv.conf
printf '127.0.0.1\tlocalhost\n127.0.1.1\tsmolvm\n::1\tlocalhost ip6-localhost ip6-loopback\n' > etc/hosts
# What the guest agent reads into the page cache before the base snapshot (real paths, no links):
# the shells, common tools, their libraries, and python3 with the modules its start-up imports.
mkdir -p etc/smolvm
{
  chroot "$1" /bin/sh -c 'for f in /bin/sh /bin/dash /bin/bash /usr/bin/env /usr/bin/uname /usr/bin/cat \
      /usr/bin/ls /usr/bin/python3 /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/libc.so.6 \
      /lib/x86_64-linux-gnu/libm.so.6 /lib/x86_64-linux-gnu/libz.so.1 /lib/x86_64-linux-gnu/libexpat.so.1 \
      /lib/x86_64-linux-gnu/libtinfo.so.6 /lib/x86_64-linux-gnu/libselinux.so.1 \
      /lib/x86_64-linux-gnu/libpcre2-8.so.0; do [ -e "$f" ] && readlink -f "$f"; done; true'
  chroot "$1" /usr/bin/python3 -c 'import sys, importlib.util as u
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None) or ""
    if f.endswith(".py"):
        print(u.cache_from_source(f))' || true
} | sort -u > etc/smolvm/warm.list
"""


class ImageError(SmolVMError, RuntimeError):
    pass


class ImageBuildError(ImageError):
    pass


class ImageNotFoundError(ImageError, LookupError):
    pass


def default_packages() -> list[str]:
    """The default image's packages, from guest/image/packages.txt (blank lines and # comments skipped)."""
    text = (data_dir("guest") / "image" / "packages.txt").read_text()
    return [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]


def check_image_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"bad image name {name!r}: use 1-64 of a-z, 0-9, '_', '.', '-', starting with a letter or digit"
        )


def _check_packages(packages: list[str]) -> list[str]:
    if isinstance(packages, str):
        raise TypeError("packages must be a list of package names, not one string")
    clean = sorted(set(packages))
    bad = [p for p in clean if not isinstance(p, str) or not _PACKAGE_RE.fullmatch(p)]
    if bad:
        raise ValueError(f"bad Debian package names {bad!r}: want names like 'python3' or 'nodejs=18.19.0+dfsg-6'")
    if not clean:
        raise ValueError("an image needs at least one package (minbase alone has no python3)")
    return clean


def _tool(name: str, hint: str = TOOLS_HINT) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise ImageBuildError(f"{name} is not installed, and building the guest image needs it: `{hint}`")
    return path


def mmdebstrap_version() -> str:
    """"mmdebstrap X.Y.Z", read from the script's `our $VERSION` (starting perl takes 0.2 s) or asked."""
    tool = _tool("mmdebstrap")
    try:
        with open(tool, "rb") as f:
            m = re.search(rb"^our \$VERSION = '([0-9][^']*)';$", f.read(8192), re.M)
        if m:
            return f"mmdebstrap {m[1].decode()}"
    except OSError:
        pass
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, env=tool_env())
    if out.returncode != 0 or not out.stdout.strip():
        raise ImageBuildError(f"`mmdebstrap --version` failed: {out.stderr.strip()} (`{TOOLS_HINT}`)")
    return out.stdout.strip()


def image_key(packages: list[str]) -> str:
    """Hash of everything the image is made from: builder, sorted packages, mmdebstrap, suite, architecture."""
    parts = [BUILDER_VERSION, "\n".join(_check_packages(packages)), mmdebstrap_version(), SUITE, ARCH,
             CUSTOMIZE_HOOK, "\n".join(APT_OPTIONS + DPKG_OPTIONS)]
    return digest(p.encode() for p in parts)


def _mode() -> str:
    # unshare also for root: mmdebstrap then runs in a private mount namespace (correct ownership as
    # in root mode), so a killed build cannot leave /dev or /proc mounted inside our build folder.
    return "unshare"


def _fakeroot(state: Path, load: bool) -> list[str]:
    """Prefix that makes non-root tar/mkfs see the ownership mmdebstrap wrote; nothing for root."""
    if os.geteuid() == 0:
        return []
    return [_tool("fakeroot", NONROOT_HINT), "-i" if load else "-s", str(state), "--"]


def _log_tail(log: Path, n: int = 15) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [ln for ln in lines if ln.startswith("E: ")][-10:]
    tail = lines[-n:]
    return "\n".join(errors + [ln for ln in tail if ln not in errors])


def _step(name: str, msg: str) -> None:
    """One progress line of a build (also the hook the tests use to interrupt a build half-way)."""
    progress(f"image {name}: {msg}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a child we started (its whole process group) and reap it.

    mmdebstrap ignores SIGTERM while its own children run, so it gets SIGKILL after a short
    grace; that is safe because it runs in unshare mode, whose mounts die with its namespace.
    """
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _scratch(out: Path) -> Path:
    """Folder for the unpacked trees: tmpfs when memory allows (unpacking 10k files to disk is
    slow on some hosts), else the build folder itself."""
    try:
        st = os.statvfs(TMPFS)
        roomy = st.f_bavail * st.f_frsize >= TMPFS_NEEDS and _mem_available() >= 2 * TMPFS_NEEDS
    except OSError:
        roomy = False
    if roomy and os.access(TMPFS, os.W_OK | os.X_OK):
        return TMPFS
    return out


def _bootstrap(name: str, packages: list[str], work: Path, log: Path) -> Path:
    """Run mmdebstrap to a tarball on a pipe and unpack it into work/rootfs (without /dev's nodes)."""
    rootfs = work / "rootfs"
    mode = _mode()
    cmd = [
        _tool("mmdebstrap"), f"--mode={mode}", "--variant=minbase", f"--architectures={ARCH}",
        "--format=tar", "--verbose", "--include=" + ",".join(packages),
        *(f"--aptopt={o}" for o in APT_OPTIONS), *(f"--dpkgopt={o}" for o in DPKG_OPTIONS),
        f"--customize-hook={CUSTOMIZE_HOOK}",
        SUITE, "-",
        f"deb {MIRROR} {SUITE} main",
        f"deb {MIRROR} {SUITE}-updates main",
        f"deb {SECURITY_MIRROR} {SUITE}-security main",
    ]
    env = tool_env(LC_ALL="C.UTF-8")
    env.pop("TMPDIR", None)
    # mmdebstrap's own temporary chroot; a non-root namespace can only reach world-writable folders
    if os.geteuid() == 0:
        env["TMPDIR"] = str(work)
    elif work.parent == TMPFS:
        env["TMPDIR"] = str(TMPFS)
    extract = _fakeroot(work / "fakeroot.state", load=False) + [
        "tar", "--extract", "--file=-", f"--directory={rootfs}", "--numeric-owner", "--same-owner",
        "--preserve-permissions", "--xattrs", "--xattrs-include=*", "--exclude=./dev/*",
    ]
    rootfs.mkdir()
    with open(log, "ab") as logf:
        logf.write(f"$ {' '.join(cmd)} | {' '.join(extract)}\n".encode())
        logf.flush()
        mm = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, start_new_session=True)
        tar = subprocess.Popen(extract, stdin=mm.stdout, stdout=logf, stderr=logf, env=tool_env(),
                               start_new_session=True)
        assert mm.stdout is not None and mm.stderr is not None
        mm.stdout.close()
        try:
            for raw in mm.stderr:
                logf.write(raw)
                logf.flush()
                line = raw.decode(errors="replace").rstrip()
                if line.startswith("I: ") and not line.startswith("I: running "):
                    _step(name, line[3:])
            mm_rc, tar_rc = mm.wait(), tar.wait()
        finally:
            _stop(mm)
            _stop(tar)
    if mm_rc != 0 or tar_rc != 0:
        what = f"mmdebstrap (exit {mm_rc}) | tar (exit {tar_rc})"
        hint = TOOLS_HINT if os.geteuid() == 0 else f"{TOOLS_HINT}; {NONROOT_HINT}"
        raise ImageBuildError(f"building image {name!r} failed in {what}:\n{_log_tail(log)}\n"
                              f"(needs network access to {MIRROR}; `{hint}`)")
    return rootfs


def _usage(rootfs: Path) -> tuple[int, int]:
    """(bytes of 4 KiB blocks the tree's data needs, number of inodes), hard links counted once."""
    seen: set[tuple[int, int]] = set()
    blocks = 0
    inodes = 0
    for dirpath, dirnames, filenames in os.walk(rootfs):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]  # not walked into
        for entry in [dirpath] + [os.path.join(dirpath, n) for n in filenames + links]:
            st = os.lstat(entry)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                blocks += max(1, math.ceil(st.st_size / BLOCK))
            elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:  # longer targets leave the inode
                blocks += 1
    return blocks * BLOCK, inodes


def _mkfs(name: str, rootfs: Path, image: Path, work: Path, log: Path) -> None:
    """mkfs.ext4 -d: the tree becomes an ext4 file system in a plain file, no mount needed."""
    data, inodes = _usage(rootfs)
    inode_count = int(inodes * (1 + HEADROOM)) + 256
    size = math.ceil((data + inode_count * INODE_SIZE) * (1 + HEADROOM) / MIB) + 8  # + bitmaps, descriptors
    _step(name, f"writing the ext4 image ({size} MiB for {data // MIB} MiB in {inodes} files)")
    with open(image, "wb") as f:
        f.truncate(size * MIB)
    cmd = _fakeroot(work / "fakeroot.state", load=True) + [
        _tool("mkfs.ext4"), "-F", "-t", "ext4", "-b", str(BLOCK), "-I", str(INODE_SIZE), "-N", str(inode_count),
        "-m", "0", "-O", "^has_journal,^resize_inode,^metadata_csum", "-L", LABEL, "-E", "root_owner=0:0",
        "-d", str(rootfs), str(image),
    ]
    fsck = [_tool("e2fsck"), "-f", "-n", str(image)]
    for argv in (cmd, fsck):
        with open(log, "ab") as logf:
            logf.write(f"\n$ {' '.join(argv)}\n".encode())
            logf.flush()
            rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                env=tool_env()).returncode
        if rc != 0:
            raise ImageBuildError(f"`{' '.join(argv)}` failed (exit {rc}):\n{_log_tail(log, 20)}")


def _remove_tree(path: Path) -> None:
    """rm -rf that never leaves path's file system (a mount inside is an error) and copes with 0555 folders."""
    try:
        top = path.lstat()
    except FileNotFoundError:
        return

    def walk(p: str, dev: int) -> None:
        st = os.lstat(p)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(p)
            return
        if st.st_dev != dev:
            raise ImageError(f"{p} is a mount point inside a build folder: unmount it, then remove {path}")
        if st.st_mode & 0o700 != 0o700:
            os.chmod(p, 0o700)
        with os.scandir(p) as it:
            names = [e.path for e in it]
        for child in names:
            walk(child, dev)
        os.rmdir(p)

    walk(str(path), top.st_dev)


def _sweep_stale(root: Path) -> None:
    """Remove build folders (and their tmpfs trees) of builds whose process is gone (killed, power loss)."""
    entries = [(e, _TMP_RE.fullmatch(e.name)) for e in root.iterdir()] if root.is_dir() else []
    if TMPFS.is_dir():
        entries += [(e, _WORK_RE.fullmatch(e.name)) for e in TMPFS.iterdir() if e.name.startswith("smolvm-image.")]
    for entry, m in entries:
        if not m or int(m["pid"]) == os.getpid():
            continue
        try:
            os.kill(int(m["pid"]), 0)
            continue  # still building
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            _remove_tree(entry)
        except (OSError, ImageError) as e:
            progress(f"could not remove the stale build folder {entry}: {e}")


def _builder(name: str, packages: list[str], key: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        log = out / LOG_FILE
        start = time.monotonic()
        progress(f"building image {name!r} ({len(packages)} packages, Debian {SUITE}) with mmdebstrap; "
                 f"a few minutes on first use; log: {log}")
        work = Path(tempfile.mkdtemp(prefix=f"smolvm-image.{os.getpid()}.", dir=_scratch(out)))
        try:
            rootfs = _bootstrap(name, packages, work, log)
            _mkfs(name, rootfs, out / IMAGE_FILE, work, log)
        except ImageBuildError as e:
            kept = home() / "logs" / f"image-{name}.build.log"  # the build folder is about to go
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, kept)
            raise ImageBuildError(f"{e}\nfull log: {kept}") from None
        finally:
            _remove_tree(work)
        seconds = round(time.monotonic() - start, 1)
        size = (out / IMAGE_FILE).stat().st_size
        meta = {"name": name, "key": key, "packages": packages, "suite": SUITE, "arch": ARCH,
                "mmdebstrap": mmdebstrap_version(), "builder": BUILDER_VERSION, "label": LABEL,
                "size": size, "build_seconds": seconds, "built_at": int(time.time())}
        (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        progress(f"image {name!r} built in {seconds:.0f} s: {size // MIB} MiB")

    return build


def built_images() -> list[tuple[float, str, Path]]:
    """(completion time, name, folder) of every finished image."""
    root = home() / KIND
    found = []
    for d in root.iterdir() if root.is_dir() else []:
        done = d / ".complete"
        if d.name.startswith(".") or not done.exists() or not (d / IMAGE_FILE).exists():
            continue
        try:
            name = json.loads((d / META_FILE).read_text())["name"]
        except (OSError, ValueError, KeyError):
            name = d.name.rsplit("-", 1)[0]
        found.append((done.stat().st_mtime, name, d))
    return sorted(found)


def list_images() -> list[str]:
    """Names of the images built so far (in $SMOLVM_HOME/images)."""
    return sorted({name for _, name, _ in built_images()})


def _unknown(name: str) -> ImageNotFoundError:
    known = list_images()
    listing = ", ".join(known) if known else "none yet"
    if name == DEFAULT_IMAGE:
        return ImageNotFoundError(f"the default image is not built yet (built images: {listing}): "
                                  f"ensure_image() builds it")
    return ImageNotFoundError(
        f"no image named {name!r}; built images: {listing}. Build it with "
        f"`smolvm image build {name} --packages PKG ...` or ensure_image({name!r}, [packages])"
    )


def image_path(name: str = DEFAULT_IMAGE) -> Path:
    """The ext4 file of the newest finished image called name; never builds (see ensure_image)."""
    check_image_name(name)
    for _, got, folder in reversed(built_images()):
        if got == name:
            return folder / IMAGE_FILE
    raise _unknown(name)


def image_packages(name: str) -> list[str]:
    """The packages the newest finished image called name was built with."""
    folder = image_path(name).parent
    return list(json.loads((folder / META_FILE).read_text())["packages"])


def ensure_image(name: str = DEFAULT_IMAGE, packages: list[str] | None = None) -> Path:
    """Path of the finished ext4 image (read-only guest root) called name, built on first use.

    The default image's packages come from guest/image/packages.txt. A custom image needs its
    packages the first time; later calls without them reuse the ones it was built with.
    Images live in $SMOLVM_HOME/images/<name>-<key>/rootfs.ext4, key hashing all inputs.
    """
    check_image_name(name)
    if name == DEFAULT_IMAGE:
        if packages is not None:
            raise ValueError(f"{DEFAULT_IMAGE!r} is the built-in image: give a custom image another name")
        packages = default_packages()
    elif packages is None:
        packages = image_packages(name)  # raises, listing the built images, for an unknown name
    packages = _check_packages(packages)
    key = image_key(packages)
    final = home() / KIND / f"{name}-{key}"
    if (final / ".complete").exists() and (final / IMAGE_FILE).exists():
        return final / IMAGE_FILE
    _sweep_stale(home() / KIND)
    return cached(KIND, f"{name}-{key}", _builder(name, packages, key)) / IMAGE_FILE

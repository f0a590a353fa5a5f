"""How a VM starts: artifacts, cold-boot or restore argv, its disk, and base snapshots (base_key)."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import _validate, _vmm, disk, network, registry, snapshots
from .build._cache import progress
from .build.image import DEFAULT_IMAGE
from .errors import SmolVMError, SnapshotError, VMStartError
from .profile import Profile, kernel_cmdline

DEFAULT_MEMORY_MIB = 512  # SmolVM(memory=...)
DEFAULT_VCPUS = 1  # SmolVM(vcpus=...)
DEFAULT_DISK_MIB = 1024
IMAGE_ARG = "smolvm.image=vda"  # kernel command line: the agent mounts /dev/vda as the image


@dataclass(frozen=True)
class Machine:
    """What one VM is made of, as SmolVM.start() sees it."""

    vm_id: str
    files: registry.StateDir
    memory: int
    vcpus: int
    image: str | None
    disk_size: int | None
    net: network.NetworkPolicy
    profile: Profile
    persistent: bool  # the VMM daemonizes
    kernel: Path | None = None  # None: the built kernel, initramfs
    initrd: Path | None = None

    def common_argv(self) -> list[str]:
        return _vmm.common_argv(self.files, self.net, self.profile, self.persistent)


def image_and_disk(image: object, disk_size: object) -> tuple[str | None, int | None]:
    """SmolVM(image=, disk_size=) checked: (image name or None, disk MiB or None)."""
    if image is None:
        if disk_size is not None:
            raise ValueError(
                "disk_size needs an image: image=None runs the minimal busybox guest from RAM, "
                "without a disk"
            )
        return None, None
    if not isinstance(image, str):
        raise TypeError(f"image must be an image name (str) or None, not {type(image).__name__}")
    from .build.image import check_image_name, image_path

    check_image_name(image)
    if image != DEFAULT_IMAGE:
        image_path(image)  # an unknown image fails now, listing the built ones
    size = DEFAULT_DISK_MIB if disk_size is None else _validate.disk_size_mib(disk_size)
    return image, size


def artifacts(m: Machine) -> tuple[Path, Path, Path | None]:
    """Kernel, initramfs and root image (None without one), built on first use."""
    try:
        if m.kernel is not None:
            kernel = m.kernel
        else:
            from .build.kernel import ensure_kernel

            kernel = ensure_kernel() / "vmlinux"
        image_file = None
        if m.image is not None:
            from .build.image import ensure_image

            image_file = ensure_image(m.image)
        if m.initrd is not None:
            initrd = m.initrd
        else:
            from .build.initramfs import ensure_initramfs

            initrd = ensure_initramfs(with_busybox=m.image is None)
    except SmolVMError:
        raise
    except LookupError as e:
        raise VMStartError(str(e), vm_id=m.vm_id) from None
    except Exception as e:
        raise VMStartError(f"could not build the guest kernel, initramfs or image: {e}") from e
    return kernel, initrd, image_file


def boot_cmdline(profile: Profile, image_file: Path | None) -> str:
    """The kernel command line of a VM booted with (or without) a root image."""
    cmdline = kernel_cmdline(profile)
    return cmdline + " " + IMAGE_ARG if image_file is not None else cmdline


def base_key(
    kernel: Path, initrd: Path, image_file: Path | None, memory: int, vcpus: int, vmm: Path,
    profile: Profile, net: bool = True,
) -> str:  # fmt: skip
    """The key of the base snapshot of a configuration (the disk size is not part of it;
    with a network device or without is: a NIC is part of the booted machine)."""
    extra = [b"image:" + snapshots.file_ident(image_file)] if image_file is not None else []
    if profile.vmm_args:  # e.g. the compat guest kernel switches XSAVE state only with --xstate-port
        extra.append(b"vmm-args:" + " ".join(profile.vmm_args).encode())
    extra += [b"net:on"] if net else []
    return snapshots.base_key(
        kernel, initrd, boot_cmdline(profile, image_file), memory, vcpus, vmm, extra
    )


def base_dir(m: Machine, vmm: Path, kernel: Path, initrd: Path, image_file: Path | None) -> Path:
    """The base snapshot folder of the machine's configuration (maybe not made yet)."""
    key = base_key(kernel, initrd, image_file, m.memory, m.vcpus, vmm, m.profile, m.net.enabled)
    return snapshots.base_dir(key)


def base_usable(base: Path) -> bool:
    """Is the base snapshot there and sound? A damaged one is removed (the guest boots anew)."""
    if not snapshots.complete(base):
        return False
    why = snapshots.problem(base)
    if why is None:
        return True
    progress(f"the base snapshot {base} is damaged ({why}); removing it and booting")
    shutil.rmtree(base, ignore_errors=True)
    return False


def cold_argv(
    m: Machine, vmm: Path, kernel: Path, initrd: Path, image_file: Path | None, fresh_disk: bool
) -> list[str]:
    """A cold boot's argv (makes the state folder). fresh_disk: the VM's real disk; else an
    empty placeholder (base boots: the snapshot restores with a disk of any size)."""
    _vmm.check_uds(m.files)
    m.files.path.mkdir(parents=True, exist_ok=False)
    cmdline = boot_cmdline(m.profile, image_file)
    argv = _vmm.boot_argv(vmm, kernel, initrd, cmdline, m.memory, m.vcpus) + m.common_argv()
    if image_file is not None:
        argv += _vmm.disk_args(image_file, make_disk(m, None, fresh=fresh_disk))
    return argv


def restore_argv(m: Machine, vmm: Path, snap: Path) -> list[str]:
    """A restore's argv (makes the state folder, with a copy of a user snapshot's disk)."""
    _vmm.check_uds(m.files)
    meta = snapshots.read_meta(snap)
    image = meta.get("image")
    argv = _vmm.restore_argv(vmm, snap) + m.common_argv()
    if not isinstance(image, dict):
        m.files.path.mkdir(parents=True, exist_ok=False)
        return argv + memory_cache_args(m, snap)
    image_file = snapshot_image(image)
    if image_file is None:
        raise SnapshotError(
            f"snapshot {snap.name!r} was taken with the image {image.get('name')!r} at "
            f"{image.get('path', '')}, which has since been rebuilt or removed; take the snapshot again"
        )
    m.files.path.mkdir(parents=True, exist_ok=False)
    saved = snap / registry.DISK_FILE  # a user snapshot's disk; a base snapshot has none
    target = make_disk(m, saved if saved.exists() else None, fresh=True)
    return argv + memory_cache_args(m, snap) + _vmm.disk_args(image_file, target)


MEMORY_CACHE_DIR = "/run/smolvm-memcache"  # in the nested profile's host VM: a tmpfs (its own RAM)
EXTENTS_GAP = 64 << 10  # data ranges closer than this are copied (and mapped) as one


def memory_cache_args(m: Machine, snap: Path) -> list[str]:
    """In the nested profile, a base snapshot's memory (the default one's, a BrowserSession's)
    is copied once into the host VM's RAM and mapped from there (csrc/vmm/memcache.h): over 9p
    every page a restored guest touches first would be a 4 KiB read of ~2.6 ms. The host VM
    cannot see the file's holes through 9p, so the data ranges go along in a file.
    SMOLVM_MEMORY_CACHE=0 turns this off (benchmarks/bench_browser.py compares)."""
    if os.environ.get("SMOLVM_MEMORY_CACHE") == "0":
        return []
    if m.profile.name != "nested" or snap.parent.parent != snapshots.root() or snap.parent.name not in (
        ".base", ".browser"
    ):
        return []
    mem = snap / "memory.bin"
    ident = hashlib.sha256(snapshots.file_ident(mem)).hexdigest()[:16]
    where = hashlib.sha256(str(snap.resolve()).encode()).hexdigest()[:16]
    extents = m.files.path / "memory.extents"
    extents.write_text("".join(f"{off} {length}\n" for off, length in data_ranges(mem, EXTENTS_GAP)))
    return ["--memory-cache", f"{MEMORY_CACHE_DIR}/{where}-{ident}.mem", "--memory-extents", str(extents)]


def data_ranges(path: Path, gap: int = 0) -> list[tuple[int, int]]:
    """(offset, length) of a sparse file's data (SEEK_DATA/SEEK_HOLE), ranges less than gap apart merged."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after off
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            if out and data - (out[-1][0] + out[-1][1]) <= gap:
                out[-1] = (out[-1][0], hole - out[-1][0])
            else:
                out.append((data, hole - data))
            off = hole
    finally:
        os.close(fd)
    return out


def snapshot_image(image: dict[object, object]) -> Path | None:
    """The image file a snapshot was taken with, if it is still there unchanged: at the
    path recorded, or where the image of that name lives now (the same file reached
    through another $SMOLVM_HOME path, e.g. a symlinked cache)."""
    from .build.image import image_path

    candidates = [Path(str(image.get("path", "")))]
    name = image.get("name")
    if isinstance(name, str):
        try:
            candidates.insert(0, image_path(name))
        except (SmolVMError, ValueError, OSError):
            pass  # no image of that name now: only the recorded path can still match
    for cand in candidates:
        try:
            if snapshots.file_ident(cand).decode() == str(image.get("ident", "")):
                return cand
        except OSError:
            continue
    return None


def make_disk(m: Machine, saved: Path | None, fresh: bool) -> Path:
    """The VM's disk in its state folder: a copy of a snapshot's, a new one of disk_size
    MiB (fresh), or an empty placeholder. On failure the state folder goes too."""
    target = m.files.disk
    try:
        if saved is not None:
            disk.copy_sparse(saved, target)
        elif fresh:
            assert m.disk_size is not None
            disk.create(target, m.disk_size)
        else:
            disk.placeholder(target)
    except BaseException:
        shutil.rmtree(m.files.path, ignore_errors=True)
        raise
    return target


def meta(
    vm_id: str, memory: int, vcpus: int, profile: Profile | None, net: network.NetworkPolicy,
    image: str | None, disk_size: int | None,
) -> dict[str, object]:  # fmt: skip
    """What a snapshot of this VM records about it (snapshots.publish writes it)."""
    out: dict[str, object] = {
        "memory": memory, "vcpus": vcpus, "created": time.time(), "source_vm": vm_id,
        "profile": profile.name if profile else "", "network": net.to_dict(),
    }  # fmt: skip
    if image is not None:
        from .build.image import image_path

        path = image_path(image)
        out["image"] = {"name": image, "path": str(path.resolve()), "ident": snapshots.file_ident(path).decode()}
        out["disk_size"] = disk_size
    return out

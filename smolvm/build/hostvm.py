"""The nested profile's host VM: Debian's stock kernel and a small initramfs that loads kvm_amd and 9p.

The host VM runs no root file system of its own: its init mounts the host's `/` over 9p and
switches its root to it, so smolvm-hostd and the VMMs it starts see the same files at the same
paths as the Python process on the host (kernel, images, snapshots, VM folders).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import struct
import subprocess
from pathlib import Path

from .._process import tool_env
from ._cache import cached, digest, progress
from .initramfs import BUSYBOX, CpioEntry, newc_archive, read_busybox

KERNEL_META = "linux-image-amd64"  # Debian's metapackage: depends on the current stock kernel
VMLINUZ = "vmlinuz"
INITRD = "hostvm.cpio"
# Loaded in this order (their own dependencies first, found from each module's .modinfo).
MODULES = ("kvm_amd", "virtio_pci", "virtio_net", "9pnet_virtio", "9p")
WRITER_VERSION = b"hostvm-v3"

# The host VM's init: modules, the host's / over 9p with the host VM's own /dev, /proc, /sys
# and /run mounted in it, the network, then smolvm-hostd as PID 1 with the host's / as its root.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m || echo "smolvm-host: insmod $m failed"; done
for w in $(cat /proc/cmdline); do
  case $w in smolvm.hostd=*) HOSTD=${w#*=};; smolvm.token=*) TOKEN=${w#*=};;
    smolvm.idle=*) IDLE=${w#*=};; smolvm.ip=*) IP=${w#*=};; smolvm.images=*) IMAGES=${w#*=};; smolvm.gw=*) GW=${w#*=};; esac
done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=mmap hostroot /host || {
  echo "smolvm-host: cannot mount the host's / over 9p"; poweroff -f; }
# Root images never change once built: a read-only view that the host VM may cache (cache=loose),
# so each guest's reads of its image do not all cross 9p again.
[ -n "$IMAGES" ] && mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose,ro images "/host$IMAGES"
mount --bind /dev /host/dev
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t tmpfs -o mode=755 tmpfs /host/run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
ip link set lo up
ip link set eth0 up
ip addr add $IP/24 dev eth0
ip route add default via $GW
echo "smolvm-host: starting $HOSTD"
# switch_root, not chroot: a chrooted process may not create user namespaces, and passt does.
exec switch_root /host "$HOSTD" --listen $IP:7000 --token-file "$TOKEN" --idle "${IDLE:-0}"
"""


class HostVMBuildError(RuntimeError):
    pass


def _apt(args: list[str], cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=tool_env(), timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostVMBuildError(f"`{' '.join(args)}` failed: {e}") from None
    if res.returncode != 0:
        raise HostVMBuildError(f"`{' '.join(args)}` failed: {res.stderr.strip()[-800:]}")
    return res.stdout


def kernel_package() -> tuple[str, str]:
    """(package, version) of Debian's current stock kernel, from the local apt lists."""
    out = _apt(["apt-cache", "depends", KERNEL_META])
    m = re.search(r"Depends:\s*(linux-image-[\w.+-]+)", out)
    if not m:
        raise HostVMBuildError(
            f"apt does not know {KERNEL_META}: run `apt-get update` (the nested profile boots "
            "Debian's stock kernel in its host VM)"
        )
    pkg = m.group(1)
    policy = _apt(["apt-cache", "policy", pkg])
    v = re.search(r"Candidate:\s*(\S+)", policy)
    return pkg, v.group(1) if v else "unknown"


def _modinfo_depends(ko: bytes) -> list[str]:
    """The `depends=` list of a kernel module, read from its ELF .modinfo section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        return []
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = sections[shstrndx][4]
    for name_off, _type, _flags, _addr, off, size in sections:
        end = ko.index(b"\0", strtab_off + name_off)
        if ko[strtab_off + name_off : end] == b".modinfo":
            for item in ko[off : off + size].split(b"\0"):
                if item.startswith(b"depends="):
                    return [d for d in item[8:].decode().split(",") if d]
    return []


def module_order(moddir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files for wanted and everything they depend on, dependencies first."""
    by_name = {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        path = by_name.get(name)
        if path is None:
            raise HostVMBuildError(f"kernel module {name} is not in {moddir}")
        for dep in _modinfo_depends(path.read_bytes()):
            visit(dep)
        order.append(path)

    for w in wanted:
        visit(w)
    return order


def _entries(moddir: Path) -> list[CpioEntry]:
    d = stat.S_IFDIR | 0o755
    ents = [CpioEntry(n, d) for n in ("bin", "lib", "lib/modules", "proc", "sys", "dev", "host", "tmp")]
    ents.append(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, read_busybox()))
    ents.append(CpioEntry("init", stat.S_IFREG | 0o755, INIT.encode()))
    mods = module_order(moddir, MODULES)
    for ko in mods:
        ents.append(CpioEntry(f"lib/modules/{ko.name}", stat.S_IFREG | 0o644, ko.read_bytes()))
    names = "".join(ko.name + "\n" for ko in mods)
    ents.append(CpioEntry("lib/modules/order", stat.S_IFREG | 0o644, names.encode()))
    return sorted(ents, key=lambda e: e.name.split("/"))


def hostvm_key(pkg: str, version: str) -> str:
    return digest([WRITER_VERSION, pkg.encode(), version.encode(), INIT.encode(), BUSYBOX.read_bytes()])


def ensure_hostvm() -> Path:
    """Folder holding the host VM's kernel (vmlinuz) and initramfs, downloaded and written once."""
    if not shutil.which("apt-get"):
        raise HostVMBuildError("the nested profile needs Debian's apt-get to fetch the host VM's kernel")
    pkg, version = kernel_package()

    def build(out: Path) -> None:
        progress(f"fetching {pkg} {version} for the nested profile's host VM")
        work = out / "deb"
        work.mkdir()
        _apt(["apt-get", "download", f"{pkg}={version}"], cwd=work)
        debs = list(work.glob("*.deb"))
        if not debs:
            raise HostVMBuildError(f"apt-get download {pkg} left no .deb in {work}")
        root = out / "root"
        _apt(["dpkg-deb", "-x", str(debs[0]), str(root)])
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        moddirs = sorted((root / "lib/modules").glob("*"))
        if not vmlinuz or not moddirs:
            raise HostVMBuildError(f"{debs[0].name} holds no vmlinuz or modules")
        progress("writing the host VM's initramfs")
        (out / INITRD).write_bytes(newc_archive(_entries(moddirs[0])))
        os.replace(vmlinuz[0], out / VMLINUZ)
        shutil.rmtree(work)
        shutil.rmtree(root)

    return cached("hostvm", hostvm_key(pkg, version), build)

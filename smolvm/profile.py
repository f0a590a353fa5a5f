"""Host detection and the guest kernel command line: the compat profile for hosts whose KVM emulates ring 0."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Arguments every guest boots with. lpj= (added by kernel_cmdline) skips the delay-loop calibration.
BASE_ARGS: tuple[str, ...] = (
    "console=ttyS0",
    "reboot=k",
    "panic=-1",
    "pci=off",
    "nomodules",
    "8250.nr_uarts=1",
    "rdinit=/init",
    "tsc=reliable",
    "no_timer_check",
)

# What got Linux 6.1 through on a KVM that emulates guest ring 0 (see shared/pvm-notes.md).
# The kernel keeps only the first ~128 characters of clearcpuid=: keep the list short.
# AVX and AVX-512 stay: guest user space uses them natively whatever the kernel is told, so
# the kernel keeps XSAVE and switches that state through the VMM (`--xstate-port`; the
# kernel patch 0002 also drops XSAVES/XSAVEC/XSAVEOPT/XGETBV1/PKU under smolvm_compat).
COMPAT_CLEARCPUID = (
    "cx16,popcnt,erms,fsrm,rep_good,smap,smep,pcid,invpcid,fsgsbase,"
    "rdrand,rdseed,rdpid,bmi1,bmi2"
)
COMPAT_ARGS: tuple[str, ...] = ("smolvm_compat", f"clearcpuid={COMPAT_CLEARCPUID}")
# What the VMM must do for such a guest: serve the kernel's XSAVE/XRSTOR requests (csrc/vmm/xstate.h).
COMPAT_VMM_ARGS: tuple[str, ...] = ("--xstate-port",)

# CONFIG_HZ of our guest kernel (CONFIG_HZ_100 in kernel-config/smolvm.config).
KERNEL_HZ = 100

PROFILES = ("native", "compat", "nested")


@dataclass(frozen=True)
class Profile:
    """The active profile: `name` ("native", "compat" or "nested"), why it was chosen, its extra boot args.

    nested: the VMMs run inside a host VM with a real KVM (smolvm/hostvm.py); the guests
    there boot exactly as under native.
    """

    name: str
    reason: str
    extra_args: tuple[str, ...]
    vmm_args: tuple[str, ...] = ()

    @property
    def compat(self) -> bool:
        return self.name == "compat"

    @property
    def nested(self) -> bool:
        return self.name == "nested"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first CPU listed in /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_mhz(cpuinfo: str) -> float | None:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class HostInfo:
    """What the host offers: kind is "VT-x", "AMD-V", "PVM" or "unknown"."""

    kind: str
    detail: str
    kvm_present: bool
    pvm_loaded: bool
    flags: frozenset[str]


def host_info(root: Path = Path("/")) -> HostInfo:
    """Look at /dev/kvm, /sys/module/kvm_pvm and /proc/cpuinfo under root."""
    kvm_present = (root / "dev/kvm").exists()
    pvm_loaded = (root / "sys/module/kvm_pvm").exists()
    flags = frozenset(cpu_flags(_read(root / "proc/cpuinfo")))
    if pvm_loaded:
        return HostInfo("PVM", "kvm_pvm module loaded (/sys/module/kvm_pvm)", kvm_present, True, flags)
    if "vmx" in flags:
        return HostInfo("VT-x", "vmx flag in /proc/cpuinfo", kvm_present, False, flags)
    if "svm" in flags:
        return HostInfo("AMD-V", "svm flag in /proc/cpuinfo", kvm_present, False, flags)
    if kvm_present:
        return HostInfo(
            "PVM",
            "/dev/kvm exists but /proc/cpuinfo has no vmx/svm: KVM without hardware "
            "virtualization (PVM-style, emulating guest ring 0)",
            True,
            False,
            flags,
        )
    return HostInfo("unknown", "no /dev/kvm and no vmx/svm flag in /proc/cpuinfo", False, False, flags)


NESTED_WHY = (
    "runs the VMMs in a host VM (QEMU TCG with AMD-V and nested paging) whose KVM is real: "
    "guest kernel work there is 10-100x cheaper than under compat, pure user-space loops a few "
    "times dearer"
)


def _nested_unavailable() -> str | None:
    from .hostvm import unavailable_reason

    return unavailable_reason()


def detect(
    env: Mapping[str, str] | None = None,
    root: Path = Path("/"),
    nested_unavailable: Callable[[], str | None] = _nested_unavailable,
) -> Profile:
    """The profile to boot with: SMOLVM_PROFILE=native|compat|nested forces one, else the host decides.

    VT-x/AMD-V: native. A KVM that emulates guest ring 0, or no /dev/kvm at all: nested when
    QEMU can run it (see smolvm/hostvm.py), else compat (emulating KVM) or native (nothing
    better to try; starting a VM then says /dev/kvm is missing).
    """
    env = os.environ if env is None else env
    forced = env.get("SMOLVM_PROFILE", "").strip()
    if forced:
        if forced not in PROFILES:
            raise ValueError(
                f"SMOLVM_PROFILE={forced!r} is not a profile: use one of {', '.join(PROFILES)}"
            )
        return _make(forced, f"forced by SMOLVM_PROFILE={forced}")
    host = host_info(root)
    if host.kind == "PVM" or not host.kvm_present:
        why_not = nested_unavailable()
        if why_not is None:
            return _make("nested", f"{host.detail}; nested profile: {NESTED_WHY}")
        if host.kind == "PVM":
            return _make(
                "compat",
                f"{host.detail}; guest ring 0 is emulated, so the kernel needs workarounds "
                f"(nested profile unavailable: {why_not})",
            )
    if host.kind in ("VT-x", "AMD-V"):
        return _make("native", f"hardware virtualization ({host.kind}: {host.detail})")
    return _make("native", f"host kind unknown ({host.detail}); assuming hardware virtualization")


def _make(name: str, reason: str) -> Profile:
    compat = name == "compat"
    return Profile(
        name=name,
        reason=reason,
        extra_args=COMPAT_ARGS if compat else (),
        vmm_args=COMPAT_VMM_ARGS if compat else (),
    )


def lpj_arg(root: Path = Path("/")) -> str | None:
    """`lpj=N` from the host's CPU clock (loops per jiffy = Hz / HZ), or None if unknown."""
    mhz = cpu_mhz(_read(root / "proc/cpuinfo"))
    if not mhz or mhz <= 0:
        return None
    return f"lpj={int(mhz * 1_000_000 / KERNEL_HZ)}"


def kernel_cmdline(
    profile: Profile,
    *,
    env: Mapping[str, str] | None = None,
    root: Path = Path("/"),
) -> str:
    """Base args + lpj + the profile's args + $SMOLVM_CMDLINE_EXTRA. The VMM adds its virtio_mmio.device= args."""
    env = os.environ if env is None else env
    args = list(BASE_ARGS)
    lpj = lpj_arg(root)
    if lpj:
        args.append(lpj)
    args += profile.extra_args
    extra = env.get("SMOLVM_CMDLINE_EXTRA", "").split()
    args += extra
    return " ".join(args)

"""Is KVM usable here? Checks /dev/kvm and explains how to fix it when it is not."""

from __future__ import annotations

import errno
import os
from typing import Any

from ._native import native
from .errors import KVMUnavailableError

KVM_PATH = "/dev/kvm"

_MISSING = (
    "/dev/kvm does not exist: this machine offers no KVM. Enable hardware virtualization "
    "(VT-x/AMD-V in the firmware, or nested virtualization for a cloud VM), then load the "
    "module: `modprobe kvm_intel` (Intel) or `modprobe kvm_amd` (AMD)."
)
_DENIED = (
    "no permission to open /dev/kvm: run as a user in group kvm "
    "(`sudo usermod -aG kvm $USER`, then log in again) or as root."
)


def check_kvm(path: str = KVM_PATH) -> None:
    """Raise KVMUnavailableError (with the fix) unless path opens read/write."""
    if not os.path.exists(path):
        raise KVMUnavailableError(_MISSING)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        raise KVMUnavailableError(_DENIED) from None
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENODEV):
            raise KVMUnavailableError(
                f"{path} exists but no KVM module is behind it ({e.strerror}): load kvm_intel "
                "or kvm_amd (`modprobe kvm_intel` / `modprobe kvm_amd`)"
            ) from None
        raise KVMUnavailableError(f"cannot open {path}: {e.strerror}") from None
    os.close(fd)


def kvm_info() -> dict[str, Any]:
    """API version and capabilities from the C extension; raises KVMUnavailableError."""
    check_kvm()
    try:
        return dict(native().kvm_info())
    except OSError as e:
        raise KVMUnavailableError(f"cannot query {KVM_PATH}: {e.strerror}") from None

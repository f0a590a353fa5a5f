"""Host ports into the guest: the VMM's 127.0.0.1 listeners (csrc/vmm/portfwd.c), driven over its control socket."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from . import _ctl
from .errors import SmolVMError

CTL_TIMEOUT_S = 10.0


class PortInUseError(SmolVMError, OSError):
    """The host port asked for is taken on 127.0.0.1 (by another program or another forward)."""


class PortNotExposedError(SmolVMError, LookupError):
    """unexpose_local() named a port this VM does not forward."""


class ExposedPort(NamedTuple):
    """One forward: connections to 127.0.0.1:host_port reach the guest's 127.0.0.1:guest_port."""

    host_port: int
    guest_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.host_port}/"


def port_number(name: str, value: Any, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int TCP port, not {type(value).__name__}")
    lo = 0 if allow_zero else 1
    if not lo <= value <= 65535:
        raise ValueError(f"{name} must be a TCP port between {lo} and 65535, got {value}")
    return value


def expose(ctl: Path, vm_id: str, guest_port: int, host_port: int | None) -> int:
    """Ask the VMM to listen on 127.0.0.1:host_port (None: a free port) for guest_port; the host port."""
    guest = port_number("guest_port", guest_port)
    host = 0 if host_port is None else port_number("host_port", host_port)
    try:
        for _ in range(8 if host == 0 else 1):
            got = int(_ctl.command(ctl, f"FWD ADD {guest} {host}", CTL_TIMEOUT_S))
            if _host_listen(ctl, got):
                return got
            _ctl.command(ctl, f"FWD DEL {got}", CTL_TIMEOUT_S)  # free in the host VM, taken here: again
        raise _ctl.ControlError("Address already in use")
    except _ctl.ControlError as e:
        if "in use" in str(e):
            raise PortInUseError(
                f"host port {host} is already in use on 127.0.0.1 (by another program or another "
                f"forward); pick another host_port, or pass host_port=None to get a free one"
            ) from None
        if "No space" in str(e):
            raise SmolVMError(
                f"VM {vm_id} already forwards the most ports it can (64); unexpose_local() some first"
            ) from None
        if "Permission denied" in str(e):
            raise SmolVMError(
                f"host port {host} is privileged (below 1024) and this process may not bind it; "
                "use a port of 1024 or above, or host_port=None"
            ) from None
        raise SmolVMError(f"VM {vm_id}: could not expose guest port {guest}: {e}") from None


def exposed(ctl: Path) -> list[ExposedPort]:
    """The VM's forwards, in the order they were made."""
    out: list[ExposedPort] = []
    for pair in _ctl.command(ctl, "FWD LIST", CTL_TIMEOUT_S).split():
        host, _, guest = pair.partition(":")
        out.append(ExposedPort(int(host), int(guest)))
    return out


def unexpose(ctl: Path, vm_id: str, port: int, guest_port: int | None = None) -> list[ExposedPort]:
    """Close the listeners that match; returns what was removed.

    (host_port, guest_port): that forward. One number: the forward on that host port, or,
    if there is none, every forward of that guest port.
    """
    port = port_number("port", port)
    if guest_port is not None:
        guest_port = port_number("guest_port", guest_port)
    current = exposed(ctl)
    if guest_port is not None:
        gone = [f for f in current if f.host_port == port and f.guest_port == guest_port]
    else:
        gone = [f for f in current if f.host_port == port] or [f for f in current if f.guest_port == port]
    if not gone:
        what = f"host port {port} to guest port {guest_port}" if guest_port is not None else f"port {port}"
        listing = ", ".join(f"{f.host_port}->{f.guest_port}" for f in current) or "none"
        raise PortNotExposedError(
            f"VM {vm_id} does not forward {what} (its forwards, host->guest: {listing}); "
            "exposed_ports() lists them"
        )
    relay = _relay(ctl)
    for f in gone:
        try:
            _ctl.command(ctl, f"FWD DEL {f.host_port}", CTL_TIMEOUT_S)
        except _ctl.ControlError:
            pass  # removed meanwhile by another process
        if relay is not None:
            _ctl.command(relay, f"UNLISTEN {f.host_port}", CTL_TIMEOUT_S)
    return gone


def _relay(ctl: Path) -> Path | None:
    """The nested profile's relay beside a VM's control socket (csrc/nested/relay.c), if any."""
    relay = ctl.parent / "relay.sock"
    return relay if relay.exists() else None


def _host_listen(ctl: Path, port: int) -> bool:
    """Nested profile: the VMM listens inside the host VM, so the relay listens on the host too.

    False if the port is taken on the host. Without a relay (native, compat) the VMM's own
    listener is on the host already: True.
    """
    relay = _relay(ctl)
    if relay is None:
        return True
    try:
        _ctl.command(relay, f"LISTEN {port}", CTL_TIMEOUT_S)
    except _ctl.ControlError as e:
        if "in use" in str(e):
            return False
        raise
    return True

"""Guest networking: the policy a VM is created with, passt (the VMM's backend) and the guest's fixed addressing."""

from __future__ import annotations

import ipaddress
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SmolVMError

# Every VM has the same addresses, like QEMU's user networking; passt maps the gateway to
# the host's loopback, so host.smolvm.internal (= the gateway) reaches host services on 127.0.0.1.
GUEST_ADDR = "10.0.2.15"
PREFIX = 24
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
MTU = 65520  # csrc/vmm/virtio/net.h NET_MTU
HOST_ALIAS = "host.smolvm.internal"
SETUP_NET = 1 << 8  # csrc/proto.h SMOLVM_SETUP_NET
MAX_HOSTS_TEXT = 16 << 10  # csrc/proto.h SMOLVM_SETUP_MAX_HOSTS
INSTALL_HINT = "apt-get install passt"
MODES = ("open", "off")
_NAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*$")


class NetworkUnavailableError(SmolVMError):
    """The VM wants a network but its backend (passt) is missing or does not work here."""


@dataclass(frozen=True)
class NetworkPolicy:
    """What a VM may reach. Fixed when the VM is created; kept in its record and snapshots."""

    mode: str = "open"  # "open": egress allowed; "off": no network device at all
    extra_hosts: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "extra_hosts": dict(self.extra_hosts)}

    @classmethod
    def from_dict(cls, data: object) -> NetworkPolicy:
        """A policy read back from a record or snapshot; anything unreadable means no network."""
        if not isinstance(data, dict) or data.get("mode") not in MODES:
            return cls(mode="off")
        hosts = data.get("extra_hosts") or {}
        if not isinstance(hosts, dict):
            hosts = {}
        return cls(mode=str(data["mode"]), extra_hosts=tuple(sorted((str(k), str(v)) for k, v in hosts.items())))


def policy(internet: object, internet_settings: object, extra_hosts: object) -> NetworkPolicy:
    """Check SmolVM's network arguments and make the policy (errors say what is allowed)."""
    if not isinstance(internet, bool):
        raise TypeError(f"internet must be True or False, not {type(internet).__name__}")
    mode = "open" if internet else "off"
    if internet_settings is not None:
        if not isinstance(internet_settings, Mapping):
            raise TypeError(
                "internet_settings must be a dict such as {'mode': 'off'}, not "
                f"{type(internet_settings).__name__}"
            )
        unknown = sorted(set(internet_settings) - {"mode", "allowed_domains", "allowed_cidrs"})
        if unknown:
            raise ValueError(
                f"internet_settings: unknown key(s) {', '.join(map(repr, unknown))}; "
                "known: 'mode', 'allowed_domains', 'allowed_cidrs'"
            )
        want = internet_settings.get("mode", "open")
        if want not in MODES:
            raise ValueError(f"internet_settings['mode'] must be one of {', '.join(map(repr, MODES))}, got {want!r}")
        if internet_settings.get("allowed_domains") or internet_settings.get("allowed_cidrs"):
            raise NetworkUnavailableError(
                "internet_settings allow-lists (allowed_domains, allowed_cidrs) are not supported by this "
                "smolvm yet; use {'mode': 'open'} or {'mode': 'off'}"
            )
        if not internet and want != "off":
            raise ValueError("internet=False conflicts with internet_settings['mode'] = "
                             f"{want!r}; give one of them")  # fmt: skip
        mode = want
    hosts = _extra_hosts(extra_hosts)
    if hosts and mode == "off":
        raise ValueError("extra_hosts needs a network: this VM has none (internet=False or mode 'off')")
    return NetworkPolicy(mode=mode, extra_hosts=hosts)


def _extra_hosts(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise TypeError(f"extra_hosts must be a dict of name -> IPv4 address, not {type(value).__name__}")
    out: dict[str, str] = {}
    for name, addr in value.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"extra_hosts: {name!r} is not a host name (letters, digits, '-', '.')")
        if name.lower() == HOST_ALIAS:
            raise ValueError(f"extra_hosts: {HOST_ALIAS} is built in (the host's loopback); pick another name")
        try:
            ip = ipaddress.IPv4Address(addr) if isinstance(addr, str) else None
        except ValueError:
            ip = None
        if ip is None:
            raise ValueError(f"extra_hosts[{name!r}]: {addr!r} is not an IPv4 address (the guest has no IPv6)")
        out[name] = str(ip)
    text = "".join(f"{ip}\t{name}\n" for name, ip in out.items())
    if len(text.encode()) > MAX_HOSTS_TEXT:
        raise ValueError(f"extra_hosts: too many entries ({len(out)}); they must fit in {MAX_HOSTS_TEXT} bytes")
    return tuple(sorted(out.items()))


def passt_path() -> Path:
    """The passt executable, or NetworkUnavailableError naming the package."""
    found = shutil.which("passt")
    if found is None:
        raise NetworkUnavailableError(
            f"this VM has networking on, but passt (its user-mode network backend) is not installed: "
            f"`{INSTALL_HINT}`, or create the VM with internet=False"
        )
    return Path(found)


def passt_argv(pol: NetworkPolicy, nested: bool = False) -> list[str]:
    """passt's command line (the VMM adds --fd). No DHCP or router adverts: the agent sets the addresses.

    nested: passt runs inside the host VM (smolvm/hostvm.py), whose own network is QEMU's
    user networking on the same 10.0.2.0/24 with the host's loopback at 10.0.2.2. passt then
    leaves the gateway unmapped, so host.smolvm.internal reaches the real host's loopback
    through QEMU rather than the host VM's own.
    """
    argv = [
        str(passt_path()), "--foreground", "--quiet", "--ipv4-only",
        "--address", GUEST_ADDR, "--netmask", str(PREFIX), "--gateway", GATEWAY,
        "--dns-forward", DNS, "--no-dhcp", "--no-dhcpv6", "--no-ndp", "--no-ra",
        "--tcp-ports", "none", "--udp-ports", "none",
    ]  # fmt: skip
    return argv + ["--no-map-gw"] if nested else argv


def vmm_args(pol: NetworkPolicy, nested: bool = False) -> list[str]:
    """smolvm-vmm arguments: none without a network, else passt's command line as --net-passt words."""
    if not pol.enabled:
        return []
    out: list[str] = []
    for word in passt_argv(pol, nested):
        out += ["--net-passt", word]
    return out


def setup_data(pol: NetworkPolicy) -> bytes:
    """struct smolvm_setup_net and the extra /etc/hosts lines, for SETUP."""
    hosts = "".join(f"{ip}\t{name}\n" for name, ip in pol.extra_hosts).encode()
    return struct.pack(
        "<4s4s4sBBHI", socket.inet_aton(GUEST_ADDR), socket.inet_aton(GATEWAY), socket.inet_aton(DNS),
        PREFIX, 0, MTU, len(hosts),
    ) + hosts  # fmt: skip


def check_passt() -> tuple[bool, str]:
    """(works, what was seen) for `smolvm doctor`: passt starts on a socket and ends when it closes."""
    try:
        path = passt_path()
    except NetworkUnavailableError:
        return False, f"not installed (`{INSTALL_HINT}`); VMs then need internet=False"
    a, b = socket.socketpair()
    try:
        argv = passt_argv(NetworkPolicy())
        proc = subprocess.Popen(
            [*argv, "--fd", str(b.fileno())], pass_fds=[b.fileno()],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
    except OSError as e:
        a.close()
        b.close()
        return False, f"{path} does not start: {e}"
    b.close()
    time.sleep(0.3)
    early = proc.poll()
    a.close()
    try:
        _, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return False, f"{path} did not exit when its socket closed"
    if early is not None:
        lines = [ln for ln in err.decode(errors="replace").splitlines() if "syslog" not in ln and "root" not in ln]
        return False, f"{path} exited at once (status {early}): {' '.join(lines)[:300]}"
    return True, f"{path} works"

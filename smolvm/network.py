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
MODES = ("open", "off", "restricted")
MAX_RULES = 256  # csrc/vmm/net_filter.h NETF_MAX_DOMAINS / NETF_MAX_CIDRS / NETF_MAX_HOSTS
DNS_TTL_S = 300  # csrc/vmm/net_filter.h NETF_TTL_S: getaddrinfo gives no TTL
_NAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*$")


class NetworkUnavailableError(SmolVMError):
    """The VM wants a network but its backend (passt) is missing or does not work here."""


@dataclass(frozen=True)
class NetworkPolicy:
    """What a VM may reach. Fixed when the VM is created; kept in its record and snapshots."""

    mode: str = "open"  # "open": egress allowed; "off": no network device; "restricted": the allow-lists
    extra_hosts: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    allowed_domains: tuple[str, ...] = ()  # "restricted": names the VMM's DNS answers ("name", "*.name")
    allowed_cidrs: tuple[str, ...] = ()  # "restricted": IPv4 networks reachable without a DNS answer

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def restricted(self) -> bool:
        return self.mode == "restricted"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "extra_hosts": dict(self.extra_hosts)}
        if self.restricted:
            out["allowed_domains"] = list(self.allowed_domains)
            out["allowed_cidrs"] = list(self.allowed_cidrs)
        return out

    @classmethod
    def from_dict(cls, data: object) -> NetworkPolicy:
        """A policy read back from a record or snapshot; anything unreadable means no network (fail closed)."""
        if not isinstance(data, dict) or data.get("mode") not in MODES:
            return cls(mode="off")
        settings = {k: data[k] for k in ("mode", "allowed_domains", "allowed_cidrs") if k in data}
        try:
            return policy(data["mode"] != "off", settings, data.get("extra_hosts") or None)
        except (TypeError, ValueError):
            return cls(mode="off")


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
        lists = "allowed_domains" in internet_settings or "allowed_cidrs" in internet_settings
        want = internet_settings.get("mode", "restricted" if lists else "open")
        if want not in MODES:
            raise ValueError(f"internet_settings['mode'] must be one of {', '.join(map(repr, MODES))}, got {want!r}")
        if lists and want != "restricted":
            raise ValueError(
                f"internet_settings: allowed_domains / allowed_cidrs need mode 'restricted' (or no mode), "
                f"not {want!r}; drop the lists or the mode"
            )
        if not internet and want != "off":
            raise ValueError("internet=False conflicts with internet_settings['mode'] = "
                             f"{want!r}; give one of them")  # fmt: skip
        mode = want
    hosts = _extra_hosts(extra_hosts)
    if hosts and mode == "off":
        raise ValueError("extra_hosts needs a network: this VM has none (internet=False or mode 'off')")
    if mode != "restricted":
        return NetworkPolicy(mode=mode, extra_hosts=hosts)
    assert isinstance(internet_settings, Mapping)
    domains = _domains(internet_settings.get("allowed_domains", ()))
    cidrs = _cidrs(internet_settings.get("allowed_cidrs", ()))
    if not domains and not cidrs:
        raise ValueError(
            "internet_settings mode 'restricted' needs allowed_domains or allowed_cidrs; "
            "use {'mode': 'off'} for no network at all"
        )
    return NetworkPolicy(mode=mode, extra_hosts=hosts, allowed_domains=domains, allowed_cidrs=cidrs)


def _string_list(key: str, value: object) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"internet_settings[{key!r}] must be a list of strings, not {value!r}")
    if len(value) > MAX_RULES:
        raise ValueError(f"internet_settings[{key!r}]: {len(value)} entries; at most {MAX_RULES}")
    return list(value)


def _domains(value: object) -> tuple[str, ...]:
    """allowed_domains: host names, or "*.name" for every name below name (not name itself)."""
    out: list[str] = []
    for entry in _string_list("allowed_domains", value):
        name = entry.strip().lower().rstrip(".")
        bare = name[2:] if name.startswith("*.") else name
        if not _NAME_RE.match(bare) or "*" in bare or bare.startswith("-"):
            hint = " ('*' alone would allow everything: use mode 'open')" if name == "*" else ""
            raise ValueError(
                f"internet_settings['allowed_domains']: {entry!r} is not a host name or '*.' + host name "
                f"(e.g. 'api.example.com', '*.example.org'){hint}"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def _cidrs(value: object) -> tuple[str, ...]:
    """allowed_cidrs: IPv4 addresses or networks written from their first address."""
    out: list[str] = []
    for entry in _string_list("allowed_cidrs", value):
        try:
            net = ipaddress.ip_network(entry.strip())
        except ValueError:
            try:
                fixed = ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"internet_settings['allowed_cidrs']: {entry!r} is not an IPv4 address or network "
                    "(e.g. '10.0.2.2' or '192.0.2.0/24')"
                ) from None
            raise ValueError(
                f"internet_settings['allowed_cidrs']: {entry!r} has host bits set; write {str(fixed)!r}"
            ) from None
        if net.version != 4:
            raise ValueError(f"internet_settings['allowed_cidrs']: {entry!r} is IPv6; the guest has IPv4 only")
        if str(net) not in out:
            out.append(str(net))
    return tuple(out)


def gateway_allowed(pol: NetworkPolicy) -> bool:
    """Does a restricted policy let the guest reach the gateway (host.smolvm.internal)?"""
    gw = ipaddress.IPv4Address(GATEWAY)
    return any(gw in ipaddress.ip_network(c) for c in pol.allowed_cidrs) or any(
        _pattern_matches(p, HOST_ALIAS) for p in pol.allowed_domains
    )


def _pattern_matches(pattern: str, name: str) -> bool:
    """csrc/vmm/dns.c dns_name_match: "*.x" matches names below x, not x itself."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return pattern == name


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
    if pol.restricted:
        out.append("--net-filter")
        for d in pol.allowed_domains:
            out += ["--net-allow-domain", d]
        for c in pol.allowed_cidrs:
            out += ["--net-allow-cidr", c]
        if any(_pattern_matches(p, HOST_ALIAS) for p in pol.allowed_domains):
            # the guest finds host.smolvm.internal in its /etc/hosts, never asking the VMM's DNS
            out += ["--net-allow-cidr", f"{GATEWAY}/32"]
        for name, ip in pol.extra_hosts:
            out += ["--net-host", f"{name.lower()}={ip}"]
    return out


def setup_data(pol: NetworkPolicy) -> bytes:
    """struct smolvm_setup_net and the extra /etc/hosts lines, for SETUP.

    A restricted VM's extra_hosts stay out of its /etc/hosts: the VMM's DNS answers them
    (if allowed_domains lets it), so that the answer opens the address.
    """
    lines = "" if pol.restricted else "".join(f"{ip}\t{name}\n" for name, ip in pol.extra_hosts)
    hosts = lines.encode()
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

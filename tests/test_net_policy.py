"""Egress allow-lists enforced by the VMM: real VMs, real passt, traffic only to servers on the host's loopback.

Every name here is given with extra_hosts (pointing at the gateway, which passt maps to the host's
loopback), so no lookup leaves the machine; "localhost" exercises the VMM's getaddrinfo thread,
which the host answers from its /etc/hosts. Blocked and allowed are told apart by the errors the
guest sees (connection refused = the VMM's RST, EAI_NONAME = NXDOMAIN), never by timing.
"""

from __future__ import annotations

import http.server
import json
import shlex
import threading
from collections.abc import Iterator

import pytest

from smolvm import SmolVM, snapshots
from smolvm.network import GATEWAY, HOST_ALIAS

T = 600  # generous: nested guests on a loaded 2-core host start programs slowly (no timing is asserted)

# Runs in the guest: each argument is "dns:NAME" (getaddrinfo), "tcp:HOST:PORT" (connect, GET /)
# or "raw:NAME" (one A query straight to the VMM's DNS address); prints one JSON result per line.
PROBE = r"""
import json, socket, struct, sys
for arg in sys.argv[1:]:
    kind, _, rest = arg.partition(":")
    try:
        if kind == "dns":
            out = sorted({a[4][0] for a in socket.getaddrinfo(rest, 80, socket.AF_INET, socket.SOCK_STREAM)})
        elif kind == "tcp":
            host, port = rest.rsplit(":", 1)
            s = socket.create_connection((host, int(port)), timeout=30)
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):  # HTTP/1.0: to EOF (headers and body may come apart)
                data += chunk
            out = data.decode(errors="replace").split("\r\n\r\n", 1)[-1]
            s.close()
        else:
            q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
            q += b"".join(bytes([len(l)]) + l.encode() for l in rest.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.settimeout(30)
            u.sendto(q, ("10.0.2.3", 53))
            a = u.recv(600)
            n = struct.unpack(">H", a[6:8])[0]
            out = {"rcode": a[3] & 15, "id": struct.unpack(">H", a[:2])[0],
                   "addrs": [socket.inet_ntoa(a[-4 - 16 * i:len(a) - 16 * i]) for i in range(n)]}
        print(json.dumps({"arg": arg, "ok": out}))
    except Exception as e:
        print(json.dumps({"arg": arg, "err": type(e).__name__, "errno": getattr(e, "errno", None)}))
"""


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = self.server.body  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(body: bytes) -> tuple[http.server.ThreadingHTTPServer, int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    srv.body = body  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[int, int]]:
    """Two loopback servers: the one the allowed name is for, and a second one for the blocked name."""
    a, pa = _serve(b"allowed service\n")
    b, pb = _serve(b"blocked service\n")
    yield pa, pb
    for s in (a, b):
        s.shutdown()
        s.server_close()


def probe(vm: SmolVM, *args: str) -> dict[str, dict[str, object]]:
    r = vm.run("python3 -c " + shlex.quote(PROBE) + " " + " ".join(map(shlex.quote, args)), timeout=T)
    assert r.ok, r.stderr
    return {d["arg"]: d for d in map(json.loads, r.stdout.splitlines())}


def refused(res: dict[str, object]) -> bool:
    return res.get("err") == "ConnectionRefusedError"


def nxdomain(res: dict[str, object]) -> bool:
    return res.get("err") == "gaierror" and res.get("errno") == -2  # EAI_NONAME, not EAI_AGAIN (a timeout)


@pytest.fixture(scope="module")
def domains_vm(vm: SmolVM) -> Iterator[SmolVM]:
    """allowed_domains only: api.test (-> the gateway) and *.wild.test; blocked.test is known but not allowed."""
    hosts = {"api.test": GATEWAY, "blocked.test": GATEWAY, "a.wild.test": GATEWAY, "wild.test": GATEWAY}
    with SmolVM(internet_settings={"allowed_domains": ["api.test", "*.wild.test", "localhost"]},
                extra_hosts=hosts) as v:  # fmt: skip
        yield v


@pytest.mark.vm
def test_allowed_name_opens_its_address_and_nothing_else(domains_vm: SmolVM, servers: tuple[int, int]) -> None:
    pa, pb = servers
    before = probe(domains_vm, f"tcp:{GATEWAY}:{pa}", f"tcp:{HOST_ALIAS}:{pa}", "dns:blocked.test",
                   f"tcp:{GATEWAY}:{pb}")  # fmt: skip
    assert refused(before[f"tcp:{GATEWAY}:{pa}"]), before  # by IP before any answer: RST at once
    assert refused(before[f"tcp:{HOST_ALIAS}:{pa}"]), before  # the gateway's own name is not allowed
    assert nxdomain(before["dns:blocked.test"]), before
    assert refused(before[f"tcp:{GATEWAY}:{pb}"]), before
    after = probe(domains_vm, "dns:api.test", f"tcp:api.test:{pa}", f"tcp:{GATEWAY}:{pb}", "dns:blocked.test")
    assert after["dns:api.test"]["ok"] == [GATEWAY], after
    assert after[f"tcp:api.test:{pa}"]["ok"] == "allowed service\n", after
    assert after[f"tcp:{GATEWAY}:{pb}"]["ok"] == "blocked service\n", after  # the address is open now, any port
    assert nxdomain(after["dns:blocked.test"]), after  # a name stays refused whatever its address


@pytest.mark.vm
def test_wildcard_below_only_and_host_resolver(domains_vm: SmolVM) -> None:
    got = probe(domains_vm, "dns:a.wild.test", "dns:wild.test", "dns:x.a.wild.test", "raw:localhost",
                "raw:LocalHost", "raw:blocked.test")  # fmt: skip
    assert got["dns:a.wild.test"]["ok"] == [GATEWAY], got
    assert nxdomain(got["dns:wild.test"]), got  # "*.wild.test" does not cover wild.test itself
    assert nxdomain(got["dns:x.a.wild.test"]), got  # matched by the pattern, but not in extra_hosts nor on the host
    assert got["raw:localhost"]["ok"] == {"rcode": 0, "id": 0x1234, "addrs": ["127.0.0.1"]}, got  # getaddrinfo
    assert got["raw:LocalHost"]["ok"]["rcode"] == 0, got  # names match without regard to case
    assert got["raw:blocked.test"]["ok"] == {"rcode": 3, "id": 0x1234, "addrs": []}, got


@pytest.mark.vm
def test_policy_visible_and_kept_by_a_snapshot(domains_vm: SmolVM, servers: tuple[int, int]) -> None:
    pa, _ = servers
    want = domains_vm.internet_settings
    assert want["mode"] == "restricted" and want["allowed_domains"] == ["api.test", "*.wild.test", "localhost"]
    assert SmolVM.from_id(domains_vm.vm_id).internet_settings == want
    assert domains_vm.info.network == want
    probe(domains_vm, "dns:api.test")  # the address is open in this VM ...
    domains_vm.snapshot("net-policy-test")
    try:
        with SmolVM.from_snapshot("net-policy-test") as copy:
            assert copy.internet_settings == want
            got = probe(copy, f"tcp:{GATEWAY}:{pa}", "dns:blocked.test")
            # ... but a restored VM starts with no address handed out: the policy, not the answers, is kept
            assert refused(got[f"tcp:{GATEWAY}:{pa}"]), got
            assert nxdomain(got["dns:blocked.test"]), got
            got = probe(copy, "dns:api.test", f"tcp:{GATEWAY}:{pa}")
            assert got["dns:api.test"]["ok"] == [GATEWAY], got
            assert got[f"tcp:{GATEWAY}:{pa}"]["ok"] == "allowed service\n", got
    finally:
        snapshots.delete("net-policy-test")


FLOOD = r"""
import os, socket, struct, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setblocking(False)
q = struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x05flood\x04test\x00" + struct.pack(">HH", 1, 1)
n, end = 0, time.monotonic() + 8
while time.monotonic() < end:
    for dst in (("10.0.2.2", 9), ("10.0.2.3", 53), ("10.0.2.2", 7)):
        try:
            u.sendto(q, dst)
            n += 1
        except OSError:
            pass  # ICMP errors come back on this socket; a full queue too
    try:
        while True:
            u.recv(600)
    except OSError:
        pass
print(n)
"""


@pytest.mark.vm
def test_guest_flooding_frames_leaves_vmms_responsive(domains_vm: SmolVM, vm: SmolVM,
                                                      servers: tuple[int, int]) -> None:  # fmt: skip
    """A guest sending blocked datagrams and refused queries as fast as it can: its VMM answers each
    from its own buffer (or drops), still serves it, and another VM's network is untouched."""
    pa, _ = servers
    r = domains_vm.run("setsid nohup python3 -c " + shlex.quote(FLOOD) + " >/tmp/flood.out 2>&1 </dev/null &",
                       timeout=T)  # fmt: skip
    assert r.ok, r
    other = vm.run(f"curl -fsS http://{HOST_ALIAS}:{pa}/", timeout=T)  # the open NIC of another VM
    assert other.ok and other.stdout == "allowed service\n", other
    assert domains_vm.run("echo alive", timeout=T).stdout == "alive\n"
    r = domains_vm.run("while [ ! -s /tmp/flood.out ]; do sleep 0.5; done; cat /tmp/flood.out", timeout=T)
    assert r.ok and int(r.stdout) > 100, r
    got = probe(domains_vm, "dns:api.test", f"tcp:api.test:{pa}", "dns:blocked.test")
    assert got["dns:api.test"]["ok"] == [GATEWAY] and got[f"tcp:api.test:{pa}"]["ok"] == "allowed service\n", got
    assert nxdomain(got["dns:blocked.test"]), got


@pytest.mark.vm
def test_allowed_cidr_holds_the_gateway(vm: SmolVM, servers: tuple[int, int]) -> None:
    pa, _ = servers
    with SmolVM(internet_settings={"mode": "restricted", "allowed_cidrs": [f"{GATEWAY}/32"]},
                extra_hosts={"api.test": GATEWAY}) as v:  # fmt: skip
        got = probe(v, f"tcp:{GATEWAY}:{pa}", f"tcp:{HOST_ALIAS}:{pa}", "dns:api.test")
        assert got[f"tcp:{GATEWAY}:{pa}"]["ok"] == "allowed service\n", got
        assert got[f"tcp:{HOST_ALIAS}:{pa}"]["ok"] == "allowed service\n", got
        assert nxdomain(got["dns:api.test"]), got  # no allowed_domains: every name is refused
        r = v.run("ls /sys/class/net; grep -c smolvm.internal /etc/hosts; grep -c api.test /etc/hosts", timeout=T)
        assert r.stdout.split()[:3] == ["eth0", "lo", "1"], r.stdout  # extra_hosts answered by the VMM, not the file


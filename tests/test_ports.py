"""expose_local(): host 127.0.0.1 ports into the guest, against real VMs and a real python3 http.server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from smolvm import PortInUseError, PortNotExposedError, SmolVM

pytestmark = pytest.mark.vm

GUEST_PORT = 8000
T = 600
# A small HTTP/1.0 file server (perl-base is in every Debian image; it starts in well under a
# second where python3 takes ~16 s on hosts that emulate guest ring 0). One test uses python3.
PERL_HTTPD = (
    "use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1:' . shift, Listen => 16, "
    "ReuseAddr => 1) or die $!; while (my $c = $s->accept) { my $l = <$c> // ''; my ($p) = $l =~ m{^GET /(\\S*)}; "
    "while (<$c>) { last if /^\\r?$/ } if (defined $p && $p !~ m{\\.\\.} && open(my $f, '<', \"/tmp/www/$p\")) "
    "{ binmode $f; local $/; my $d = <$f>; print $c \"HTTP/1.0 200 OK\\r\\nContent-Length: \" . length($d) . "
    "\"\\r\\n\\r\\n\" . $d } else { print $c \"HTTP/1.0 404 Not Found\\r\\n\\r\\n\" } close $c }"
)
SERVE = (
    "mkdir -p /tmp/www && cd /tmp/www && echo {tag} > id.txt && "
    "cat > /tmp/httpd.pl <<'EOF'\n" + PERL_HTTPD + "\nEOF\n"
    "setsid nohup perl /tmp/httpd.pl {port} > /tmp/www.log 2>&1 < /dev/null &"
)
PY_SERVE = (
    "mkdir -p /tmp/py && cd /tmp/py && echo {tag} > id.txt && "
    "setsid nohup python3 -m http.server {port} --bind 127.0.0.1 > /tmp/py.log 2>&1 < /dev/null &"
)


def fill(template: str, tag: str, port: int) -> str:
    return template.replace("{tag}", tag).replace("{port}", str(port))


def fetch(host_port: int, path: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{host_port}/{path}", timeout=timeout) as r:
        return bytes(r.read())


def wait_served(host_port: int, path: str = "id.txt", limit: float = 900) -> bytes:
    """Fetch once the guest's server listens (until then the agent's connect is refused: a close)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            return fetch(host_port, path)
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def serve(vm: SmolVM, port: int = GUEST_PORT) -> None:
    r = vm.run(fill(SERVE, vm.vm_id, port), timeout=T)
    assert r.ok, r.stderr


@pytest.fixture(scope="module")
def served(vm: SmolVM) -> Iterator[SmolVM]:
    """The shared (persistent) VM with an HTTP server on guest 127.0.0.1:8000."""
    serve(vm)
    yield vm
    for f in vm.exposed_ports():
        vm.unexpose_local(f.host_port)
    vm.run("pkill -f httpd.pl", timeout=T)


@pytest.mark.guest_only
def test_python_http_server_in_the_guest(vm: SmolVM) -> None:
    with SmolVM() as own:
        r = own.run(fill(PY_SERVE, own.vm_id, 8100), timeout=T)
        assert r.ok, r.stderr
        host = own.expose_local(8100)
        assert wait_served(host) == f"{own.vm_id}\n".encode()


def test_expose_fetch_byte_exact(served: SmolVM, tmp_path: Path) -> None:
    data = os.urandom(256 << 10)
    (tmp_path / "blob").write_bytes(data)
    served.upload_file(tmp_path / "blob", "/tmp/www/blob")
    host = served.expose_local(GUEST_PORT)
    try:
        assert 1024 <= host <= 65535
        assert (host, GUEST_PORT) in served.exposed_ports()
        assert wait_served(host) == f"{served.vm_id}\n".encode()
        assert fetch(host, "blob", timeout=300) == data
        # several requests at once
        socks = [socket.create_connection(("127.0.0.1", host), timeout=30) for _ in range(5)]
        for s in socks:
            s.sendall(b"GET /id.txt HTTP/1.0\r\n\r\n")
        for s in socks:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            s.close()
            assert data.startswith(b"HTTP/1.0 200") and data.endswith(f"{served.vm_id}\n".encode())
    finally:
        served.unexpose_local(host)


def test_unexpose_closes_the_listener(served: SmolVM) -> None:
    host = served.expose_local(GUEST_PORT)
    assert wait_served(host) == f"{served.vm_id}\n".encode()
    served.unexpose_local(host)
    assert (host, GUEST_PORT) not in served.exposed_ports()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", host), timeout=10).close()
    with pytest.raises(PortNotExposedError, match="exposed_ports"):
        served.unexpose_local(host)
    # by guest port, and the original two-argument form
    a, b = served.expose_local(GUEST_PORT), served.expose_local(GUEST_PORT)
    served.unexpose_local(a, GUEST_PORT)
    assert [f.host_port for f in served.exposed_ports()] == [b]
    served.unexpose_local(GUEST_PORT)
    assert served.exposed_ports() == []


def test_host_port_in_use(served: SmolVM) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"host port {port} is already in use.*host_port=None"):
            served.expose_local(GUEST_PORT, port)
    finally:
        taken.close()
    host = served.expose_local(GUEST_PORT)
    try:
        with pytest.raises(PortInUseError):
            served.expose_local(GUEST_PORT, host)  # taken by our own forward
        # the listener is on 127.0.0.1 only
        assert socket.getaddrinfo("127.0.0.1", host)
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex(("127.0.0.2", host)) != 0
    finally:
        served.unexpose_local(host)


@pytest.mark.parametrize("bad", [0, 65536, -1, "80", True, 8.0])
def test_bad_ports(served: SmolVM, bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        served.expose_local(bad)  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError)):
        served.expose_local(GUEST_PORT, bad if bad != 0 else -5)  # type: ignore[arg-type]


def test_nothing_listening_in_guest_closes_at_once(served: SmolVM) -> None:
    host = served.expose_local(GUEST_PORT + 1)
    try:
        with socket.create_connection(("127.0.0.1", host), timeout=30) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
    finally:
        served.unexpose_local(host)


OTHER = r"""
import json, sys, urllib.request
from smolvm import SmolVM
vm = SmolVM.from_id(sys.argv[1])
host = vm.expose_local(int(sys.argv[2]))
body = urllib.request.urlopen(f"http://127.0.0.1:{host}/id.txt", timeout=60).read().decode()
print(json.dumps({"host": host, "body": body, "ports": [list(p) for p in vm.exposed_ports()]}))
vm.close()
"""


def test_forward_of_persistent_vm_outlives_the_process_that_made_it(
    served: SmolVM, smolvm_env: dict[str, str]
) -> None:
    first = served.expose_local(GUEST_PORT)
    wait_served(first)
    out = subprocess.run(
        [sys.executable, "-c", OTHER, served.vm_id, str(GUEST_PORT)],
        env=smolvm_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["body"] == f"{served.vm_id}\n"
    assert [first, GUEST_PORT] in got["ports"] and [got["host"], GUEST_PORT] in got["ports"]
    # the other process has exited; its forward lives on in the VMM
    assert fetch(got["host"], "id.txt") == f"{served.vm_id}\n".encode()
    served.unexpose_local(GUEST_PORT)


@pytest.mark.guest_only
def test_two_vms_same_guest_port(served: SmolVM) -> None:
    with SmolVM() as other:
        assert other.exposed_ports() == []  # restored from the base snapshot: no forwards
        serve(other)
        a, b = served.expose_local(GUEST_PORT), other.expose_local(GUEST_PORT)
        try:
            assert a != b
            assert wait_served(b) == f"{other.vm_id}\n".encode()
            assert wait_served(a) == f"{served.vm_id}\n".encode()
        finally:
            served.unexpose_local(a)
        port = b
    with pytest.raises(ConnectionRefusedError):  # the VM is gone, and its listener with it
        socket.create_connection(("127.0.0.1", port), timeout=10).close()


def test_restored_vm_starts_without_forwards(served: SmolVM) -> None:
    host = served.expose_local(GUEST_PORT)
    try:
        served.snapshot("ports-test")
    finally:
        served.unexpose_local(host)
    from smolvm import snapshots

    try:
        with SmolVM.from_snapshot("ports-test") as copy:
            assert copy.exposed_ports() == []
            again = copy.expose_local(GUEST_PORT)
            assert wait_served(again) == f"{served.vm_id}\n".encode()  # the server came along
    finally:
        snapshots.delete("ports-test")


def test_cli_port_expose_ls_rm(served: SmolVM, smolvm_env: dict[str, str]) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "smolvm", "port", *args], env=smolvm_env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    out = cli("expose", served.vm_id, str(GUEST_PORT), "--json")
    assert out.returncode == 0, out.stderr
    host = json.loads(out.stdout)["host_port"]
    assert wait_served(host) == f"{served.vm_id}\n".encode()
    out = cli("ls", served.vm_id)
    assert out.returncode == 0 and f"127.0.0.1:{host} -> {served.vm_id}:{GUEST_PORT}" in out.stdout
    assert cli("rm", served.vm_id, str(host)).returncode == 0
    out = cli("rm", served.vm_id, str(host))
    assert out.returncode == 1 and "does not forward" in out.stderr
    out = cli("expose", "vm-000000000000", "80")
    assert out.returncode == 1 and "smolvm ls" in out.stderr

"""Guest networking through passt: real VMs, real passt, traffic only to servers on the host's loopback."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path

import pytest

from smolvm import SmolVM
from smolvm.network import HOST_ALIAS, NetworkUnavailableError, policy

T = 120
BLOB_MIB = 16  # the byte-exact download; guest_only, so the compat pass (minutes for it) skips it


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def host_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """An HTTP server on the host's 127.0.0.1 serving `blob` (random bytes) and `hello.txt`."""
    root = tmp_path_factory.mktemp("www")
    blob = os.urandom(BLOB_MIB << 20)
    (root / "blob").write_bytes(blob)
    (root / "hello.txt").write_text("hello from the host\n")
    handler = lambda *a, **k: _Quiet(*a, directory=str(root), **k)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], hashlib.sha256(blob).hexdigest()
    srv.shutdown()
    srv.server_close()


# ---- policy checks (no VM) ---------------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"internet": "yes"}, TypeError, "internet must be True or False"),
    ({"internet_settings": "off"}, TypeError, "must be a dict"),
    ({"internet_settings": {"mode": "closed"}}, ValueError, "must be one of 'open', 'off'"),
    ({"internet_settings": {"mdoe": "off"}}, ValueError, "unknown key.*'mdoe'"),
    ({"internet": False, "internet_settings": {"mode": "open"}}, ValueError, "conflicts"),
    ({"internet_settings": {"mode": "off", "allowed_domains": ["a.example"]}}, ValueError, "need mode .restricted."),
    ({"internet_settings": {"mode": "open", "allowed_cidrs": ["10.0.2.2"]}}, ValueError, "need mode .restricted."),
    ({"internet_settings": {"mode": "restricted"}}, ValueError, "needs allowed_domains or allowed_cidrs"),
    ({"internet_settings": {"allowed_cidrs": ["10.0.2.1/24"]}}, ValueError, "host bits set; write .10.0.2.0/24."),
    ({"internet_settings": {"allowed_cidrs": ["10.0.2.300"]}}, ValueError, "not an IPv4 address or network"),
    ({"internet_settings": {"allowed_cidrs": ["::1/128"]}}, ValueError, "IPv4 only"),
    ({"internet_settings": {"allowed_cidrs": "10.0.2.2"}}, TypeError, "list of strings"),
    ({"internet_settings": {"allowed_domains": ["*"]}}, ValueError, "use mode .open."),
    ({"internet_settings": {"allowed_domains": ["a..example"]}}, ValueError, "not a host name"),
    ({"internet_settings": {"allowed_domains": ["*.*.example"]}}, ValueError, "not a host name"),
    ({"internet_settings": {"allowed_domains": ["http://a.example/x"]}}, ValueError, "not a host name"),
    ({"internet_settings": {"allowed_domains": ["a.example"], "allow": []}}, ValueError, "unknown key"),
    ({"extra_hosts": {"bad name!": "127.0.0.1"}}, ValueError, "not a host name"),
    ({"extra_hosts": {"db": "::1"}}, ValueError, "not an IPv4 address"),
    ({"extra_hosts": {"db": 5}}, ValueError, "not an IPv4 address"),
    ({"extra_hosts": ["db"]}, TypeError, "must be a dict"),
    ({"extra_hosts": {HOST_ALIAS: "10.0.2.2"}}, ValueError, "built in"),
    ({"internet": False, "extra_hosts": {"db": "10.0.2.2"}}, ValueError, "needs a network"),
])  # fmt: skip
def test_bad_policies(kwargs: dict[str, object], exc: type[Exception], match: str) -> None:
    args = {"internet": True, "internet_settings": None, "extra_hosts": None, **kwargs}
    with pytest.raises(exc, match=match):
        policy(args["internet"], args["internet_settings"], args["extra_hosts"])
    with pytest.raises(exc, match=match):
        SmolVM(**kwargs)  # type: ignore[arg-type]


def test_policy_forms() -> None:
    assert policy(True, None, None).to_dict() == {"mode": "open", "extra_hosts": {}}
    assert policy(False, None, None).mode == "off"
    assert policy(True, {"mode": "off"}, None).mode == "off"
    assert SmolVM(extra_hosts={"db": "10.0.2.2"}).internet_settings == {"mode": "open", "extra_hosts": {"db": "10.0.2.2"}}


def test_passt_missing_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no passt on it
    with pytest.raises(NetworkUnavailableError, match="apt-get install passt"):
        SmolVM().start()
    SmolVM(internet=False)  # needs no passt


# ---- real VMs ----------------------------------------------------------------------------


@pytest.mark.guest_only
@pytest.mark.vm
def test_curl_host_loopback_byte_exact(vm: SmolVM, host_server: tuple[int, str]) -> None:
    port, digest = host_server
    r = vm.run(f"curl -fsS http://{HOST_ALIAS}:{port}/hello.txt", timeout=T)
    assert r.ok, r.stderr
    assert r.stdout == "hello from the host\n"
    r = vm.run(f"curl -fsS -o /tmp/blob http://{HOST_ALIAS}:{port}/blob && sha256sum /tmp/blob && rm /tmp/blob",
               timeout=600)  # fmt: skip
    assert r.ok, r.stderr
    assert r.stdout.split()[0] == digest
    r = vm.run("cat /etc/resolv.conf; grep -c . /etc/hosts; ip -4 -o addr show eth0", timeout=T)
    assert "nameserver 10.0.2.3" in r.stdout and "10.0.2.15/24" in r.stdout


@pytest.mark.vm
def test_mode_off_has_no_interface(vm: SmolVM) -> None:
    with SmolVM(internet_settings={"mode": "off"}) as off:
        assert off.internet_settings["mode"] == "off"
        r = off.run("ls /sys/class/net", timeout=T)
        assert r.ok and r.stdout.split() == ["lo"]
        port = off.expose_local(8000)  # forwards work without a network
        assert port > 0


@pytest.mark.vm
def test_extra_hosts_resolve_and_connect(vm: SmolVM, host_server: tuple[int, str]) -> None:
    port, _ = host_server
    with SmolVM(extra_hosts={"files.internal": "10.0.2.2"}) as v:
        r = v.run(f"getent hosts files.internal; curl -fsS http://files.internal:{port}/hello.txt", timeout=T)
        assert r.ok, r.stderr
        assert "10.0.2.2" in r.stdout and "hello from the host" in r.stdout


@pytest.mark.vm
def test_restored_vm_network_works(vm: SmolVM, host_server: tuple[int, str]) -> None:
    port, _ = host_server
    vm.snapshot("net-test")
    from smolvm import snapshots

    try:
        with SmolVM.from_snapshot("net-test") as copy:
            assert copy.internet_settings["mode"] == "open"
            r = copy.run(f"curl -fsS http://{HOST_ALIAS}:{port}/hello.txt", timeout=T)
            assert r.ok, r.stderr
            assert r.stdout == "hello from the host\n"
    finally:
        snapshots.delete("net-test")


@pytest.mark.vm
@pytest.mark.guest_only
def test_ten_sandboxes_at_once_each_reach_the_host(vm: SmolVM, host_server: tuple[int, str]) -> None:
    """Ten restored sandboxes, each with its own passt, fetch from the host's loopback at once."""
    port, _ = host_server

    def one(i: int) -> str:
        with SmolVM() as v:
            r = v.run(f"curl -fsS http://{HOST_ALIAS}:{port}/hello.txt && hostname", timeout=600)
            assert r.ok, (i, r)
            return r.stdout

    with ThreadPoolExecutor(10) as pool:
        outs = list(pool.map(one, range(10)))
    assert all(o.startswith("hello from the host\n") for o in outs), outs
    assert len({o.splitlines()[1] for o in outs}) == 10  # ten different sandboxes


@pytest.mark.vm
def test_from_id_sees_the_policy(vm: SmolVM) -> None:
    assert SmolVM.from_id(vm.vm_id).internet_settings == vm.internet_settings


def test_which_passt() -> None:
    assert shutil.which("passt"), "passt is a dependency: apt-get install passt"


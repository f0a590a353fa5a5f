"""The VMM's seccomp filters: on in every VM, and a forbidden call kills the VMM with a clear VMGoneError."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctest import compiler
from smolvm import SmolVM, VMGoneError, _binaries

ROOT = Path(__file__).resolve().parent.parent


NO_CAPS = "0" * 16

# Runs in the guest: one A query for NAME straight to the VMM's DNS address (10.0.2.3), the answer's addresses.
RAW_QUERY = r"""
import socket, struct, sys
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(l)]) + l.encode() for l in sys.argv[1].split(".")) + b"\0" + struct.pack(">HH", 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(60)
u.sendto(q, ("10.0.2.3", 53))
a = u.recv(600)
print(a[3] & 15, *(socket.inet_ntoa(a[len(a) - 4 - 16 * i:len(a) - 16 * i]) for i in range(struct.unpack(">H", a[6:8])[0])))
"""


@pytest.mark.vm
def test_every_vmm_thread_is_filtered(vm: SmolVM) -> None:
    st = vm.vmm_status()
    assert st["Seccomp"] == "2", st  # 2: filter mode
    assert st["NoNewPrivs"] == "1", st
    vcpus = [k for k in st if k.startswith("vcpu") and k.endswith(".Seccomp")]
    assert len(vcpus) == vm.vcpus, st
    assert all(st[k] == "2" for k in vcpus), st
    assert not any(k.startswith("resolver.") for k in st), st  # no egress policy: no resolver thread
    assert vm.run("echo still fine").stdout == "still fine\n"  # the status read left the VM working


@pytest.mark.own_vm
def test_resolver_thread_is_filtered_and_still_resolves() -> None:
    """An allow-list starts the VMM's getaddrinfo thread: it runs under its own filter, without capabilities."""
    with SmolVM(internet_settings={"allowed_domains": ["localhost"]}) as vm:
        st = vm.vmm_status()
        assert st["resolver.Seccomp"] == "2" and st["resolver.NoNewPrivs"] == "1", st
        assert st["resolver.CapEff"] == st["resolver.CapPrm"] == NO_CAPS, st
        assert st["Seccomp"] == "2" and all(st[f"vcpu{i}.Seccomp"] == "2" for i in range(vm.vcpus)), st
        # "localhost" is allowed and in no extra_hosts: the filtered thread asks the host's resolver (/etc/hosts)
        r = vm.run("python3 -c " + shlex.quote(RAW_QUERY) + " localhost", timeout=600)
        assert r.ok and r.stdout.split() == ["0", "127.0.0.1"], (r.stdout, r.stderr)
        assert vm.vmm_status()["resolver.Seccomp"] == "2"  # alive and answering: the lookup broke no rule


@pytest.fixture(scope="module")
def hooked_vmm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """smolvm-vmm built with SMOLVM_TEST_HOOKS: its serial device makes a forbidden call on cue."""
    exe = tmp_path_factory.mktemp("vmm") / "smolvm-vmm"
    libs = [f"-l{lib}" for lib in _binaries.BINARIES["smolvm-vmm"].libraries]
    cmd = [
        compiler(), "-std=gnu11", "-O1", "-DSMOLVM_TEST_HOOKS",
        *(f"-I{d}" for d in _binaries.include_dirs("smolvm-vmm", ROOT)),
        "-o", str(exe), *map(str, _binaries.sources("smolvm-vmm", ROOT)), *libs,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return exe


@pytest.fixture
def hooked_vm(vm: SmolVM, hooked_vmm: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmolVM]:
    monkeypatch.setenv("SMOLVM_VMM", str(hooked_vmm))
    with SmolVM() as own:
        yield own


@pytest.mark.own_vm
def test_forbidden_call_in_a_device_kills_the_vmm_clearly(hooked_vm: SmolVM) -> None:
    vm = hooked_vm
    assert vm.run("echo alive").stdout == "alive\n"
    pid, state = vm.pid, vm.state_dir
    assert pid is not None
    # The guest writes the cue to its serial port: the vCPU thread's UART handler then calls getppid().
    with pytest.raises(VMGoneError) as ei:
        vm.run("echo smolvm-test-forbidden-syscall > /dev/ttyS0; sleep 30", timeout=60)
    msg = str(ei.value)
    assert "SIGSYS" in msg and "seccomp" in msg, msg
    assert vm.status == "stopped"
    assert not state.exists(), "state dir left behind"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: no zombie, no process
    assert not list(Path.cwd().glob("core*")), "a core file was left behind"
    with pytest.raises(VMGoneError):
        vm.run("true")

"""The VMM's seccomp filters: on in every VM, and a forbidden call kills the VMM with a clear VMGoneError."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctest import compiler
from smolvm import SmolVM, VMGoneError, _binaries

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.vm
def test_every_vmm_thread_is_filtered(vm: SmolVM) -> None:
    st = vm.vmm_status()
    assert st["Seccomp"] == "2", st  # 2: filter mode
    assert st["NoNewPrivs"] == "1", st
    vcpus = [k for k in st if k.startswith("vcpu") and k.endswith(".Seccomp")]
    assert len(vcpus) == vm.vcpus, st
    assert all(st[k] == "2" for k in vcpus), st
    assert vm.run("echo still fine").stdout == "still fine\n"  # the status read left the VM working


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

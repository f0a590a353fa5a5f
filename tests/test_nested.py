"""The nested profile's host VM: shared by processes, keeps persistent VMs, survives nothing it should not.

Each test here runs smolvm in subprocesses with SMOLVM_PROFILE=nested and a $SMOLVM_HOME of
its own (the kernel, image and base-snapshot caches linked in), so it starts, kills and stops
a host VM of its own without touching the one the rest of the suite may be using.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smolvm import hostvm
from smolvm._paths import home

pytestmark = [
    pytest.mark.own_vm,
    pytest.mark.guest_only,  # each starts host VMs of its own (minutes); every other VM test already runs the relay and hostd
    pytest.mark.skipif(hostvm.unavailable_reason() is not None, reason=f"nested profile: {hostvm.unavailable_reason()}"),
]

SHARED = ("kernel", "initramfs", "agent", "images", "hostvm")


@pytest.fixture
def nested_env(tmp_path: Path, smolvm_env: dict[str, str]) -> dict[str, str]:
    """A private $SMOLVM_HOME whose build caches (and base snapshots) are the suite's own."""
    h = tmp_path / "h"
    h.mkdir()
    src = home()
    for name in SHARED:
        (src / name).mkdir(exist_ok=True)
        (h / name).symlink_to(src / name)
    (src / "snapshots" / ".base").mkdir(parents=True, exist_ok=True)
    (h / "snapshots").mkdir()
    (h / "snapshots" / ".base").symlink_to(src / "snapshots" / ".base")
    env = dict(smolvm_env, SMOLVM_HOME=str(h), SMOLVM_PROFILE="nested")
    yield env
    subprocess.run([sys.executable, "-m", "smolvm", "rm", "--all"], env=env, capture_output=True, timeout=120)
    subprocess.run([sys.executable, "-m", "smolvm", "host", "stop"], env=env, capture_output=True, timeout=120)


def py(env: dict[str, str], code: str, timeout: float = 600) -> str:
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res.stdout


def host_status(env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "smolvm", "host", "status", "--json"], env=env, capture_output=True,
        text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    return dict(json.loads(out))


def test_shared_by_processes_persistent_vm_and_two_vcpus(nested_env: dict[str, str]) -> None:
    out = py(nested_env, """
from smolvm import SmolVM
from smolvm import hostvm
vm = SmolVM(vcpus=2)
vm.start()
r = vm.run("nproc; taskset -c 1 cat /proc/self/stat | cut -d' ' -f39; echo note > /tmp/note.txt")
print(vm.vm_id, hostvm.current().pid, r.stdout.split()[0], r.stdout.split()[1])
""")  # fmt: skip
    vm_id, host_pid, nproc, cpu = out.split()
    assert nproc == "2"
    assert cpu == "1"  # the guest ran a task on its second vCPU
    # Its creator has exited: another process finds the VM, in the same host VM.
    out2 = py(nested_env, f"""
from smolvm import SmolVM
from smolvm import hostvm
again = SmolVM.from_id({vm_id!r})
print(hostvm.current().pid, again.run("cat /tmp/note.txt").stdout.strip())
again.delete()
""")  # fmt: skip
    assert out2.split() == [host_pid, "note"]
    st = host_status(nested_env)
    assert st["running"] and st["answers"] and st["pid"] == int(host_pid)


def test_kill_9_of_qemu_is_a_clear_error_and_the_next_vm_starts_a_new_host(nested_env: dict[str, str]) -> None:
    code = """
import os, signal, time
from smolvm import SmolVM, VMGoneError
from smolvm import hostvm
with SmolVM() as vm:
    assert vm.run("echo up").stdout == "up\\n"
    first = hostvm.current().pid
    os.kill(first, signal.SIGKILL)
    try:
        for _ in range(50):
            vm.run("true", timeout=10)
            time.sleep(0.2)
        print("NO ERROR")
    except VMGoneError as e:
        print("GONE", str(e).replace("\\n", " ")[:300])
with SmolVM() as vm2:
    print("SECOND", vm2.run("echo again").stdout.strip(), hostvm.current().pid != first)
"""
    out = py(nested_env, code)
    assert "GONE" in out, out
    assert "host VM" in out, out  # the error names the cause
    assert "SECOND again True" in out, out


def test_host_stop_leaves_nothing_and_idle_host_powers_off(nested_env: dict[str, str]) -> None:
    env = dict(nested_env, SMOLVM_HOST_IDLE="3")
    out = py(env, """
from smolvm import SmolVM
from smolvm import hostvm
vm = SmolVM()
vm.start()
print(hostvm.current().pid, vm.vm_id, vm.pid)
""")  # fmt: skip
    qemu_pid, vm_id, relay_pid = (int(x) if x.isdigit() else x for x in out.split())
    state = Path(env["SMOLVM_HOME"]) / "vms" / str(vm_id)
    assert (state / "ctl.sock").exists()
    # A persistent VM keeps the host VM busy past its idle time.
    time.sleep(8)
    assert host_status(env)["running"]
    subprocess.run([sys.executable, "-m", "smolvm", "host", "stop"], env=env, check=True, timeout=120)
    for _ in range(100):
        if not Path(f"/proc/{relay_pid}").exists() and not Path(f"/proc/{qemu_pid}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{qemu_pid}").exists()
    assert not Path(f"/proc/{relay_pid}").exists()
    assert not (state / "ctl.sock").exists() and not (state / "vsock.sock").exists()
    assert not host_status(env)["running"]
    # Without VMs, a new host VM powers itself off after SMOLVM_HOST_IDLE seconds.
    py(env, "from smolvm import SmolVM\nwith SmolVM() as vm: vm.run('true')\n")
    pid = host_status(env)["pid"]
    assert isinstance(pid, int)
    for _ in range(600):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the idle host VM did not power off"


def test_status_without_a_host_vm(nested_env: dict[str, str]) -> None:
    st = host_status(nested_env)
    assert st == {**st, "running": False, "pid": None, "answers": False, "available": True}
    res = subprocess.run([sys.executable, "-m", "smolvm", "host", "stop"], env=nested_env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0 and "no host VM" in res.stdout

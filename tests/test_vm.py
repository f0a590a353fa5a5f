"""End-to-end tests against real KVM microVMs: one shared VM, plus one of its own for the kill test."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from _helpers import run_threads
from smolvm import RunResult, SmolVM, VMGoneError, VMStartError

pytestmark = pytest.mark.vm

MIB = 1 << 20
SLOW = 300  # seconds: guest kernel work is emulated (slow) on some hosts


def seq_bytes(n: int, limit: int) -> bytes:
    """What `seq 1 n | head -c limit` prints, made on the host."""
    return "".join(f"{i}\n" for i in range(1, n + 1)).encode()[:limit]


def test_running_vm_state(vm: SmolVM) -> None:
    assert vm.status == "running"
    assert re.fullmatch(r"vm-[0-9a-f]{12}", vm.vm_id)
    assert vm.pid is not None and Path(f"/proc/{vm.pid}").exists()
    assert vm.state_dir.is_dir()
    assert vm.console_log.is_file() and vm.console_log.stat().st_size > 0
    assert vm.profile is not None


def test_stdout_and_stderr_kept_apart(vm: SmolVM) -> None:
    r = vm.run("echo out; echo err >&2; echo out2")
    assert isinstance(r, RunResult)
    assert r.stdout == "out\nout2\n"
    assert r.stderr == "err\n"
    assert r.ok and r.exit_code == 0 and not r.timed_out
    assert r.output == "out\nout2"
    assert r.duration > 0


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_codes(vm: SmolVM, code: int) -> None:
    r = vm.run(f"exit {code}")
    assert r.exit_code == code
    assert r.ok is (code == 0)


def test_killed_by_signal(vm: SmolVM) -> None:
    r = vm.run("kill -9 $$")
    assert r.exit_code == 128 + 9
    assert not r.ok


def test_env_and_cwd(vm: SmolVM) -> None:
    r = vm.run('echo "$FOO"; pwd', env={"FOO": "bar baz"}, cwd="/tmp")
    assert r.stdout == "bar baz\n/tmp\n"


def test_1mib_stdout_byte_exact(vm: SmolVM) -> None:
    # The host makes the same bytes as the guest's seq: no trust in guest checksums.
    r = vm.run(f"seq 1 200000 | head -c {MIB}", timeout=SLOW)
    assert r.exit_code == 0, r
    assert len(r.stdout_bytes) == MIB
    assert r.stdout_bytes == seq_bytes(200000, MIB)


def test_1mib_binary_stderr_byte_exact(vm: SmolVM) -> None:
    # Every byte value, through stderr: the first MiB of the guest's libc.
    libc = "/usr/lib/x86_64-linux-gnu/libc.so.6"
    r = vm.run(f"head -c {MIB} {libc} >&2", timeout=SLOW)
    assert r.exit_code == 0, r
    assert r.stdout_bytes == b""
    data = r.stderr_bytes
    assert len(data) == MIB
    assert len(set(data)) == 256
    # Cross-check 1: the guest's own md5 of the same bytes.
    check = vm.run(f"head -c {MIB} {libc} | md5sum", timeout=SLOW)
    assert check.stdout.split()[0] == hashlib.md5(data).hexdigest()
    # Cross-check 2: the host's libc, when it is the very same file as the guest's.
    host = Path(libc)
    if host.exists():
        whole = vm.run(f"md5sum {libc}", timeout=SLOW).stdout.split()[0]
        host_bytes = host.read_bytes()
        if hashlib.md5(host_bytes).hexdigest() == whole:
            assert data == host_bytes[:MIB]


def test_non_utf8_output_is_replaced(vm: SmolVM) -> None:
    r = vm.run(r"printf '\377\376abc\n'; printf 'x\377' >&2")
    assert r.stdout_bytes == b"\xff\xfeabc\n"
    assert r.stdout == "\ufffd\ufffdabc\n"
    assert r.stderr == "x\ufffd"


def test_timeout_kills_and_vm_stays_usable(vm: SmolVM) -> None:
    t0 = time.monotonic()
    r = vm.run("echo before; sleep 1000 & sleep 1000", timeout=5)
    took = time.monotonic() - t0
    assert r.timed_out
    assert r.exit_code == 124
    assert not r.ok
    assert r.stdout == "before\n"
    assert 4.5 <= took < 5 + 25, took
    after = vm.run("echo after")
    assert after.ok and after.stdout == "after\n"
    # The whole process group went, background sleep included.
    for _ in range(10):
        left = vm.run("ps | grep -c '[s]leep 1000'", timeout=120)
        if left.stdout.strip() == "0":
            break
        time.sleep(1)
    assert left.stdout.strip() == "0", left


def test_20_sequential_runs(vm: SmolVM) -> None:
    for i in range(20):
        r = vm.run(f"echo run-{i}; exit {i % 3}")
        assert r.stdout == f"run-{i}\n"
        assert r.exit_code == i % 3


def test_4_concurrent_runs_do_not_cross(vm: SmolVM) -> None:
    n_lines = 200
    barrier = threading.Barrier(4)
    results: dict[int, RunResult | BaseException] = {}

    def worker(n: int) -> None:
        script = (
            f"i=0; while [ $i -lt {n_lines} ]; do echo t{n}-$i; echo e{n}-$i >&2; "
            f"i=$((i+1)); done; exit {10 + n}"
        )
        barrier.wait()
        try:
            results[n] = vm.run(script, timeout=SLOW)
        except BaseException as e:
            results[n] = e

    run_threads(worker, range(4))
    for n in range(4):
        r = results[n]
        assert isinstance(r, RunResult), r
        assert r.exit_code == 10 + n
        assert r.stdout == "".join(f"t{n}-{i}\n" for i in range(n_lines))
        assert r.stderr == "".join(f"e{n}-{i}\n" for i in range(n_lines))


def test_bad_kernel_gives_start_error(tmp_path: Path) -> None:
    junk = tmp_path / "not-a-kernel"
    junk.write_bytes(b"\0" * 4096)
    vm = SmolVM(kernel=junk, boot_timeout=120)
    with pytest.raises(VMStartError) as ei:
        vm.start()
    assert vm.vm_id in str(ei.value)
    assert vm.status == "stopped"
    assert not vm.state_dir.exists()


def test_boot_timeout_cleans_up() -> None:
    vm = SmolVM(boot_timeout=2, cold_boot=True)
    with pytest.raises(VMStartError, match="not ready within"):
        vm.start()
    assert not vm.state_dir.exists()
    assert vm.pid is None


ORPHAN_SCRIPT = r"""
import sys, threading, time
from smolvm import SmolVM
vm = SmolVM()
vm.__enter__()  # an ephemeral VM, as in `with SmolVM() as vm:`
print(vm.pid, vm.state_dir, flush=True)
time.sleep(1000)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_vmm_dies_with_its_owner(smolvm_env: dict[str, str], tmp_path: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT],
        stdout=subprocess.PIPE,
        env=smolvm_env,
        cwd=tmp_path,
        text=True,
    )
    try:
        assert owner.stdout is not None
        pid_s, state_dir = owner.stdout.readline().split()
        vmm = int(pid_s)
        time.sleep(1)
        assert _alive(vmm)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 15
    while _alive(vmm) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert not _alive(vmm), "the VMM outlived its owner"
    finally:
        if _alive(vmm):
            os.kill(vmm, signal.SIGKILL)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.mark.own_vm
def test_kill_9_of_the_vmm_gives_clear_error(own_vm: SmolVM) -> None:
    vm = own_vm
    assert vm.run("echo alive").stdout == "alive\n"
    pid, state = vm.pid, vm.state_dir
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(VMGoneError) as ei:
        vm.run("echo hello")
    assert time.monotonic() - t0 < 20
    msg = str(ei.value)
    assert vm.vm_id in msg and "SIGKILL" in msg, msg
    assert ei.value.console_tail, "the error should carry the console tail"
    assert vm.status == "stopped"
    assert not state.exists(), "state dir left behind"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: no zombie, no process
    with pytest.raises(VMGoneError):
        vm.run("true")
    vm.close()
    vm.close()


@pytest.mark.profile_compat
def test_several_vcpus_refused_clearly_on_compat_hosts() -> None:
    from smolvm.profile import detect

    if not detect().compat:
        pytest.skip("only the compat profile (ring-0-emulating KVM) refuses several vCPUs")
    vm = SmolVM(vcpus=2)
    with pytest.raises(VMStartError, match="vcpus=2.*vcpus=1"):
        vm.start()
    assert vm.status == "stopped"
    assert not vm.state_dir.exists()

"""Guest processes keep their own AVX (and AVX-512/opmask) registers: context switches, signals, sigreturn.

On hosts that emulate guest ring 0 (compat profile) the guest kernel cannot run XSAVE, yet its
user space uses AVX natively; the VMM switches that state for the kernel (csrc/vmm/xstate.c). On
VT-x/AMD-V hosts the kernel's own XSAVE does it. The test is the same on both: two processes
hold their own pattern across sched_yield(), a signal handler's AVX use does not leak into the
interrupted code, and a signal frame with a malformed XSAVE header makes sigreturn fail.
"""

from __future__ import annotations

import os

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from smolvm import SmolVM

pytestmark = pytest.mark.profile_compat

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "guest" / "regtest.c"
ITERATIONS = 2000


@pytest.fixture(scope="module")
def regtest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test program, built static on the host (the guest has no compiler)."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the guest test program")
    exe = tmp_path_factory.mktemp("regtest") / "regtest"
    env = {"PATH": "/usr/bin:/bin"}  # no ASan preload into the compiler
    done = subprocess.run(
        ["gcc", "-static", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(SOURCE)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return exe


def _kinds(vm: SmolVM, exe: str) -> list[str]:
    return [k for k in ("ymm", "zmm", "k") if vm.run(f"{exe} has {k}").exit_code == 0]


def _check_registers(vm: SmolVM, regtest: Path) -> None:
    exe = "/tmp/regtest"
    vm.upload_file(regtest, exe)
    kinds = _kinds(vm, exe)
    assert "ymm" in kinds, "the guest's user space should see AVX (the host CPU has it)"
    for kind in kinds:
        r = vm.run(f"{exe} switch {kind} {ITERATIONS}", timeout=600)
        lines = re.findall(rf"^{kind} (parent|child) switches=(\d+) bad=(\d+)$", r.stdout, re.M)
        assert len(lines) == 2, r
        for who, switches, bad in lines:
            assert int(bad) == 0, f"{kind}: {who} saw the other process's registers {bad} times: {r}"
            # Both really ran interleaved, or the test proves nothing. (How often sched_yield
            # switches differs: ~11% under compat, 1-4% on a real KVM with one vCPU.)
            assert int(switches) >= ITERATIONS // 200, f"{kind}: too few switches: {r}"
        assert r.ok, r
    r = vm.run(f"{exe} signal {ITERATIONS // 2}", timeout=600)
    assert r.ok and "signal bad=0" in r.stdout, r
    r = vm.run(f"{exe} badframe", timeout=120)
    assert r.exit_code == 128 + 11, f"sigreturn of a malformed XSAVE frame must fail with SIGSEGV: {r}"
    assert vm.run("echo alive").output == "alive"


@pytest.mark.vm
def test_registers_private_in_a_restored_vm(vm: SmolVM, regtest: Path) -> None:
    with SmolVM() as own:  # restored from the base snapshot
        _check_registers(own, regtest)


@pytest.mark.guest_only
@pytest.mark.own_vm
def test_registers_private_in_a_booted_vm(vm: SmolVM, regtest: Path) -> None:
    with SmolVM(cold_boot=True) as booted:
        _check_registers(booted, regtest)


@pytest.mark.own_vm
def test_guest_kernel_uses_xsave(vm: SmolVM) -> None:
    """The guest kernel switches the full XSAVE state, not only FXSAVE's legacy part."""
    with SmolVM() as own:
        # X86_FEATURE_XSAVE ("xsave") is dropped when the kernel falls back to FXSAVE.
        r = own.run("grep -m1 '^flags' /proc/cpuinfo", timeout=120)
        flags = r.stdout.split()
        assert "xsave" in flags and "avx" in flags, r


@pytest.mark.skipif(os.environ.get("SMOLVM_SLOW_TESTS") != "1", reason="slow on emulating hosts: SMOLVM_SLOW_TESTS=1 runs it")
@pytest.mark.guest_only
def test_concurrent_hashlib_matches_the_host(vm: SmolVM) -> None:
    """Four Python processes at once (OpenSSL's vector code, preempted) get the host's digest."""
    script = (
        "import hashlib; d = bytes(range(256)) * 16384; "
        "print(hashlib.sha256(d * 2).hexdigest(), hashlib.blake2b(d).hexdigest())"
    )
    data = bytes(range(256)) * 16384
    want = f"{hashlib.sha256(data * 2).hexdigest()} {hashlib.blake2b(data).hexdigest()}"
    with SmolVM() as own:
        r = own.run(
            " & ".join([f"python3 -c '{script}'"] * 4) + " & wait", timeout=900
        )  # fmt: skip
        got = r.stdout.split("\n")
        got = [g for g in got if g]
        assert len(got) == 4 and all(g == want for g in got), r

"""The original smolvm's names (set_env_vars, info, status, stop, make_dirs, wait_for_ready) and Agentor's SmolVMRuntime against real VMs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from smolvm import RunResult, SmolVM, VMInfo, VMState

SLOW = 120  # guest commands on emulating hosts take seconds


# ---- without a VM ----------------------------------------------------------------------


def test_vm_state_is_a_str() -> None:
    assert VMState.RUNNING == "running" and str(VMState.PAUSED) == "paused"
    assert f"{VMState.STOPPED}" == "stopped" and json.dumps(VMState.CREATED) == '"created"'
    assert VMState("running") is VMState.RUNNING


def test_env_vars_before_start() -> None:
    vm = SmolVM()
    assert vm.status == VMState.CREATED and isinstance(vm.status, VMState)
    assert vm.set_env_vars({"B": "2", "A": "1"}) == ["A", "B"]
    assert vm.set_env_vars({"C": "3"}) == ["A", "B", "C"]
    assert vm.unset_env_vars(["A", "missing"]) == {"A": "1"}
    assert vm.list_env_vars() == {"B": "2", "C": "3"}
    assert vm.set_env_vars({"D": "4"}, merge=False) == ["D"]
    assert vm.list_env_vars() == vm.env == {"D": "4"}
    with pytest.raises(TypeError):
        vm.set_env_vars({"X": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        vm.set_env_vars({"A=B": "x"})
    info = vm.info
    assert isinstance(info, VMInfo) and info.status == "created" and info.pid is None
    assert (info.memory, info.vcpus, info.image, info.disk_size) == (512, 1, "default", 1024)
    assert info.network == {"mode": "open", "extra_hosts": {}}  # the policy, as vm.internet_settings
    vm.close()
    assert vm.status == VMState.STOPPED


def test_run_result_str_is_informative() -> None:
    r = RunResult.from_bytes(3, b"out\n", b"err\n", 0.25)
    assert "exit_code=3" in str(r) and "'out\\n'" in str(r) and "'err\\n'" in str(r)
    html = r._repr_html_()
    assert "exit code 3" in html and "out" in html and "<pre" in html


# ---- against the shared VM -----------------------------------------------------------


@pytest.mark.vm
def test_env_vars_reach_commands(vm: SmolVM) -> None:
    before = vm.list_env_vars()
    try:
        vm.set_env_vars({"ONE": "1", "TWO": "two words"})
        assert vm.run('echo "$ONE|$TWO"', timeout=SLOW).stdout == "1|two words\n"
        assert vm.unset_env_vars(["ONE"]) == {"ONE": "1"}
        assert vm.run('echo "${ONE-unset}|$TWO"', timeout=SLOW).stdout == "unset|two words\n"
        assert SmolVM.from_id(vm.vm_id).list_env_vars()["TWO"] == "two words"  # kept with the VM
    finally:
        vm.set_env_vars(before, merge=False)


@pytest.mark.vm
def test_info_and_status_of_a_running_vm(vm: SmolVM) -> None:
    info = vm.info
    assert info.vm_id == vm.vm_id and info.status is VMState.RUNNING and vm.status == "running"
    assert info.pid == vm.pid and info.pid and info.created and info.created <= time.time()
    assert "<table" in info._repr_html_() and vm.vm_id in vm._repr_html_()
    assert vm.wait_for_ready(timeout=SLOW) is vm


@pytest.mark.vm
def test_make_dirs(vm: SmolVM, tmp_path: Path) -> None:
    src = tmp_path / "note.txt"
    src.write_text("hello\n")
    assert vm.upload_file(src, "/root/made/by/upload/note.txt") == 6
    assert vm.upload_file(src, "/root/made/folder/") == 6  # a trailing "/" keeps the local name
    r = vm.run("cat /root/made/by/upload/note.txt /root/made/folder/note.txt", timeout=SLOW)
    assert r.stdout == "hello\nhello\n", r
    with pytest.raises(FileNotFoundError, match="/root/not/made"):
        vm.upload_file(src, "/root/not/made/x", make_dirs=False)
    got = vm.download_file("/root/made/folder/note.txt", tmp_path / "new" / "dir" / "n.txt")
    assert got.read_text() == "hello\n"
    with pytest.raises(FileNotFoundError, match="absent"):
        vm.download_file("/root/made/folder/note.txt", tmp_path / "absent" / "n.txt", make_dirs=False)


# ---- Agentor, unchanged ----------------------------------------------------------------


@pytest.mark.own_vm
def test_agentor_smolvm_runtime(vm: SmolVM) -> None:
    """Agentor's own SmolVMRuntime and ShellTool (pip install agentor), as its docs use them."""
    pytest.importorskip("agentor", reason="agentor is an optional test dependency: pip install agentor")
    from agentor.runtime import SmolVMRuntime
    from agentor.tools import ShellTool
    from agentor.tools.shell import ShellCommandRequest

    runtime = SmolVMRuntime(timeout=SLOW)
    try:
        tool = ShellTool(executor=runtime)
        out = tool.run(ShellCommandRequest(
            command='echo "$GREETING from $(pwd)"; echo oops >&2', working_directory="/tmp",
            env={"GREETING": "hi", "N": 7},
        ))  # fmt: skip
        assert out == "hi from /tmp\noops\n"
        out = tool.run(ShellCommandRequest(command="echo $N; exit 3", timeout_ms=60_000))
        assert out == "7\n"  # env vars stay set, as set_env_vars(merge=True) keeps them
        vm_id = runtime.vm.vm_id
        assert vm_id in [r.vm_id for r in SmolVM.list()]
    finally:
        runtime.close()  # stop() then close()
    assert vm_id not in [r.vm_id for r in SmolVM.list()]
    assert runtime.vm.status == VMState.STOPPED


# ---- one memory range in Python and in the VMM ----------------------------------------


@pytest.mark.parametrize("value", ["63", "65537", "64x", "-1", "", "1e3"])
def test_vmm_checks_memory_like_python(value: str) -> None:
    import subprocess

    from smolvm import _validate
    from smolvm._native import vmm_path

    res = subprocess.run(
        [str(vmm_path()), "--restore", "/nonexistent", "--vsock-uds", "/nonexistent/s", "--mem-mib", value],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode != 0
    want = f"--mem-mib {value}: want a whole number from {_validate.MEMORY_MIN_MIB} to {_validate.MEMORY_MAX_MIB}"
    assert want in res.stderr, res.stderr
    for bad in (_validate.MEMORY_MIN_MIB - 1, _validate.MEMORY_MAX_MIB + 1):
        with pytest.raises(ValueError, match="memory must be between"):
            SmolVM(memory=bad)

"""Output as it arrives (run(on_stdout=), stream()), stdin (run(input=)) and quick agent errors, against real VMs."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from smolvm import RunResult, SmolVM

SLOW = 120  # guest commands on emulating hosts take seconds


@pytest.mark.vm
def test_chunks_arrive_one_by_one(vm: SmolVM) -> None:
    items = list(vm.stream("for i in 1 2 3; do echo $i; sleep 2; done", timeout=SLOW))
    assert items[:3] == [("stdout", b"1\n"), ("stdout", b"2\n"), ("stdout", b"3\n")], items
    result = items[3]
    assert len(items) == 4 and isinstance(result, RunResult) and result.ok and result.stdout == "1\n2\n3\n"


@pytest.mark.guest_only
@pytest.mark.vm
def test_first_chunk_arrives_while_the_command_runs(vm: SmolVM) -> None:
    """The command cannot end before the test has seen its first chunk: it waits for a file
    the test creates only then (a stream that delivered at the end would time out)."""
    go = f"/tmp/stream-go-{os.getpid()}"
    seen: list[object] = []
    cmd = f"echo ready; while [ ! -e {go} ]; do sleep 0.2; done; echo after"
    for item in vm.stream(cmd, timeout=5 * SLOW):  # loaded emulating hosts: forks take many seconds
        if not seen:
            assert vm.run(f"touch {go}", timeout=SLOW).ok
        seen.append(item)
    result = seen[-1]
    assert isinstance(result, RunResult) and not result.timed_out and result.ok, result
    assert seen[0] == ("stdout", b"ready\n") and result.stdout == "ready\nafter\n"


@pytest.mark.vm
def test_callbacks_get_both_streams_in_order(vm: SmolVM) -> None:
    events: list[tuple[str, bytes]] = []
    r = vm.run(
        "echo out1; sleep 1; echo err1 >&2; sleep 1; echo out2", timeout=SLOW,
        on_stdout=lambda b: events.append(("out", b)), on_stderr=lambda b: events.append(("err", b)),
    )  # fmt: skip
    assert r.ok and r.stdout == "out1\nout2\n" and r.stderr == "err1\n"
    assert events == [("out", b"out1\n"), ("err", b"err1\n"), ("out", b"out2\n")]


def _alive(vm: SmolVM, pidfile: str) -> str:
    """"alive" or "gone" for the pid in the guest file pidfile (shell builtins only: no ps/pgrep,
    whose /proc walk is slow in emulated guests)."""
    return vm.run(f"read p < {pidfile}; kill -0 $p 2>/dev/null && echo alive || echo gone", timeout=SLOW).output


@pytest.mark.vm
def test_callback_exception_kills_the_command(vm: SmolVM) -> None:
    pidfile = f"/tmp/stream-pid-{os.getpid()}"

    def boom(chunk: bytes) -> None:
        raise RuntimeError(f"callback saw {chunk!r}")

    with pytest.raises(RuntimeError, match="callback saw b'start"):
        vm.run(f"echo $$ > {pidfile}; echo start; exec sleep 3600", timeout=SLOW, on_stdout=boom)
    left = "?"
    for _ in range(20):  # the agent kills the group when the connection closes
        left = _alive(vm, pidfile)
        if left == "gone":
            break
        time.sleep(0.5)
    assert left == "gone"
    gen = vm.stream(f"echo $$ > {pidfile}; echo start; exec sleep 3600", timeout=SLOW)
    assert next(gen) == ("stdout", b"start\n")
    gen.close()  # leaving a stream early kills the command too
    for _ in range(20):
        left = _alive(vm, pidfile)
        if left == "gone":
            break
        time.sleep(0.5)
    assert left == "gone"


@pytest.mark.guest_only
@pytest.mark.vm
def test_stdin_one_mib_byte_exact(vm: SmolVM) -> None:
    data = os.urandom(1 << 20)
    r = vm.run("sha256sum", input=data, timeout=SLOW)
    assert r.ok, r
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    r = vm.run("cat", input=data, timeout=SLOW)
    assert r.stdout_bytes == data
    assert vm.run("tr a-z A-Z", input="héllo\n", timeout=SLOW).stdout == "HéLLO\n"
    assert vm.run("cat; echo end", timeout=SLOW).stdout == "end\n"  # no input: /dev/null
    with pytest.raises(TypeError, match="input"):
        vm.run("cat", input=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_stdout"):
        vm.run("true", on_stdout="print")  # type: ignore[arg-type]


def test_missing_cwd_raises_at_once(own_vm: SmolVM, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent ERROR proves the VM alive: the VMM is not probed (for up to GONE_PROBE_S) before raising.

    own_vm is an ephemeral VM (`with SmolVM()`), the case whose failed run() used to probe the
    control socket. The probe (VMMProcess.ended) is counted rather than the time measured, so a
    loaded host cannot fail the test and a probe cannot pass it.
    """
    from smolvm._vmm import VMMProcess

    probes: list[object] = []
    real_ended = VMMProcess.ended

    def counted(self: VMMProcess) -> tuple[str, str] | None:
        probes.append(self)
        return real_ended(self)

    monkeypatch.setattr(VMMProcess, "ended", counted)
    for run in (
        lambda: own_vm.run("pwd", cwd="/missing", timeout=SLOW),
        lambda: own_vm.run("pwd", cwd="/missing", timeout=SLOW, input=b""),  # the stream path
        lambda: list(own_vm.stream("pwd", cwd="/missing", timeout=SLOW)),
    ):
        with pytest.raises(FileNotFoundError) as info:
            run()
        assert info.value.filename == "/missing"
        assert probes == [], "run(cwd='/missing') probed the VMM: an agent ERROR was taken for a transport failure"
    with pytest.raises(NotADirectoryError):
        own_vm.run("pwd", cwd="/etc/hostname", timeout=SLOW)
    assert own_vm.run("echo alive", timeout=SLOW).stdout == "alive\n"

"""Output as it arrives (run(on_stdout=), stream()), stdin (run(input=)) and quick agent errors, against real VMs."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from smolvm import RunResult, SmolVM

SLOW = 120  # guest commands on emulating hosts take seconds


@pytest.mark.vm
def test_first_chunk_arrives_while_the_command_runs(vm: SmolVM) -> None:
    done = f"/tmp/stream-done-{os.getpid()}"
    seen: list[object] = []
    for item in vm.stream(f"for i in 1 2 3; do echo $i; sleep 2; done; touch {done}", timeout=SLOW):
        if not seen:  # the first chunk: ask the guest whether the loop has finished
            probe = vm.run(f"test -e {done} && echo finished || echo running", timeout=SLOW)
            seen.append(("probe", probe.stdout))
        seen.append(item)
    result = seen[-1]
    assert isinstance(result, RunResult) and result.ok and result.stdout == "1\n2\n3\n"
    assert seen[0] == ("probe", "running\n"), seen  # the first chunk came before the command ended
    chunks = [i for i in seen[1:-1] if isinstance(i, tuple)]
    assert b"".join(c for k, c in chunks if k == "stdout") == b"1\n2\n3\n"
    assert chunks[0] == ("stdout", b"1\n")


@pytest.mark.vm
def test_callbacks_get_both_streams_in_order(vm: SmolVM) -> None:
    events: list[tuple[str, bytes]] = []
    r = vm.run(
        "echo out1; sleep 1; echo err1 >&2; sleep 1; echo out2", timeout=SLOW,
        on_stdout=lambda b: events.append(("out", b)), on_stderr=lambda b: events.append(("err", b)),
    )  # fmt: skip
    assert r.ok and r.stdout == "out1\nout2\n" and r.stderr == "err1\n"
    assert events == [("out", b"out1\n"), ("err", b"err1\n"), ("out", b"out2\n")]


@pytest.mark.vm
def test_callback_exception_kills_the_command(vm: SmolVM) -> None:
    tag = f"sleep 3{os.getpid() % 1000}"  # a command line we can look for

    def boom(chunk: bytes) -> None:
        raise RuntimeError(f"callback saw {chunk!r}")

    with pytest.raises(RuntimeError, match="callback saw b'start"):
        vm.run(f"echo start; {tag}; echo end", timeout=SLOW, on_stdout=boom)
    left = "?"
    for _ in range(20):  # the agent kills the group when the connection closes
        left = vm.run(f"pgrep -f '^{tag}$' || echo none", timeout=SLOW).stdout
        if left == "none\n":
            break
        time.sleep(0.5)
    assert left == "none\n"
    gen = vm.stream(f"echo start; {tag}", timeout=SLOW)
    assert next(gen) == ("stdout", b"start\n")
    gen.close()  # leaving a stream early kills the command too
    assert vm.run("echo alive", timeout=SLOW).stdout == "alive\n"


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


@pytest.mark.own_vm
def test_missing_cwd_raises_at_once(own_vm: SmolVM) -> None:
    """An agent ERROR proves the VM alive: no probing of the VMM (which took 2 s) before raising."""
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        own_vm.run("pwd", cwd="/missing", timeout=SLOW)
    took = time.monotonic() - t0
    print(f"\nrun(cwd='/missing') raised after {took * 1000:.0f} ms")
    assert info.value.filename == "/missing"
    with pytest.raises(NotADirectoryError):
        own_vm.run("pwd", cwd="/etc/hostname", timeout=SLOW)
    with pytest.raises(FileNotFoundError):
        list(own_vm.stream("pwd", cwd="/missing", timeout=SLOW))
    assert own_vm.run("echo alive", timeout=SLOW).stdout == "alive\n"

"""Interactive terminals in real VMs: vm.pty(), vm.async_pty() and `smolvm shell` under a real host pty."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from smolvm import PtyClosedError, PtySession, SmolVM, VMGoneError, VMNotRunningError

SLOW = 120.0  # emulated guests: a fork can take seconds under load


def _until(t: PtySession, pattern: bytes, seen: bytearray) -> re.Match[bytes]:
    deadline = time.monotonic() + SLOW
    while not (m := re.search(pattern, bytes(seen))):
        assert time.monotonic() < deadline and t.exit_code is None, f"no {pattern!r} in {bytes(seen)!r}"
        seen += t.read(timeout=1)
    return m


@pytest.mark.vm
def test_bash_sees_a_tty_resizes_and_exits_with_its_code(vm: SmolVM) -> None:
    with vm.pty("bash --norc --noprofile", rows=24, cols=80, env={"PS1": "$ "}) as t:
        assert isinstance(t.pid, int) and t.pid > 1 and t.exit_code is None
        seen = bytearray()
        t.write("tty; stty size; echo T=$TERM\n")
        _until(t, rb"/dev/pts/\d+\r\n24 80\r\nT=xterm-256color\r\n", seen)
        t.resize(40, 100)
        t.write(b"stty size\n")
        _until(t, rb"\b40 100\r\n", seen)
        t.write("exit 7\n")
        assert t.wait(timeout=SLOW) == 7 and t.exit_code == 7 and t.signal == 0
        while t.read(timeout=1):
            pass
        assert t.read() == b""  # the end
        with pytest.raises(PtyClosedError, match="exit code 7"):
            t.write("echo more\n")
    assert t.closed
    with pytest.raises(PtyClosedError, match="closed"):
        t.resize(10, 10)
    assert t.read() == b""


@pytest.mark.vm
def test_close_leaves_no_guest_process(vm: SmolVM) -> None:
    tag = f"pty-close-{os.getpid()}"
    t = vm.pty(f"set -m; sleep 1000 & echo $! > /tmp/{tag}.job; echo $$ > /tmp/{tag}.sh; echo go; exec sleep 999")
    _until(t, rb"go", bytearray())
    t.close()
    t.close()  # idempotent
    check = f"for p in $(cat /tmp/{tag}.job /tmp/{tag}.sh); do [ -d /proc/$p ] && echo alive $p; done; true"
    deadline = time.monotonic() + SLOW
    while (left := vm.run(check, timeout=SLOW).stdout) != "":
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(0.5)


@pytest.mark.vm
def test_signal_death_timeout_and_bad_input(vm: SmolVM) -> None:
    with vm.pty("echo A=$A; pwd", 24, 80, {"A": "x1"}, "/tmp") as t:  # the positional order others rely on
        assert t.wait(timeout=SLOW) == 0
        out = b""
        while chunk := t.read(timeout=1):
            out += chunk
        assert b"A=x1\r\n/tmp\r\n" in out, out
    with vm.pty("kill -9 $$") as t:
        assert t.wait(timeout=SLOW) == 137 and t.signal == 9  # as run() reports it
    with vm.pty("sleep 100", timeout=1) as t:
        assert t.wait(timeout=SLOW) == 124 and t.timed_out
    for rows, cols in ((0, 80), (24, 0), (5000, 80), (24, 10**6)):
        with pytest.raises(ValueError, match="1..4096"):
            vm.pty("sh", rows=rows, cols=cols)
    with pytest.raises(TypeError):
        vm.pty("sh", rows=True)
    with pytest.raises(FileNotFoundError):
        vm.pty("sh", cwd="/nonexistent-smolvm")
    with vm.pty("sh") as t:
        with pytest.raises(TimeoutError):
            t.wait(timeout=0.5)
        with pytest.raises(ValueError):
            t.read(0)
        with pytest.raises(TypeError):
            t.write(3)  # type: ignore[arg-type]


@pytest.mark.vm
def test_async_pty_on_the_event_loop(vm: SmolVM) -> None:
    async def main() -> tuple[int, bytes]:
        t = await vm.async_pty("sh", 30, 90)
        async with t:
            await t.write("stty size; exit 3\n")
            seen = b""
            while chunk := await t.read(timeout=SLOW):
                seen += chunk
            return await t.wait(timeout=SLOW), seen

    code, seen = asyncio.run(main())
    assert code == 3 and b"30 90\r\n" in seen


@pytest.mark.own_vm
def test_a_dead_vm_raises(own_vm: SmolVM) -> None:
    t = own_vm.pty("sh")
    assert own_vm.pid is not None
    os.kill(own_vm.pid, signal.SIGKILL)
    with pytest.raises(VMGoneError, match=own_vm.vm_id):
        t.wait(timeout=SLOW)
    with pytest.raises(VMGoneError):
        own_vm.pty("sh")
    own_vm.delete()
    with pytest.raises((VMGoneError, VMNotRunningError)):
        own_vm.pty("sh")


def _cli(
    argv: list[str], env: dict[str, str], rows: int, cols: int, script: list[tuple[bytes, bytes | None]]
) -> tuple[int, bytes]:
    """Run `python -m smolvm ARGV` under a new host pty of rows x cols; for each (wait_for, then_type)
    wait until the output shows wait_for, then type (None: make the pty 50x120 instead). Afterwards
    `stty -g` must show the terminal as before. Returns the CLI's exit status and its output."""
    wrapper = (
        'before=$(stty -g); "$@"; rc=$?; [ "$(stty -g)" = "$before" ] && echo TTY-RESTORED; exit $rc'
    )
    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdin/stdout/stderr are the new pty
        os.execvpe("sh", ["sh", "-c", wrapper, "sh", sys.executable, "-m", "smolvm", *argv], env)
    fcntl_winsize(fd, rows, cols)
    out = bytearray()
    deadline = time.monotonic() + 4 * SLOW
    steps = list(script)
    mark = 0  # each step waits for output after the previous one
    try:
        while True:
            if steps and steps[0][0] in out[mark:]:
                _wait, typed = steps.pop(0)
                mark = len(out)
                if typed is None:
                    fcntl_winsize(fd, 50, 120)  # the kernel sends SIGWINCH to the CLI
                else:
                    os.write(fd, typed)
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the child side closed
                    break
                if not data:
                    break
                out += data
            assert time.monotonic() < deadline, f"the CLI did not finish: {bytes(out)!r}"
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), bytes(out)


def fcntl_winsize(fd: int, rows: int, cols: int) -> None:
    import fcntl

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@pytest.mark.vm
def test_cli_shell_is_raw_resizes_and_passes_the_exit_code(vm: SmolVM, smolvm_env: dict[str, str]) -> None:
    code, out = _cli(
        ["shell", vm.vm_id, "-c", "PS1='$ ' bash --norc --noprofile"], smolvm_env, 33, 97,
        [(b"$ ", b"stty size; echo MARK$((1))\r"), (b"MARK1\r\n", None), (b"$ ", b"sleep 1; stty size; exit 9\r")],
    )  # fmt: skip
    assert code == 9, out
    assert b"33 97\r\n" in out and b"50 120\r\n" in out, out
    assert b"TTY-RESTORED" in out, out


@pytest.mark.vm
def test_cli_shell_without_id_uses_a_vm_of_its_own(vm: SmolVM, smolvm_env: dict[str, str]) -> None:
    from smolvm import registry

    before = {r.vm_id for r in registry.scan()[0]}
    code, out = _cli(["shell", "-c", "echo inside $(hostname); exit 4"], smolvm_env, 24, 80, [])
    assert code == 4 and b"inside vm-" in out and b"TTY-RESTORED" in out, out
    assert {r.vm_id for r in registry.scan()[0]} <= before  # its VM was deleted


def test_cli_shell_unknown_id(smolvm_env: dict[str, str]) -> None:
    res = subprocess.run([sys.executable, "-m", "smolvm", "shell", "vm-000000000000"], capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL, env=smolvm_env)  # fmt: skip
    assert res.returncode == 1 and "vm-000000000000" in res.stderr

"""`smolvm shell [ID]`: this terminal on a shell in a VM (a running one, or a fresh ephemeral one), exiting with the shell's code."""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ._common import EXIT_SMOLVM_ERROR, add_command, fail, on_vm

if TYPE_CHECKING:
    from .._pty import PtySession
    from ..vm import SmolVM

DEFAULT_SHELL = "if command -v bash >/dev/null; then exec bash; else exec sh; fi"
SLICE_S = 0.1


def _size(fd: int) -> tuple[int, int]:
    try:
        cols, rows = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return max(1, rows), max(1, cols)


@contextmanager
def _raw(fd: int) -> Iterator[None]:
    """The terminal on fd in raw mode (if it is one), restored however the block ends
    (SIGTERM and SIGHUP become SystemExit so that the restore runs)."""
    import termios
    import tty

    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for s in old:
        signal.signal(s, leave)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for s, h in old.items():
            signal.signal(s, h)


def _pipe(t: PtySession, fd_in: int, fd_out: int) -> int:
    """stdin to the terminal, its output to stdout, resizes on SIGWINCH, until the shell exits."""
    resized = [False]
    prev = signal.signal(signal.SIGWINCH, lambda *_: resized.__setitem__(0, True))
    open_in = True
    try:
        while True:
            if resized[0]:
                resized[0] = False
                t.resize(*_size(fd_in if os.isatty(fd_in) else fd_out))
            try:
                ready, _, _ = select.select([fd_in, t.fileno()] if open_in else [t.fileno()], [], [], SLICE_S)
            except InterruptedError:
                continue
            if fd_in in ready:
                data = os.read(fd_in, 65536)
                if data:
                    t.write(data)
                else:  # end of our input: a terminal's end of input is ^D
                    open_in = False
                    t.write(b"\x04")
            while out := t.read(timeout=0):
                os.write(fd_out, out)
            if t.exit_code is not None:
                return t.exit_code
    finally:
        signal.signal(signal.SIGWINCH, prev)


def _interact(vm: SmolVM, command: str) -> int:
    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    rows, cols = _size(fd_in if os.isatty(fd_in) else fd_out)
    env = {"TERM": os.environ.get("TERM", "xterm-256color")}
    with vm.pty(command, rows, cols, env=env) as t, _raw(fd_in):
        return _pipe(t, fd_in, fd_out) & 0xFF


def cmd_shell(args: argparse.Namespace) -> int:
    from ..errors import SmolVMError
    from ..vm import SmolVM

    command = args.command or DEFAULT_SHELL
    if args.vm_id:
        return on_vm(args.vm_id, lambda vm: _interact(vm, command), errors=(ValueError, TypeError))
    try:
        vm = SmolVM()
        print(f"smolvm: booting {vm.vm_id} (deleted when the shell exits)", file=sys.stderr, flush=True)
        with vm:
            return _interact(vm, command)
    except (SmolVMError, ValueError, TypeError) as e:
        return fail(str(e), EXIT_SMOLVM_ERROR)


def add_parser(sub: Any) -> None:
    p = add_command(sub, "shell", cmd_shell, "an interactive shell in a VM on this terminal",
                    description="Without ID: a fresh VM, deleted when the shell exits. Exit status: the "
                    "shell's; 1 for an unknown VM id; 125 if the VM could not run it.")  # fmt: skip
    p.add_argument("vm_id", metavar="ID", nargs="?", help="a running VM (`smolvm ls`); default: a new one")
    p.add_argument("-c", "--command", default=None, help="run this instead of bash (or sh)")

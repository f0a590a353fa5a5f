"""Interactive terminals in the guest: vm.pty() gives a PtySession, vm.async_pty() an AsyncPtySession.

Both drive one `_smolvm.PtySession` (csrc/client/pty_client.c): the sync one waits with the
GIL released in slices of PUMP_SLICE_S, the async one on the event loop (the socket
registered with add_reader/add_writer), no thread per session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import _stream, _validate
from ._native import native
from .errors import AgentError, PtyClosedError

if TYPE_CHECKING:
    from .vm import SmolVM

PUMP_SLICE_S = 0.1  # longest wait with the GIL released before signals are checked again
START_TIMEOUT_S = 60.0  # the agent answers a PTY request at once; this long means it is stuck
READ_SIZE = 65536


def size(rows: object, cols: object) -> tuple[int, int]:
    """rows and cols checked: ints in 1..PTY_MAX_DIM."""
    top = int(native().PTY_MAX_DIM)
    for name, v in (("rows", rows), ("cols", cols)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, not {type(v).__name__}")
        if not 1 <= v <= top:
            raise ValueError(f"{name}={v}: a terminal has 1..{top} {name}")
    return int(rows), int(cols)  # type: ignore[call-overload]


def data_bytes(data: object) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8", "surrogateescape")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"data must be bytes or str, not {type(data).__name__}")


def _deadline(timeout: float | None) -> float | None:
    """None (no limit), or when timeout seconds (0: look once, do not wait) from now pass."""
    if timeout is None:
        return None
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout == 0:
        return time.monotonic()
    return time.monotonic() + _validate.seconds("timeout", timeout, 86_400.0)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _not_started(vm: SmolVM) -> AgentError:
    return AgentError(f"the guest agent of {vm.vm_id} did not start the PTY within {START_TIMEOUT_S:.0f} s")


class _Base:
    """What the sync and async sessions share: the native session, its request, status."""

    def __init__(self, vm: SmolVM, s: Any, req: _stream.ExecRequest) -> None:
        self._vm = vm
        self._s = s
        self._req = req
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The shell's pid in the guest."""
        pid: int | None = self._s.pid
        return pid

    @property
    def exit_code(self) -> int | None:
        """None while the command runs; then its exit code (128+N if signal N killed it, 124 on timeout)."""
        st = self._s.status
        return None if st is None else int(st[0])

    @property
    def signal(self) -> int:
        """The signal that killed the command, or 0."""
        st = self._s.status
        return 0 if st is None else int(st[1])

    @property
    def timed_out(self) -> bool:
        st = self._s.status
        return bool(st and st[2])

    @property
    def closed(self) -> bool:
        return self._closed

    def _pump(self, timeout: float) -> bool:
        try:
            return bool(self._s.pump(timeout))
        except _stream.AGENT_ERRORS as e:
            raise self._vm._exec_failed(e, self._req) from None

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise PtyClosedError(
                f"{what}: the PTY session of {self._vm.vm_id} was closed; open a new one with vm.pty()"
            )
        if self._s.done:
            raise PtyClosedError(
                f"{what}: the PTY session's command in {self._vm.vm_id} has exited "
                f"(exit code {self.exit_code}); open a new one with vm.pty()"
            )

    def _wait_left(self, deadline: float | None, timeout: float | None) -> float | None:
        """wait()'s next slice: seconds left (None: no limit); raises once it cannot go on."""
        if self._closed:
            raise PtyClosedError(
                f"wait: the PTY session of {self._vm.vm_id} was closed before its command exited"
            )
        left = _left(deadline)
        if left == 0.0:
            raise TimeoutError(f"the PTY session's command in {self._vm.vm_id} still runs after {timeout} s")
        return left

    def _exit_code(self) -> int:
        code = self.exit_code
        if code is None:  # the connection failed, and that raised already; closed meanwhile
            raise PtyClosedError(f"wait: the PTY session of {self._vm.vm_id} ended without an exit status")
        return code

    def _take(self, n: int) -> bytes:
        out: bytes = self._s.read(n)
        return out

    def close(self) -> None:
        """End the session: the guest kills every process of it (the shell and its jobs). Idempotent."""
        self._closed = True
        self._s.close()

    def __repr__(self) -> str:
        code = self.exit_code
        state = "closed" if self._closed else "running" if code is None else f"exit_code={code}"
        return f"<{type(self).__name__} {self._vm.vm_id} pid={self.pid} {state}>"


class PtySession(_Base):
    """A command on a guest terminal (vm.pty()). A context manager: leaving it closes the session.

    >>> with vm.pty("bash") as t:
    ...     t.write("echo hi; exit 3\\n"); t.wait(); print(t.read(), t.exit_code)
    """

    def write(self, data: bytes | str) -> None:
        """Type data (str as UTF-8) on the terminal; returns once the socket took it all."""
        raw = data_bytes(data)
        self._check_open("write")
        self._s.write(raw)
        while self._s.pending and not self._s.done:
            self._pump(PUMP_SLICE_S)

    def read(self, n: int = READ_SIZE, timeout: float | None = None) -> bytes:
        """Up to n bytes of terminal output, waiting until some came. b"" at the end
        (the command exited and everything was read, or the session was closed), and also
        when timeout seconds passed with nothing to read (exit_code then still None)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        deadline = _deadline(timeout)
        pumped = False
        while not self._closed:
            if self._s.available:
                return self._take(n)
            if self._s.done:
                return b""
            left = _left(deadline)
            if left == 0.0 and pumped:
                return b""
            self._pump(PUMP_SLICE_S if left is None else min(left, PUMP_SLICE_S))
            pumped = True
        return b""

    def resize(self, rows: int, cols: int) -> None:
        """Give the terminal a new size (the program gets SIGWINCH)."""
        r, c = size(rows, cols)
        self._check_open("resize")
        self._s.resize(r, c)
        self._pump(0)

    def wait(self, timeout: float | None = None) -> int:
        """Until the command exits: its exit code. Output meanwhile is kept for read().
        TimeoutError after timeout seconds (the session goes on)."""
        deadline = _deadline(timeout)
        while not self._s.done:
            left = self._wait_left(deadline, timeout)
            self._pump(PUMP_SLICE_S if left is None else min(left, PUMP_SLICE_S))
        return self._exit_code()

    def fileno(self) -> int:
        """The connection's socket (readable when output or the exit may have come), for select()."""
        fd: int = self._s.fileno()
        return fd

    def __enter__(self) -> PtySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WAKE_S = 1.0  # async: with no traffic, wake this often (the host deadline, a closed session)


class AsyncPtySession(_Base):
    """PtySession for asyncio (vm.async_pty()): the same methods as coroutines, waiting on the loop."""

    async def _step(self, timeout: float | None) -> None:
        """One wait on the loop (at most timeout, WAKE_S at most), then a nonblocking pump."""
        if self._s.done or self._closed:
            return
        self._pump(0)
        if self._s.done or self._s.available:
            return
        wake = WAKE_S if timeout is None else min(timeout, WAKE_S)
        await _stream.wait_fd(self._s.fileno(), self._s.wants_write(), wake)
        if not self._closed:
            self._pump(0)

    async def _started(self) -> AsyncPtySession:
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.pid is None and not self._s.done:
            if time.monotonic() > deadline:
                self.close()
                raise _not_started(self._vm)
            await self._step(_left(deadline))
        return self

    async def write(self, data: bytes | str) -> None:
        raw = data_bytes(data)
        self._check_open("write")
        self._s.write(raw)
        self._pump(0)
        while self._s.pending and not self._s.done and not self._closed:
            await _stream.wait_fd(self._s.fileno(), True, WAKE_S)
            self._pump(0)

    async def read(self, n: int = READ_SIZE, timeout: float | None = None) -> bytes:
        """As PtySession.read()."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        deadline = _deadline(timeout)
        pumped = False
        while not self._closed:
            if self._s.available:
                return self._take(n)
            if self._s.done:
                return b""
            left = _left(deadline)
            if left == 0.0 and pumped:
                return b""
            await self._step(left)
            pumped = True
        return b""

    async def resize(self, rows: int, cols: int) -> None:
        r, c = size(rows, cols)
        self._check_open("resize")
        self._s.resize(r, c)
        self._pump(0)

    async def wait(self, timeout: float | None = None) -> int:
        """As PtySession.wait()."""
        deadline = _deadline(timeout)
        while not self._s.done:
            await self._step(self._wait_left(deadline, timeout))
        return self._exit_code()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> AsyncPtySession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def open_native(
    vm: SmolVM, cmd: str, rows: object, cols: object, env: Mapping[str, str] | None,
    cwd: str | None, timeout: float | None,
) -> tuple[Any, _stream.ExecRequest]:  # fmt: skip
    """Check the arguments, start the VM if needed, connect and send the PTY request."""
    r, c = size(rows, cols)
    t_ms = 0 if timeout is None else _validate.timeout_ms(timeout)
    call = _stream.check(cmd, 30 if timeout is None else timeout, env, cwd)
    req = vm._request(call)
    req = _stream.ExecRequest(req.uds, req.command, req.cwd, req.env, t_ms, -1)
    nat = native()
    try:
        s = nat.pty_start(req.uds, nat.AGENT_PORT, req.command, req.cwd, req.env, t_ms, -1, r, c)
    except _stream.AGENT_ERRORS as e:
        raise vm._exec_failed(e, req) from None
    return s, req


def open_sync(
    vm: SmolVM, cmd: str, rows: object, cols: object, env: Mapping[str, str] | None,
    cwd: str | None, timeout: float | None,
) -> PtySession:  # fmt: skip
    s, req = open_native(vm, cmd, rows, cols, env, cwd, timeout)
    session = PtySession(vm, s, req)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while session.pid is None and not s.done:
            if time.monotonic() > deadline:
                raise _not_started(vm)
            session._pump(PUMP_SLICE_S)
    except BaseException:
        session.close()
        raise
    return session


async def open_async(
    vm: SmolVM, cmd: str, rows: object, cols: object, env: Mapping[str, str] | None,
    cwd: str | None, timeout: float | None,
) -> AsyncPtySession:  # fmt: skip
    if vm._status == "created":
        await asyncio.to_thread(vm._start, False)
    s, req = open_native(vm, cmd, rows, cols, env, cwd, timeout)
    session = AsyncPtySession(vm, s, req)
    try:
        return await session._started()
    except BaseException:
        session.close()
        raise

"""asyncio for SmolVM: async_run() waits on the event loop (the agent connection's socket), no thread per command.

Booting, stopping and deleting a VM are blocking steps (spawning the VMM, reading its
control socket, removing files): those run in a worker thread (asyncio.to_thread).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import _pty, _stream
from ._native import native
from .result import RunResult

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:
    from typing_extensions import Unpack
if TYPE_CHECKING:
    from .vm import SmolVM

WAKE_S = 1.0  # with no traffic, wake this often so that the host deadline is checked


async def run(
    vm: SmolVM, req: _stream.ExecRequest, data: bytes | None,
    on_stdout: _stream.OutputCallback | None, on_stderr: _stream.OutputCallback | None,
) -> RunResult:  # fmt: skip
    """One exec driven by the running loop. Cancelling the awaiting task closes the
    connection, and the agent kills the command's process group."""
    nat = native()
    events = on_stdout is not None or on_stderr is not None
    s = _stream.open_stream(vm, req, data, events=events)
    try:
        fd = s.fileno()
        while True:
            got = _stream.pump(vm, s, req, 0)
            for kind, chunk in got:
                cb = on_stdout if kind == nat.STDOUT else on_stderr
                if cb is not None:
                    cb(chunk)
            if s.done:
                break
            await _stream.wait_fd(fd, s.wants_write(), WAKE_S)
        code, sig, out, err, timed_out = s.result()
    finally:
        s.close()
    return RunResult.from_bytes(code, out, err, req.elapsed(), timed_out=bool(timed_out), signal=sig)


class AsyncMixin:
    """The original smolvm's async_* twins, mixed into SmolVM."""

    async def async_start(self: SmolVM) -> SmolVM:  # type: ignore[misc]
        """start() in a worker thread (booting or restoring blocks)."""
        await asyncio.to_thread(self.start)
        return self

    async def async_run(  # type: ignore[misc]
        self: SmolVM, command: str, timeout: float = 30, **options: Unpack[_stream.RunOptions]
    ) -> RunResult:
        """run() on the event loop (the same keywords): waiting for the guest takes no thread.

        A never-started VM is started first (ephemeral, as run() does; in a worker thread).
        Cancelling the task kills the guest command.
        """
        call = _stream.check(command, timeout, **options)
        if self._status == "created":
            await asyncio.to_thread(self._start, False)
        return await run(self, self._request(call), call.data, call.on_stdout, call.on_stderr)

    async def async_pty(  # type: ignore[misc]
        self: SmolVM, cmd: str = "bash", rows: int = 24, cols: int = 80,
        env: Mapping[str, str] | None = None, cwd: str | None = None, *, timeout: float | None = None,
    ) -> _pty.AsyncPtySession:  # fmt: skip
        """pty() for asyncio (the same arguments): an AsyncPtySession whose read/write/wait
        are coroutines waiting on the event loop (no thread per session)."""
        return await _pty.open_async(self, cmd, rows, cols, env, cwd, timeout)

    async def async_wait_for_ready(self: SmolVM, timeout: float = 60.0) -> SmolVM:  # type: ignore[misc]
        await asyncio.to_thread(self.wait_for_ready, timeout)
        return self

    async def async_stop(self: SmolVM) -> None:  # type: ignore[misc]
        await asyncio.to_thread(self.stop)

    async def async_delete(self: SmolVM) -> None:  # type: ignore[misc]
        await asyncio.to_thread(self.delete)

    async def async_close(self: SmolVM) -> None:  # type: ignore[misc]
        await asyncio.to_thread(self.close)

    async def __aenter__(self: SmolVM) -> SmolVM:  # type: ignore[misc]
        """`async with SmolVM() as vm:` an ephemeral VM, like `with`."""
        await asyncio.to_thread(self.__enter__)
        return self

    async def __aexit__(self: SmolVM, *exc: object) -> None:  # type: ignore[misc]
        await asyncio.to_thread(self.__exit__, None, None, None)


class AsyncSmolVM:
    """SmolVM with coroutine methods of the same names (E2B-style twin).

    >>> async with AsyncSmolVM() as vm:
    ...     r = await vm.run("uname -a")

    run() waits on the event loop; start/stop/delete/close run in a worker thread.
    Attributes not listed here (vm_id, status, info, set_env_vars, ...) are the SmolVM's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from .vm import SmolVM

        self.sync = SmolVM(*args, **kwargs)

    @classmethod
    def from_id(cls, vm_id: str) -> AsyncSmolVM:
        from .vm import SmolVM

        self = cls.__new__(cls)
        self.sync = SmolVM.from_id(vm_id)
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sync, name)

    def __repr__(self) -> str:
        return "Async" + repr(self.sync)

    async def start(self) -> AsyncSmolVM:
        await self.sync.async_start()
        return self

    async def run(self, command: str, timeout: float = 30, **kwargs: Any) -> RunResult:
        return await self.sync.async_run(command, timeout, **kwargs)

    async def pty(self, cmd: str = "bash", rows: int = 24, cols: int = 80, **kwargs: Any) -> _pty.AsyncPtySession:
        return await self.sync.async_pty(cmd, rows, cols, **kwargs)

    async def wait_for_ready(self, timeout: float = 60.0) -> AsyncSmolVM:
        await self.sync.async_wait_for_ready(timeout)
        return self

    async def stop(self) -> None:
        await self.sync.async_stop()

    async def delete(self) -> None:
        await self.sync.async_delete()

    async def close(self) -> None:
        await self.sync.async_close()

    async def __aenter__(self) -> AsyncSmolVM:
        await self.sync.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sync.__aexit__(*exc)

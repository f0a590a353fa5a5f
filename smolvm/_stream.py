"""Commands whose output is handed over as it arrives, or that read stdin: run(on_stdout=, input=) and stream()."""

from __future__ import annotations

import asyncio

import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Union

from . import _validate
from ._native import native
from .errors import ProtocolError
from .result import RunResult

if TYPE_CHECKING:
    from .vm import SmolVM

Chunk = tuple[Literal["stdout", "stderr"], bytes]
StreamItem = Union[Chunk, RunResult]
OutputCallback = Callable[[bytes], object]

PUMP_SLICE_S = 0.1  # longest wait with the GIL released before signals are checked again
AGENT_ERRORS = (OSError, ProtocolError)  # what _smolvm raises for a failed exec; SmolVM._exec_failed maps them


class StreamOptions(TypedDict, total=False):
    """The keywords of stream() (and of run(), which adds RunOptions' callbacks)."""

    env: Mapping[str, str] | None  # on top of set_env()'s variables
    cwd: str | None  # an absolute guest path; default "/"
    input: bytes | str | None  # stdin (str as UTF-8); None: /dev/null


class RunOptions(StreamOptions, total=False):
    """The keywords of run() and async_run()."""

    on_stdout: OutputCallback | None  # called with each chunk of stdout as it arrives
    on_stderr: OutputCallback | None


@dataclass(frozen=True)
class Call:
    """A command's arguments, checked (check() makes it) before the VM is asked."""

    command: str
    timeout_ms: int
    cwd: str
    env: Mapping[str, str]
    data: bytes | None
    on_stdout: OutputCallback | None
    on_stderr: OutputCallback | None

    @property
    def streams(self) -> bool:
        """Does it need an exec stream (stdin or callbacks) rather than one exec() call?"""
        return self.data is not None or self.on_stdout is not None or self.on_stderr is not None


def check(
    command: str, timeout: float, env: Mapping[str, str] | None = None, cwd: str | None = None,
    input: object = None, on_stdout: object = None, on_stderr: object = None,
) -> Call:  # fmt: skip
    """run()'s arguments checked (TypeError or ValueError saying what is wrong)."""
    data = input_bytes(input)
    out_cb = callback("on_stdout", on_stdout)
    err_cb = callback("on_stderr", on_stderr)
    cmd = _validate.command(command)
    t_ms = _validate.timeout_ms(timeout)
    _validate.env(env)
    return Call(cmd, t_ms, _validate.cwd(cwd), dict(env or {}), data, out_cb, err_cb)


@dataclass(frozen=True)
class ExecRequest:
    """One checked command for the agent, with the VM's socket and variables (SmolVM._request builds it)."""

    uds: str
    command: str
    cwd: str
    env: list[str]
    timeout_ms: int
    host_timeout_ms: int
    t0: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def input_bytes(value: object) -> bytes | None:
    """run(input=): bytes-like or str (UTF-8), or None for no stdin (/dev/null)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"input must be bytes or str, not {type(value).__name__}")


def callback(name: str, value: object) -> OutputCallback | None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable taking bytes, not {type(value).__name__}")
    return value  # type: ignore[return-value]


def open_stream(vm: SmolVM, req: ExecRequest, data: bytes | None, events: bool) -> Any:
    nat = native()
    try:
        return nat.exec_start(
            req.uds, nat.AGENT_PORT, req.command, req.cwd, req.env, req.timeout_ms,
            req.host_timeout_ms, input=data, events=events,
        )  # fmt: skip
    except AGENT_ERRORS as e:
        raise vm._exec_failed(e, req) from None


def pump(vm: SmolVM, s: Any, req: ExecRequest, timeout: float) -> list[tuple[int, bytes]]:
    """One ExecStream.pump(timeout): the output chunks that came, or the exception the failure means."""
    try:
        got: list[tuple[int, bytes]] = s.pump(timeout)
    except AGENT_ERRORS as e:
        raise vm._exec_failed(e, req) from None
    return got


def chunks(vm: SmolVM, req: ExecRequest, data: bytes | None) -> Generator[StreamItem, None, None]:
    """Drive one exec: yield (kind, bytes) as output arrives, then the RunResult.

    Closing the generator early (or an exception thrown into it) closes the connection,
    and the agent kills the command's process group.
    """
    nat = native()
    kinds: dict[int, Literal["stdout", "stderr"]] = {nat.STDOUT: "stdout", nat.STDERR: "stderr"}
    s = open_stream(vm, req, data, events=True)
    try:
        while not s.done:
            for kind, chunk in pump(vm, s, req, PUMP_SLICE_S):
                yield kinds[kind], chunk
        code, sig, out, err, timed_out = s.result()
    finally:
        s.close()
    yield RunResult.from_bytes(
        code, out, err, req.elapsed(), timed_out=bool(timed_out), signal=sig
    )


def run(
    vm: SmolVM, req: ExecRequest, data: bytes | None,
    on_stdout: OutputCallback | None, on_stderr: OutputCallback | None,
) -> RunResult:  # fmt: skip
    """run() with callbacks or stdin. A callback's exception kills the command and propagates."""
    if on_stdout is None and on_stderr is None:
        s = open_stream(vm, req, data, events=False)
        try:
            while not s.done:
                pump(vm, s, req, PUMP_SLICE_S)
            code, sig, out, err, timed_out = s.result()
        finally:
            s.close()
        return RunResult.from_bytes(
            code, out, err, req.elapsed(), timed_out=bool(timed_out), signal=sig
        )
    gen = chunks(vm, req, data)
    try:
        for item in gen:
            if isinstance(item, RunResult):
                return item
            kind, chunk = item
            cb = on_stdout if kind == "stdout" else on_stderr
            if cb is not None:
                cb(chunk)
    finally:
        gen.close()  # after a callback's exception: closes the connection, the agent kills the command
    raise AssertionError("the exec stream ended without a result")  # pragma: no cover


async def wait_fd(fd: int, write: bool, timeout: float | None) -> None:
    """Until fd is readable (or writable, if write), or timeout seconds passed, on the running loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, wake)
    if write:
        loop.add_writer(fd, wake)
    try:
        await asyncio.wait([fut], timeout=timeout)
    finally:
        loop.remove_reader(fd)
        if write:
            loop.remove_writer(fd)

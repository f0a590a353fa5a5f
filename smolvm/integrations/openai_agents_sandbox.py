"""SmolVM as an OpenAI Agents SDK sandbox (`agents.sandbox`): SandboxAgent's whole computer is a microVM.

    from agents import Runner
    from agents.run import RunConfig
    from agents.sandbox import SandboxAgent, SandboxRunConfig
    from smolvm.integrations.openai_agents import SmolVMSandboxClient, SmolVMSandboxClientOptions

    client = SmolVMSandboxClient()
    run_config = RunConfig(sandbox=SandboxRunConfig(client=client, options=SmolVMSandboxClientOptions()))
    await Runner.run(SandboxAgent(name="dev", model="gpt-5"), "...", run_config=run_config)

Each session is a persistent SmolVM (start() outside `with`): its serialized state names the
VM, so `client.resume(state)` reattaches with SmolVM.from_id from any process on the machine,
and only `client.delete(session)` ends it (`shutdown()` just lets go of the handle, as
Docker's stops without removing). A state whose VM is gone resumes into a fresh VM of the same
configuration, whose workspace the SDK rebuilds from the state's snapshot.

Waiting never blocks the event loop: commands, file reads and writes and pipe-mode
exec sessions use `vm.async_run` (the agent connection's socket on the loop); booting,
attaching, deleting and port forwards (short control-socket requests) run in a worker thread;
a PTY session (`vm.async_pty`) is read by a task on the loop.
"""

from __future__ import annotations

import asyncio
import io
import shlex
import tarfile
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agents.sandbox.errors import (
    ExecTimeoutError,
    ExecTransportError,
    ExposedPortUnavailableError,
    WorkspaceArchiveReadError,
    WorkspaceArchiveWriteError,
)
from agents.sandbox.manifest import Manifest
from agents.sandbox.session import SandboxSession, SandboxSessionState
from agents.sandbox.session.base_sandbox_session import BaseSandboxSession
from agents.sandbox.session.dependencies import Dependencies
from agents.sandbox.session.manager import Instrumentation
from agents.sandbox.session.pty_output import collect_pty_output
from agents.sandbox.session.pty_types import (
    PTY_PROCESSES_MAX,
    PtyExecUpdate,
    allocate_pty_process_id,
    clamp_pty_yield_time_ms,
    process_id_to_prune_from_meta,
    resolve_pty_write_yield_time_ms,
)
from agents.sandbox.session.runtime_helpers import RESOLVE_WORKSPACE_PATH_HELPER, RuntimeHelperScript
from agents.sandbox.session.sandbox_client import BaseSandboxClient, BaseSandboxClientOptions
from agents.sandbox.session.workspace_payloads import coerce_write_payload
from agents.sandbox.snapshot import SnapshotBase, SnapshotSpec, resolve_snapshot
from agents.sandbox.types import ExecResult, ExposedPortEndpoint, User
from agents.sandbox.util.tar_utils import UnsafeTarMemberError, validate_tarfile
from agents.sandbox.workspace_paths import sandbox_path_str

from .._boot import DEFAULT_MEMORY_MIB, DEFAULT_VCPUS
from .._validate import TIMEOUT_MAX_S
from ..build.image import DEFAULT_IMAGE
from ..errors import SmolVMError, VMNotFoundError
from ..result import RunResult
from ..vm import SmolVM

__all__ = [
    "SmolVMSandboxClient",
    "SmolVMSandboxClientOptions",
    "SmolVMSandboxSession",
    "SmolVMSandboxSessionState",
]

BACKEND = "smolvm"
PTY_ROWS, PTY_COLS = 24, 80
PTY_READ_CHUNK = 65536
PTY_READ_WAKE_S = 0.5  # a PTY reader task checks this often whether its session was closed


class SmolVMSandboxClientOptions(BaseSandboxClientOptions):
    """How to make a session's VM: SmolVM's own arguments, and the guest ports to expose."""

    type: Literal["smolvm"] = "smolvm"
    memory: int = DEFAULT_MEMORY_MIB
    vcpus: int = DEFAULT_VCPUS
    image: str | None = DEFAULT_IMAGE
    disk_size: int | None = None
    internet: bool = True
    exposed_ports: tuple[int, ...] = ()


class SmolVMSandboxSessionState(SandboxSessionState):
    """A session's serializable state: the VM's id and what it takes to make a new one like it."""

    type: Literal["smolvm"] = "smolvm"
    vm_id: str
    memory: int = DEFAULT_MEMORY_MIB
    vcpus: int = DEFAULT_VCPUS
    image: str | None = DEFAULT_IMAGE
    disk_size: int | None = None
    internet: bool = True


def _vm_config(src: SmolVMSandboxClientOptions | SmolVMSandboxSessionState) -> dict[str, Any]:
    return {"memory": src.memory, "vcpus": src.vcpus, "image": src.image,
            "disk_size": src.disk_size, "internet": src.internet}  # fmt: skip


def _start_vm(config: dict[str, Any], env: dict[str, str] | None) -> SmolVM:
    """A new persistent VM (blocking: call it in a worker thread)."""
    vm = SmolVM(**config)
    vm.start()
    try:
        if env:
            vm.set_env_vars(env)
    except BaseException:
        vm.delete()
        raise
    return vm


def _attach(vm_id: str) -> SmolVM | None:
    """A handle on a running VM, or None if it is gone (blocking)."""
    try:
        return SmolVM.from_id(vm_id)
    except VMNotFoundError:
        return None


def _timeout(timeout: float | None) -> float:
    return TIMEOUT_MAX_S if timeout is None or timeout <= 0 else min(float(timeout), TIMEOUT_MAX_S)


@dataclass
class _ExecSession:
    """One exec_command session: a pipe-mode command (an async_run task) or a PTY."""

    tty: bool
    task: asyncio.Task[Any] | None = None  # pipe mode: the async_run; PTY: the reader task
    pty: Any = None  # the VM's AsyncPtySession (tty=True)
    last_used: float = field(default_factory=time.monotonic)
    output_chunks: deque[bytes] = field(default_factory=deque)
    output_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    output_notify: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None


class SmolVMSandboxSession(BaseSandboxSession):
    """The SDK's sandbox session, backed by one persistent SmolVM (`self.vm`)."""

    state: SmolVMSandboxSessionState

    def __init__(self, *, state: SmolVMSandboxSessionState, vm: SmolVM | None) -> None:
        self.state = state
        self._vm = vm
        self._execs: dict[int, _ExecSession] = {}
        self._exec_ids: set[int] = set()
        self._exec_lock = asyncio.Lock()

    @property
    def vm(self) -> SmolVM:
        """The session's VM (attached again with SmolVM.from_id if this handle was let go)."""
        if self._vm is None:
            raise SmolVMError(
                f"sandbox session {self.state.session_id}: no VM handle (start() the session, "
                f"or reach VM {self.state.vm_id} with SmolVM.from_id)"
            )
        return self._vm

    # ---- lifecycle -------------------------------------------------------------------

    async def _ensure_backend_started(self) -> None:
        if self._vm is not None:
            return
        vm = await asyncio.to_thread(_attach, self.state.vm_id)
        if vm is None:  # gone since resume(): a new VM like it, the workspace rebuilt by start()
            vm = await _new_vm(self.state)
            self.state.vm_id = vm.vm_id
            self.state.workspace_root_ready = False
            self._set_start_state_preserved(False)
        self._vm = vm

    async def running(self) -> bool:
        vm = self._vm
        return vm is not None and await asyncio.to_thread(lambda: vm.status) == "running"

    async def _shutdown_backend(self) -> None:
        """Let go of the VM handle; the VM keeps running until the client's delete()."""
        vm, self._vm = self._vm, None
        if vm is not None:
            await asyncio.to_thread(vm.close)

    async def _delete_vm(self) -> None:
        await self.pty_terminate_all()
        vm, self._vm = self._vm, None
        if vm is None:
            vm = await asyncio.to_thread(_attach, self.state.vm_id)
        if vm is not None:
            await asyncio.to_thread(vm.delete)

    # ---- commands ----------------------------------------------------------------------

    def _prepare_exec_command(
        self, *command: str | Path, shell: bool | list[str], user: str | User | None
    ) -> list[str]:
        argv = super()._prepare_exec_command(*command, shell=shell, user=None)
        if user:  # the guest has no sudo; util-linux's runuser is in every Debian image
            name = user.name if isinstance(user, User) else user
            argv = ["runuser", "-u", name, "--", *argv]
        return argv

    def _cwd(self) -> str | None:
        # The workspace root exists once the manifest is applied; before, commands run in "/".
        return self.state.manifest.root if self.state.workspace_root_ready else None

    async def _run(
        self, argv: list[str], timeout: float | None, *, data: bytes | None = None, cwd: str | None = None,
        on_stdout: Callable[[bytes], object] | None = None, on_stderr: Callable[[bytes], object] | None = None,
    ) -> RunResult:  # fmt: skip
        try:
            return await self.vm.async_run(
                shlex.join(argv), timeout=_timeout(timeout), cwd=cwd, input=data, on_stdout=on_stdout,
                on_stderr=on_stderr,
            )  # fmt: skip
        except FileNotFoundError as e:  # the cwd is missing: the workspace root was removed
            raise ExecTransportError(command=argv, context={"reason": "missing_cwd", "cwd": cwd}, cause=e) from e
        except (SmolVMError, OSError) as e:
            raise ExecTransportError(command=argv, context={"vm_id": self.state.vm_id}, cause=e) from e

    async def _exec_internal(self, *command: str | Path, timeout: float | None = None) -> ExecResult:
        argv = [str(c) for c in command]
        r = await self._run(argv, timeout, cwd=self._cwd())
        if r.timed_out:
            raise ExecTimeoutError(command=command, timeout_s=timeout)
        return ExecResult(stdout=r.stdout_bytes, stderr=r.stderr_bytes, exit_code=r.exit_code)

    # ---- files ---------------------------------------------------------------------------

    def _runtime_helpers(self) -> tuple[RuntimeHelperScript, ...]:
        return (RESOLVE_WORKSPACE_PATH_HELPER,)

    def _current_runtime_helper_cache_key(self) -> object | None:
        return self.state.vm_id

    async def _validate_path_access(self, path: Path | str, *, for_write: bool = False) -> Path:
        # resolved inside the guest, so a symlink cannot lead a path out of the workspace
        return await self._validate_remote_path_access(path, for_write=for_write)

    async def read(self, path: Path, *, user: str | User | None = None) -> io.IOBase:
        workspace_path = await self._validate_path_access(path)
        arg = sandbox_path_str(workspace_path)
        res = await self.exec("cat", "--", arg, shell=False, user=user)
        if not res.ok():
            await self._raise_read_error_from_exec(
                path=path, workspace_path=workspace_path, command=("cat", "--", arg), result=res, user=user
            )
        return io.BytesIO(res.stdout)

    async def write(self, path: Path, data: io.IOBase, *, user: str | User | None = None) -> None:
        payload = coerce_write_payload(path=path, data=data).stream.read()
        workspace_path = await self._validate_path_access(path, for_write=True)
        arg = sandbox_path_str(workspace_path)
        # an existing file keeps its mode and owner (apply_patch rewrites scripts in place)
        script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'
        argv = self._prepare_exec_command("sh", "-c", script, "sh", arg, shell=False, user=user)
        r = await self._run(argv, None, data=bytes(payload))
        if r.exit_code != 0:
            raise WorkspaceArchiveWriteError(
                path=workspace_path, context={"exit_code": r.exit_code, "stderr": r.stderr[-4096:]}
            )

    async def persist_workspace(self) -> io.IOBase:
        root = self.state.manifest.root
        excludes = [f"--exclude=./{p.as_posix()}" for p in sorted(self._persist_workspace_skip_relpaths())]
        r = await self._run(["tar", "-C", root, *excludes, "-cf", "-", "."], None)
        if r.exit_code != 0:
            raise WorkspaceArchiveReadError(
                path=Path(root), context={"exit_code": r.exit_code, "stderr": r.stderr[-4096:]}
            )
        return io.BytesIO(r.stdout_bytes)

    async def hydrate_workspace(self, data: io.IOBase) -> None:
        root = self.state.manifest.root
        raw = data.read()
        archive = raw.encode() if isinstance(raw, str) else bytes(raw or b"")
        try:
            with tempfile.TemporaryFile() as f:  # check every member before the guest sees it
                f.write(archive)
                f.seek(0)
                with tarfile.open(fileobj=f, mode="r:*") as tar:
                    validate_tarfile(tar, allow_external_symlink_targets=False)
        except UnsafeTarMemberError as e:
            raise WorkspaceArchiveWriteError(
                path=Path(root), context={"reason": e.reason, "member": e.member}, cause=e
            ) from e
        except (tarfile.TarError, OSError) as e:
            raise WorkspaceArchiveWriteError(path=Path(root), cause=e) from e
        script = 'mkdir -p -- "$1" && tar -C "$1" -xf -'
        r = await self._run(["sh", "-c", script, "sh", root], None, data=archive)
        if r.exit_code != 0:
            raise WorkspaceArchiveWriteError(
                path=Path(root), context={"exit_code": r.exit_code, "stderr": r.stderr[-4096:]}
            )

    # ---- exposed ports --------------------------------------------------------------------

    async def _resolve_exposed_port(self, port: int) -> ExposedPortEndpoint:
        vm = self.vm

        def forward() -> int:  # the VMM keeps forwards: another process's is reused
            for fwd in vm.exposed_ports():
                if fwd.guest_port == port:
                    return fwd.host_port
            return vm.expose_local(port)

        try:
            host_port = await asyncio.to_thread(forward)
        except (SmolVMError, OSError) as e:
            raise ExposedPortUnavailableError(
                port=port, exposed_ports=self.state.exposed_ports, reason="backend_unavailable",
                context={"backend": BACKEND, "detail": str(e)}, cause=e,
            ) from e  # fmt: skip
        return ExposedPortEndpoint(host="127.0.0.1", port=host_port, tls=False)

    # ---- exec sessions (exec_command / write_stdin) ----------------------------------------

    def supports_pty(self) -> bool:
        # pipe-mode sessions (tty=False) always work; tty=True needs the VM's pty()
        return True

    async def pty_exec_start(
        self, *command: str | Path, timeout: float | None = None, shell: bool | list[str] = True,
        user: str | User | None = None, tty: bool = False, yield_time_s: float | None = None,
        max_output_tokens: int | None = None,
    ) -> PtyExecUpdate:  # fmt: skip
        argv = self._prepare_exec_command(*command, shell=shell, user=user)
        entry = _ExecSession(tty=tty)
        if tty:
            await self._open_pty(entry, argv)
        else:
            entry.task = asyncio.create_task(self._pipe(entry, argv, timeout))
        async with self._exec_lock:
            pid = allocate_pty_process_id(self._exec_ids)
            self._exec_ids.add(pid)
            pruned = self._prune_execs()
            self._execs[pid] = entry
        if pruned is not None:
            await self._terminate(pruned)
        yield_ms = 10_000 if yield_time_s is None else int(yield_time_s * 1000)
        return await self._update(pid, entry, clamp_pty_yield_time_ms(yield_ms), max_output_tokens)

    async def pty_write_stdin(
        self, *, session_id: int, chars: str, yield_time_s: float | None = None,
        max_output_tokens: int | None = None,
    ) -> PtyExecUpdate:  # fmt: skip
        async with self._exec_lock:
            entry = self._resolve_pty_session_entry(pty_processes=self._execs, session_id=session_id)
        if chars:
            if not entry.tty:
                raise RuntimeError("stdin is not available for this process")
            await entry.pty.write(chars.encode("utf-8"))
        yield_ms = 250 if yield_time_s is None else int(yield_time_s * 1000)
        wait_ms = resolve_pty_write_yield_time_ms(yield_time_ms=yield_ms, input_empty=chars == "")
        entry.last_used = time.monotonic()
        return await self._update(session_id, entry, wait_ms, max_output_tokens)

    async def pty_terminate_all(self) -> None:
        async with self._exec_lock:
            entries = list(self._execs.values())
            self._execs.clear()
            self._exec_ids.clear()
        for entry in entries:
            await self._terminate(entry)

    async def _push(self, entry: _ExecSession, chunk: bytes) -> None:
        async with entry.output_lock:
            entry.output_chunks.append(chunk)
        entry.output_notify.set()

    def _push_now(self, entry: _ExecSession, chunk: bytes) -> None:
        """Queue output from a callback running on the loop (no await possible there)."""
        entry.output_chunks.append(bytes(chunk))  # deque.append is atomic: the lock orders drains
        entry.output_notify.set()

    async def _pipe(self, entry: _ExecSession, argv: list[str], timeout: float | None) -> None:
        push = lambda chunk: self._push_now(entry, chunk)  # noqa: E731
        try:
            r = await self._run(argv, timeout, cwd=self._cwd(), on_stdout=push, on_stderr=push)
            entry.exit_code = r.exit_code
        except ExecTransportError as e:
            self._push_now(entry, f"smolvm: the command failed to run: {e}\n".encode())
            entry.exit_code = 255
        finally:
            entry.done.set()
            entry.output_notify.set()

    async def _open_pty(self, entry: _ExecSession, argv: list[str]) -> None:
        vm = self.vm
        if not hasattr(vm, "async_pty"):
            raise ExecTransportError(
                command=argv, context={"reason": "pty_unsupported", "backend": BACKEND},
                message="tty=true is not supported by this smolvm (no SmolVM.async_pty); run without tty",
            )  # fmt: skip
        try:
            entry.pty = await vm.async_pty(shlex.join(argv), rows=PTY_ROWS, cols=PTY_COLS, cwd=self._cwd())
        except (SmolVMError, OSError) as e:
            raise ExecTransportError(command=argv, context={"vm_id": self.state.vm_id}, cause=e) from e
        entry.task = asyncio.ensure_future(self._pump_pty(entry))

    async def _pump_pty(self, entry: _ExecSession) -> None:
        """The PTY's reader task: its output into the session until EOF, then its exit status."""
        pty = entry.pty
        try:
            while not entry.done.is_set():
                chunk = await pty.read(PTY_READ_CHUNK, timeout=PTY_READ_WAKE_S)
                if chunk:
                    await self._push(entry, chunk)
                    continue
                # nothing within the wake interval, or EOF: has the command ended?
                if pty.exit_code is not None:
                    entry.exit_code = pty.exit_code
                    break
                if pty.closed:
                    break
        except Exception as e:
            if not entry.done.is_set():  # not our own close()
                await self._push(entry, f"\nsmolvm: the pty failed: {e}\n".encode())
        finally:
            if entry.exit_code is None:
                entry.exit_code = pty.exit_code
            entry.done.set()
            entry.output_notify.set()

    async def _update(
        self, pid: int, entry: _ExecSession, yield_ms: int, max_output_tokens: int | None
    ) -> PtyExecUpdate:
        output, tokens, closed = await collect_pty_output(
            output_chunks=entry.output_chunks, output_lock=entry.output_lock,
            output_notify=entry.output_notify, is_done=entry.done.is_set,
            yield_time_ms=yield_ms, max_output_tokens=max_output_tokens,
        )  # fmt: skip
        exit_code = entry.exit_code if closed else None
        live: int | None = pid
        if closed:
            async with self._exec_lock:
                self._execs.pop(pid, None)
                self._exec_ids.discard(pid)
            await self._terminate(entry)
            live = None
        return PtyExecUpdate(process_id=live, output=output, exit_code=exit_code, original_token_count=tokens)

    def _prune_execs(self) -> _ExecSession | None:
        if len(self._execs) < PTY_PROCESSES_MAX:
            return None
        meta = [(pid, e.last_used, e.done.is_set()) for pid, e in self._execs.items()]
        pid = process_id_to_prune_from_meta(meta)
        if pid is None:
            return None
        self._exec_ids.discard(pid)
        return self._execs.pop(pid, None)

    async def _terminate(self, entry: _ExecSession) -> None:
        """End a session's command (cancelling async_run kills it in the guest) and its reader."""
        if entry.pty is not None:
            entry.done.set()  # the reader task stops at its next wake
            try:
                await entry.pty.aclose()  # ends a running command too
            except Exception:
                pass
        if entry.task is not None and not entry.task.done():
            if entry.pty is None:
                entry.task.cancel()
            await asyncio.gather(entry.task, return_exceptions=True)


async def _new_vm(state_or_options: SmolVMSandboxClientOptions | SmolVMSandboxSessionState,
                  manifest: Manifest | None = None) -> SmolVM:  # fmt: skip
    """Boot (restore) a persistent VM in a worker thread, with the manifest's environment."""
    env = None
    m = manifest if manifest is not None else getattr(state_or_options, "manifest", None)
    if m is not None:
        env = await m.environment.resolve()
    return await asyncio.to_thread(_start_vm, _vm_config(state_or_options), env)


class SmolVMSandboxClient(BaseSandboxClient[SmolVMSandboxClientOptions | None]):
    """The Agents SDK's sandbox client for smolvm: each session is a persistent microVM.

    >>> client = SmolVMSandboxClient()
    >>> session = await client.create(options=SmolVMSandboxClientOptions(memory=1024))
    >>> async with session:
    ...     await session.exec("python3 --version")
    >>> await client.delete(session)      # ends the VM
    """

    backend_id = BACKEND
    supports_default_options = True

    def __init__(
        self, *, instrumentation: Instrumentation | None = None, dependencies: Dependencies | None = None
    ) -> None:
        super().__init__()
        self._instrumentation = instrumentation if instrumentation is not None else Instrumentation()
        self._dependencies = dependencies

    async def create(
        self, *, snapshot: SnapshotSpec | SnapshotBase | None = None, manifest: Manifest | None = None,
        options: SmolVMSandboxClientOptions | None = None,
    ) -> SandboxSession:  # fmt: skip
        opts = options if options is not None else SmolVMSandboxClientOptions()
        manifest = manifest if manifest is not None else Manifest()
        self._validate_manifest_for_create(manifest)
        session_id = uuid.uuid4()
        vm = await _new_vm(opts, manifest)
        try:
            state = SmolVMSandboxSessionState(
                session_id=session_id, manifest=manifest, snapshot=resolve_snapshot(snapshot, str(session_id)),
                vm_id=vm.vm_id, exposed_ports=opts.exposed_ports, **_vm_config(opts),
            )  # fmt: skip
            inner = SmolVMSandboxSession(state=state, vm=vm)
        except BaseException:
            await asyncio.to_thread(vm.delete)
            raise
        return self._wrap_session(inner, instrumentation=self._instrumentation)

    async def delete(self, session: SandboxSession) -> SandboxSession:
        inner = session._inner
        if not isinstance(inner, SmolVMSandboxSession):
            raise TypeError("SmolVMSandboxClient.delete expects a session made by SmolVMSandboxClient")
        await inner._delete_vm()
        return session

    async def resume(self, state: SandboxSessionState) -> SandboxSession:
        if not isinstance(state, SmolVMSandboxSessionState):
            raise TypeError("SmolVMSandboxClient.resume expects a SmolVMSandboxSessionState")
        state.assert_path_grants_rebound()
        vm = await asyncio.to_thread(_attach, state.vm_id)
        preserved = vm is not None
        if vm is None:  # the VM is gone: a new one like it; start() restores the snapshot
            vm = await _new_vm(state)
            state.vm_id = vm.vm_id
            state.workspace_root_ready = False
        inner = SmolVMSandboxSession(state=state, vm=vm)
        inner._set_start_state_preserved(preserved)
        return self._wrap_session(inner, instrumentation=self._instrumentation)

    def deserialize_session_state(self, payload: dict[str, object]) -> SandboxSessionState:
        return self._deserialize_session_state_payload(payload, SmolVMSandboxSessionState)

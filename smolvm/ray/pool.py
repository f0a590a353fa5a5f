"""SandboxPool: many sandboxes spread over a Ray cluster's smolvm nodes, one agent actor per node."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from ..build._cache import progress as _stderr_progress
from ..errors import SandboxLostError, SmolVMError
from ..result import RunResult
from . import _nodes

START_TIMEOUT_S = 1800.0  # a node's first start may boot a guest for its base snapshot


@dataclass(frozen=True)
class Sandbox:
    """One sandbox of a pool: its index, VM id, node and VMM process id (on that node)."""

    index: int
    vm_id: str
    node_id: str
    pid: int


class SandboxPool:
    """`size` sandboxes spread over the Ray nodes that advertise the `smolvm` resource.

    >>> pool = SandboxPool(8, memory=256)
    >>> pool.map(["echo one", "echo two"])[1].output
    'two'

    Each node gets one agent actor holding that node's sandboxes (and `smolvm` resource
    units for them). `vm_kwargs` are SmolVM's (memory, image, disk_size, ...). The
    sandboxes stop on close(), or when this driver exits. A sandbox whose node died
    raises SandboxLostError; replace_lost() starts new ones on the nodes left.
    """

    def __init__(
        self,
        size: int,
        *,
        start_timeout: float = START_TIMEOUT_S,
        on_progress: Callable[[str], None] | None = _stderr_progress,
        **vm_kwargs: Any,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive number of sandboxes, got {size!r}")
        self._vm_kwargs = dict(vm_kwargs)
        self._start_timeout = float(start_timeout)
        self._progress = on_progress or (lambda _msg: None)
        self._lock = threading.Lock()
        self._agents: list[tuple[str, Any]] = []  # (node_id, agent actor), one per node per start-up
        self._agent_of: dict[str, Any] = {}  # vm_id -> the agent holding it
        self._sandboxes: list[Sandbox] = []
        self._lost: set[str] = set()  # vm_ids
        self._next = itertools.count()
        self._closed = False
        self.node_stats: dict[str, dict[str, Any]] = {}  # per node: base built/found, timings
        try:
            self._grow(size, exclude=set())
        except BaseException:
            self.close()
            raise

    # ---- what is there --------------------------------------------------------------

    @property
    def sandboxes(self) -> list[Sandbox]:
        """The live sandboxes (lost ones are left out)."""
        with self._lock:
            return [s for s in self._sandboxes if s.vm_id not in self._lost]

    @property
    def lost(self) -> list[Sandbox]:
        with self._lock:
            return [s for s in self._sandboxes if s.vm_id in self._lost]

    @property
    def size(self) -> int:
        return len(self.sandboxes)

    def nodes(self) -> dict[str, list[str]]:
        """node_id -> the vm_ids of the live sandboxes there."""
        out: dict[str, list[str]] = {}
        for s in self.sandboxes:
            out.setdefault(s.node_id, []).append(s.vm_id)
        return out

    def __len__(self) -> int:
        return self.size

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SandboxPool(size={self.size}, nodes={len(self.nodes())}, lost={len(self.lost)})"

    # ---- start-up ---------------------------------------------------------------------

    def _plan(self, count: int, exclude: set[str]) -> dict[str, tuple[_nodes.Node, int]]:
        """How many new sandboxes go to which node: round robin within each node's free units."""
        nodes = [n for n in _nodes.sandbox_nodes() if n.node_id not in exclude]
        if not nodes:
            raise _nodes.no_nodes_error()
        used: dict[str, int] = {}
        for s in self.sandboxes:
            used[s.node_id] = used.get(s.node_id, 0) + 1
        free = {n.node_id: n.capacity - used.get(n.node_id, 0) for n in nodes}
        total = sum(max(0, f) for f in free.values())
        if count > total:
            raise SmolVMError(
                f"{count} more sandboxes do not fit: the {len(nodes)} smolvm node(s) have room for "
                f"{total} more (their {_nodes.RESOURCE!r} resource). Ask for fewer, or add nodes"
            )
        plan: dict[str, tuple[_nodes.Node, int]] = {}
        left = count
        while left:
            for n in nodes:
                if left and free[n.node_id] > 0:
                    free[n.node_id] -= 1
                    plan[n.node_id] = (n, plan.get(n.node_id, (n, 0))[1] + 1)
                    left -= 1
        return plan

    def _grow(self, count: int, exclude: set[str]) -> list[Sandbox]:
        plan = self._plan(count, exclude)
        pending: dict[Any, tuple[_nodes.Node, Any]] = {}  # start() ref -> node, agent
        for node, k in plan.values():
            agent = _nodes.pool_agent(node, k)  # a new agent holds the units its sandboxes need
            self._agents.append((node.node_id, agent))
            self._progress(f"node {node.ip} ({node.node_id[:8]}): starting {k} sandbox(es)")
            pending[agent.start.remote(k, self._vm_kwargs)] = (node, agent)
        new: list[Sandbox] = []
        deadline = time.monotonic() + self._start_timeout
        waiting = list(pending)
        failure: BaseException | None = None
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                names = ", ".join(pending[r][0].node_id[:8] for r in waiting)
                failure = failure or SmolVMError(
                    f"sandboxes did not start within {self._start_timeout:.0f} s on node(s) {names}: "
                    "their agents could not be placed (is the `smolvm` resource free?) or the base "
                    "snapshot boot is slow; raise start_timeout"
                )
                break
            node, agent = pending[ready[0]]
            try:
                rep = _nodes.get(ready[0], _nodes.CONTROL_TIMEOUT_S, node.node_id, None, "start")
            except BaseException as e:  # keep collecting the other nodes, then raise
                failure = failure or e
                continue
            base = (
                f"built its base snapshot in {rep['base_seconds']:.1f} s"
                if rep["base"] == "built" else "found its base snapshot"
            )  # fmt: skip
            self._progress(
                f"node {node.ip} ({node.node_id[:8]}): {base}; {len(rep['sandboxes'])} sandbox(es) "
                f"running, {rep['restored']} restored in {rep['start_seconds']:.1f} s"
            )
            self.node_stats[node.node_id] = {k: v for k, v in rep.items() if k != "sandboxes"}
            with self._lock:
                for s in rep["sandboxes"]:
                    sb = Sandbox(len(self._sandboxes), s["vm_id"], s["node_id"], s["pid"])
                    self._sandboxes.append(sb)
                    self._agent_of[sb.vm_id] = agent
                    new.append(sb)
        if failure is not None:
            raise failure
        return new

    def replace_lost(self) -> list[Sandbox]:
        """Start a new sandbox for each lost one, on the nodes that are still alive; returns them."""
        with self._lock:
            gone = [s for s in self._sandboxes if s.vm_id in self._lost]
            dead_nodes = {s.node_id for s in gone}
            self._sandboxes = [s for s in self._sandboxes if s.vm_id not in self._lost]
            self._sandboxes = [Sandbox(i, s.vm_id, s.node_id, s.pid) for i, s in enumerate(self._sandboxes)]
            self._lost.clear()
        if not gone:
            return []
        dead_nodes = {n for n in dead_nodes if not _nodes.node_alive(n)}
        return self._grow(len(gone), exclude=dead_nodes)

    # ---- using it -----------------------------------------------------------------------

    def _pick(self, sandbox: int | str | None) -> Sandbox:
        with self._lock:
            if self._closed:
                raise SmolVMError("this SandboxPool is closed: make a new one")
            if sandbox is None:
                live = [s for s in self._sandboxes if s.vm_id not in self._lost]
                if not live:
                    raise SandboxLostError(
                        "every sandbox of this pool is lost; call replace_lost() to start new ones"
                    )
                return live[next(self._next) % len(live)]
            for s in self._sandboxes:
                if sandbox in (s.index, s.vm_id) and not isinstance(sandbox, bool):
                    found = s
                    break
            else:
                raise ValueError(f"no sandbox {sandbox!r} in this pool (indexes 0..{len(self._sandboxes) - 1})")
            if found.vm_id in self._lost:
                raise SandboxLostError(
                    f"sandbox {found.vm_id} was lost with Ray node {found.node_id}; call replace_lost()",
                    node_id=found.node_id, vm_id=found.vm_id,
                )  # fmt: skip
            return found

    def _call(self, sb: Sandbox, method: str, args: tuple[Any, ...], timeout: float, what: str) -> Any:
        agent = self._agent_of[sb.vm_id]
        try:
            return _nodes.get(getattr(agent, method).remote(*args), timeout, sb.node_id, sb.vm_id, what)
        except SandboxLostError:
            self._mark_lost(sb.node_id, agent)
            raise

    def _mark_lost(self, node_id: str, agent: Any) -> None:
        with self._lock:
            for s in self._sandboxes:
                if self._agent_of.get(s.vm_id) is agent or (
                    s.node_id == node_id and not _nodes.node_alive(node_id)
                ):
                    self._lost.add(s.vm_id)

    def run(self, command: str, timeout: float = 30, *, sandbox: int | str | None = None, **kwargs: Any) -> RunResult:
        """Run `command` in one sandbox (the next one in turn, or `sandbox`: an index or vm_id)."""
        sb = self._pick(sandbox)
        kw = {"timeout": timeout, **kwargs}
        return self._call(sb, "run", (sb.vm_id, command, kw), timeout + _nodes.CALL_GRACE_S, f"run on {sb.vm_id}")

    def map(self, commands: Sequence[str], timeout: float = 30, **kwargs: Any) -> list[RunResult]:
        """Run the commands over the sandboxes (command i in sandbox i mod size); results in order.

        One call per node carries that node's share. A command that failed raises its error
        here (SandboxLostError when its node died) after every other command has finished.
        """
        if isinstance(commands, str):
            raise TypeError("map() takes a list of commands; use run() for one")
        cmds = list(commands)
        live = self.sandboxes
        if not live:
            raise SandboxLostError("every sandbox of this pool is lost; call replace_lost() to start new ones")
        share: dict[int, list[tuple[int, str, str]]] = {}  # id(agent) -> items
        agent_by: dict[int, tuple[Any, Sandbox]] = {}
        for i, cmd in enumerate(cmds):
            sb = live[i % len(live)]
            agent = self._agent_of[sb.vm_id]
            share.setdefault(id(agent), []).append((i, sb.vm_id, cmd))
            agent_by[id(agent)] = (agent, sb)
        kw = {"timeout": timeout, **kwargs}
        refs = {key: agent_by[key][0].run_batch.remote(items, kw) for key, items in share.items()}
        per_sandbox = max(
            sum(1 for it in items if it[1] == vm) for items in share.values() for vm in {it[1] for it in items}
        )
        limit = per_sandbox * (timeout + _nodes.CALL_GRACE_S)
        results: list[RunResult | BaseException | None] = [None] * len(cmds)
        for key, ref in refs.items():
            agent, sb = agent_by[key]
            try:
                for index, res in _nodes.get(ref, limit, sb.node_id, None, "map"):
                    results[index] = res
            except SandboxLostError as e:
                self._mark_lost(sb.node_id, agent)
                for index, vm_id, _cmd in share[key]:
                    results[index] = SandboxLostError(str(e).replace("sandbox ? ", f"sandbox {vm_id} "),
                                                      node_id=sb.node_id, vm_id=vm_id)
        for res in results:
            if isinstance(res, BaseException):
                raise res
        return [r for r in results if isinstance(r, RunResult)]

    def upload(
        self, sandbox: int | str, data: bytes | str | os.PathLike[str], guest_path: str,
        *, mode: int | None = None,
    ) -> int:  # fmt: skip
        """Copy bytes (or a local file) into a sandbox at guest_path, through Ray's object store."""
        sb = self._pick(sandbox)
        payload = data if isinstance(data, bytes) else Path(data).read_bytes()
        ref = ray.put(payload)
        return int(self._call(sb, "upload", (sb.vm_id, ref, guest_path, mode), 600.0, f"upload to {sb.vm_id}"))

    def download(self, sandbox: int | str, guest_path: str, local_path: str | os.PathLike[str] | None = None) -> bytes:
        """A sandbox's file as bytes (also written to local_path if given), through Ray's object store."""
        sb = self._pick(sandbox)
        data = bytes(self._call(sb, "download", (sb.vm_id, guest_path), 600.0, f"download from {sb.vm_id}"))
        if local_path is not None:
            Path(local_path).write_bytes(data)
        return data

    def pids(self) -> dict[str, tuple[str, int]]:
        """vm_id -> (node_id, VMM pid on that node) for every sandbox the pool started."""
        with self._lock:
            return {s.vm_id: (s.node_id, s.pid) for s in self._sandboxes}

    # ---- ending -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every sandbox and end the agents. Idempotent; never waits on a dead node for long."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            agents = list(self._agents)
        refs = []
        for node_id, agent in agents:
            try:
                refs.append((node_id, agent, agent.close.remote()))
            except Exception:
                pass
        for node_id, agent, ref in refs:
            try:
                _nodes.get(ref, _nodes.CONTROL_TIMEOUT_S, node_id, None, "close")
            except (SmolVMError, ray.exceptions.RayError):
                pass  # a lost node's VMMs ended with its agent
            try:
                ray.kill(agent, no_restart=True)
            except Exception:
                pass

    def __del__(self) -> None:
        try:
            if not getattr(self, "_closed", True) and ray.is_initialized():
                self.close()
        except Exception:
            pass

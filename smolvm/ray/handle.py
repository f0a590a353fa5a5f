"""One persistent sandbox that every driver of a Ray cluster reaches by its vm_id: create() and connect()."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray

from ..errors import SandboxLostError, VMNotFoundError
from ..result import RunResult
from . import _nodes


class RemoteSandbox:
    """A handle on a persistent sandbox of the cluster, held by its node's detached agent.

    The sandbox lives until delete(); close() only lets go of this handle. Pass `vm_id`
    to another driver (or task) and connect(vm_id) there.
    """

    def __init__(self, vm_id: str, node_id: str, agent: Any, pid: int = 0) -> None:
        self.vm_id = vm_id
        self.node_id = node_id
        self.pid = pid
        self._agent = agent

    def __repr__(self) -> str:
        return f"RemoteSandbox(vm_id={self.vm_id!r}, node_id={self.node_id[:8]!r})"

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, *args: Any, timeout: float) -> Any:
        ref = getattr(self._agent, method).remote(*args)
        return _nodes.get(ref, timeout, self.node_id, self.vm_id, f"{method} on {self.vm_id}")

    def run(self, command: str, timeout: float = 30, **kwargs: Any) -> RunResult:
        """Run `command` in the sandbox (SmolVM.run's arguments)."""
        kw = {"timeout": timeout, **kwargs}
        return self._call("run", self.vm_id, command, kw, timeout=timeout + _nodes.CALL_GRACE_S)

    def upload(self, data: bytes | str | os.PathLike[str], guest_path: str, *, mode: int | None = None) -> int:
        """Copy bytes (or a local file) into the sandbox, through Ray's object store."""
        payload = data if isinstance(data, bytes) else Path(data).read_bytes()
        return int(self._call("upload", self.vm_id, ray.put(payload), guest_path, mode, timeout=600.0))

    def download(self, guest_path: str, local_path: str | os.PathLike[str] | None = None) -> bytes:
        """The sandbox's file as bytes (also written to local_path if given)."""
        data = bytes(self._call("download", self.vm_id, guest_path, timeout=600.0))
        if local_path is not None:
            Path(local_path).write_bytes(data)
        return data

    def close(self) -> None:
        """Let go of this handle; the sandbox keeps running for other drivers."""
        self._agent = None

    def delete(self) -> None:
        """Stop the sandbox for good (from any driver)."""
        agent = self._agent or _nodes.persistent_agent(self.node_id, create=False)
        if agent is None:
            return
        _nodes.get(agent.delete.remote(self.vm_id), _nodes.CONTROL_TIMEOUT_S, self.node_id, self.vm_id, "delete")


def create(*, node_id: str | None = None, **vm_kwargs: Any) -> RemoteSandbox:
    """Start a persistent sandbox on a smolvm node (the one with the fewest of them, or `node_id`)."""
    nodes = _nodes.sandbox_nodes()
    if not nodes:
        raise _nodes.no_nodes_error()
    if node_id is not None:
        chosen = [n for n in nodes if n.node_id == node_id]
        if not chosen:
            raise ValueError(f"node {node_id} is not a live Ray node with the {_nodes.RESOURCE!r} resource")
        node = chosen[0]
    else:
        counts = []
        for n in nodes:
            agent = _nodes.persistent_agent(n.node_id, create=False)
            try:
                held = len(_nodes.get(agent.pids.remote(), _nodes.CONTROL_TIMEOUT_S, n.node_id, None, "count")) if agent else 0
            except SandboxLostError:
                continue
            counts.append((held, n.node_id, n))
        if not counts:
            raise _nodes.no_nodes_error()
        node = min(counts, key=lambda c: (c[0], c[1]))[2]
    agent = _nodes.persistent_agent(node.node_id, create=True)
    assert agent is not None  # create=True makes it
    rep = _nodes.get(
        agent.start.remote(1, vm_kwargs, True), 1800.0, node.node_id, None, "create"
    )  # the first VM of a node may boot its base snapshot
    s = rep["sandboxes"][0]
    return RemoteSandbox(s["vm_id"], node.node_id, agent, s["pid"])


def connect(vm_id: str) -> RemoteSandbox:
    """A handle on the persistent sandbox `vm_id` from any driver of the cluster.

    Raises VMNotFoundError if no live smolvm node holds it (deleted, or its node is gone).
    """
    if not isinstance(vm_id, str) or not vm_id:
        raise ValueError(f"vm_id must be a sandbox id such as 'vm-0123456789ab', got {vm_id!r}")
    nodes = _nodes.sandbox_nodes()
    asks = []
    for n in nodes:
        agent = _nodes.persistent_agent(n.node_id, create=False)
        if agent is not None:
            asks.append((n, agent, agent.has.remote(vm_id)))
    for n, agent, ref in asks:
        try:
            if _nodes.get(ref, _nodes.CONTROL_TIMEOUT_S, n.node_id, vm_id, "connect"):
                return RemoteSandbox(vm_id, n.node_id, agent)
        except SandboxLostError:
            continue
    raise VMNotFoundError(
        f"no live smolvm node of this Ray cluster holds sandbox {vm_id}: it was deleted, "
        "or its node is gone. Start a new one with smolvm.ray.create()"
    )

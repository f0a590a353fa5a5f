"""The Ray side of smolvm.ray: which nodes run sandboxes, their agents, and calls that never hang."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import SandboxLostError, SmolVMError
from ._agent import NodeAgent

RESOURCE = "smolvm"  # the custom resource a node advertises: how many sandboxes it can hold
NAMESPACE = "smolvm"  # Ray namespace of the detached per-node agents of persistent VMs
CALL_GRACE_S = 60.0  # a call waits for the command's own timeout plus this long
CONTROL_TIMEOUT_S = 60.0  # info/close/has calls
AGENT_CONCURRENCY = 64  # calls one agent serves at once (runs on different sandboxes overlap)

_remote_agent = ray.remote(NodeAgent)


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    capacity: int  # its `smolvm` resource


def sandbox_nodes() -> list[Node]:
    """The live nodes that advertise the `smolvm` resource, in a stable order."""
    if not ray.is_initialized():
        raise SmolVMError("smolvm.ray needs a Ray connection: call ray.init() (or ray.init(address='auto')) first")
    nodes = [
        Node(n["NodeID"], n.get("NodeManagerAddress", ""), int(n["Resources"].get(RESOURCE, 0)))
        for n in ray.nodes()
        if n.get("Alive") and n.get("Resources", {}).get(RESOURCE, 0) >= 1
    ]
    return sorted(nodes, key=lambda n: n.node_id)


def no_nodes_error() -> SmolVMError:
    return SmolVMError(
        f"no live Ray node advertises the {RESOURCE!r} resource: start the nodes that have /dev/kvm "
        f"with the flag `smolvm ray-node` prints (e.g. ray start --resources '{{\"{RESOURCE}\": 8}}')"
    )


def node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n.get("Alive") for n in ray.nodes())


def pool_agent(node: Node, units: int) -> Any:
    """A new agent for a pool on `node`, holding `units` of its `smolvm` resource; it dies with its driver."""
    return _remote_agent.options(
        num_cpus=0,
        resources={RESOURCE: units},
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        max_concurrency=AGENT_CONCURRENCY,
        max_restarts=0,
    ).remote()


def persistent_agent_name(node_id: str) -> str:
    return f"smolvm-node-{node_id}"


def persistent_agent(node_id: str, create: bool) -> Any | None:
    """The node's detached agent that owns its persistent VMs (made on first use), or None."""
    name = persistent_agent_name(node_id)
    if not create:
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None
    return _remote_agent.options(
        name=name,
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        max_concurrency=AGENT_CONCURRENCY,
        max_restarts=-1,  # a crashed agent comes back and finds its VMs with SmolVM.from_id
    ).remote()


def get(ref: Any, timeout: float, node_id: str, vm_id: str | None, what: str) -> Any:
    """ray.get that turns a dead or silent node into SandboxLostError naming it."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        try:
            ray.cancel(ref, force=False)
        except Exception:  # the node may be gone: nothing left to cancel
            pass
        raise SandboxLostError(
            f"{what}: node {node_id} did not answer within {timeout:.0f} s; treat its sandboxes "
            "as lost (SandboxPool.replace_lost() starts new ones elsewhere)",
            node_id=node_id, vm_id=vm_id,
        ) from None  # fmt: skip
    except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError) as e:
        raise lost(node_id, vm_id, what, e) from None


def lost(node_id: str, vm_id: str | None, what: str, cause: BaseException) -> SandboxLostError:
    state = "is gone" if not node_alive(node_id) else "lost its smolvm agent"
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return SandboxLostError(
        f"{what}: sandbox {vm_id or '?'} is lost: Ray node {node_id} {state} ({first[:200]}). "
        "Start a new sandbox (SandboxPool.replace_lost() does it for a pool)",
        node_id=node_id, vm_id=vm_id,
    )  # fmt: skip

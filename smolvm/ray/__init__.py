"""smolvm on a Ray cluster: sandboxes on every node that has /dev/kvm (`pip install smolvm[ray]`).

    import ray, smolvm.ray
    ray.init(address="auto")
    with smolvm.ray.SandboxPool(16, memory=256) as pool:
        results = pool.map([f"echo {i}" for i in range(100)])

Nodes that run sandboxes advertise the `smolvm` resource (`smolvm ray-node` prints the
`ray start` flag). Only this package imports ray.
"""

from __future__ import annotations

try:
    import ray as _ray  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"smolvm.ray needs Ray ({e}); install it with `pip install 'smolvm[ray]'`"
    ) from e

from ..errors import SandboxLostError
from ._nodes import RESOURCE, sandbox_nodes
from .handle import RemoteSandbox, connect, create
from .pool import Sandbox, SandboxPool

__all__ = [
    "RESOURCE",
    "RemoteSandbox",
    "Sandbox",
    "SandboxLostError",
    "SandboxPool",
    "connect",
    "create",
    "sandbox_nodes",
]

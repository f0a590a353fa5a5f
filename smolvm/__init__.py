"""smolvm: run AI agents' shell commands inside KVM microVMs.

    from smolvm import SmolVM
    with SmolVM() as vm:
        print(vm.run("uname -a").output)

Importing smolvm needs no KVM; errors come when a VM is asked for.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    AgentError,
    KVMUnavailableError,
    SmolVMError,
    VMGoneError,
    VMNotRunningError,
    VMStartError,
)
from .info import VMInfo, VMState
from .profile import Profile
from .result import RunResult
from ._aio import AsyncSmolVM
from .vm import SmolVM

__all__ = [
    "AsyncSmolVM",
    "AgentError",
    "KVMUnavailableError",
    "Profile",
    "RunResult",
    "SmolVM",
    "SmolVMError",
    "VMGoneError",
    "VMInfo",
    "VMNotRunningError",
    "VMStartError",
    "VMState",
    "__version__",
]

"""smolvm: run AI agents' shell commands inside KVM microVMs.

    from smolvm import SmolVM
    with SmolVM() as vm:
        print(vm.run("uname -a").output)

Importing smolvm needs no KVM; errors come when a VM is asked for.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .browser import BrowserSession
from .browser_config import BrowserSessionConfig
from .browser_store import BrowserSessionInfo
from .errors import (
    AgentError,
    BrowserSessionError,
    BrowserSessionNotFoundError,
    KVMUnavailableError,
    PtyClosedError,
    SmolVMError,
    VMGoneError,
    VMNotRunningError,
    VMStartError,
)
from .ports import ExposedPort, PortInUseError, PortNotExposedError
from .info import VMInfo, VMState
from .profile import Profile
from .result import RunResult
from ._aio import AsyncSmolVM
from ._pty import AsyncPtySession, PtySession
from .vm import SmolVM

__all__ = [
    "AsyncPtySession",
    "AsyncSmolVM",
    "AgentError",
    "BrowserSession",
    "BrowserSessionConfig",
    "BrowserSessionError",
    "BrowserSessionInfo",
    "BrowserSessionNotFoundError",
    "ExposedPort",
    "KVMUnavailableError",
    "PortInUseError",
    "PortNotExposedError",
    "Profile",
    "PtyClosedError",
    "PtySession",
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

"""The exceptions smolvm raises; every one is a SmolVMError and says what to do next."""

from __future__ import annotations


class SmolVMError(Exception):
    """Base class of every smolvm error."""


class KVMUnavailableError(SmolVMError):
    """/dev/kvm is missing or cannot be opened; the message carries the fix."""


class VMStartError(SmolVMError):
    """The VM did not reach a ready guest agent. `console_tail` holds the end of the guest console."""

    def __init__(self, message: str, *, console_tail: str = "", vm_id: str | None = None) -> None:
        super().__init__(message)
        self.console_tail = console_tail
        self.vm_id = vm_id


class VMGoneError(SmolVMError):
    """The VM's VMM process ended (crash, kill, guest reboot or shutdown) while it was in use."""

    def __init__(
        self,
        message: str,
        *,
        exit_reason: str = "",
        console_tail: str = "",
        vm_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.exit_reason = exit_reason
        self.console_tail = console_tail
        self.vm_id = vm_id


class VMNotRunningError(SmolVMError):
    """The VM was closed; create a new SmolVM to run more commands."""


class PtyClosedError(SmolVMError):
    """A PTY session was used after close() or after its command exited; open a new one with vm.pty()."""


class AgentError(SmolVMError):
    """The guest agent broke the protocol, dropped the connection or stopped answering."""


class ProtocolError(SmolVMError):
    """The guest agent answered a request with an ERROR frame, or sent a frame that breaks the protocol.

    `err` is the Linux errno the agent named (0: none, a protocol error) and `code` what it is
    about (`_smolvm.ERRC_REQUEST`: the request as a whole, `_smolvm.ERRC_CWD`: the working
    directory), both from the frame's `struct smolvm_error` (csrc/proto.h); programs look at
    those, never at the message. Raised by `smolvm._smolvm` (also as `_smolvm.ProtocolError`);
    SmolVM turns it into AgentError or an OSError.
    """

    def __init__(self, message: str, *, err: int = 0, code: int = 0) -> None:
        super().__init__(message)
        self.err = err
        self.code = code


class VMNotFoundError(SmolVMError, LookupError):
    """No VM with that id on this machine (deleted, never existed, or its VMM is gone)."""


class SnapshotError(SmolVMError):
    """A snapshot is missing, truncated, corrupt or from another smolvm version."""


class SandboxLostError(SmolVMError):
    """A sandbox of a Ray cluster is gone with its node (or its node stopped answering).

    `node_id` names the node, `vm_id` the sandbox; SandboxPool.replace_lost() starts new
    sandboxes on the nodes that are left.
    """

    def __init__(self, message: str, *, node_id: str = "", vm_id: str | None = None) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.vm_id = vm_id
class BrowserSessionError(SmolVMError):
    """A BrowserSession could not start, was used in the wrong state, or its browser failed."""


class BrowserSessionNotFoundError(BrowserSessionError, LookupError):
    """No browser session with that id on this machine (stopped, timed out, or never existed)."""

"""Client of a VMM's control socket ($SMOLVM_HOME/vms/<id>/ctl.sock): one line out, one line back."""

from __future__ import annotations

import socket
from pathlib import Path

from .errors import SmolVMError


class ControlError(SmolVMError):
    """The VMM refused or failed a control command (its reason is the message)."""


def command(path: Path, line: str, timeout: float = 30.0) -> str:
    """Send `line` to the VMM listening at path; return its answer after "OK".

    Raises ConnectionError if nothing listens there (the VMM is gone) and
    ControlError if the VMM answered ERR.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(line.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionResetError(f"the VMM closed {path} without answering {line!r}")
            buf += chunk
    reply = buf.decode(errors="replace").strip()
    if reply == "OK" or reply.startswith("OK "):
        return reply[3:]
    if reply.startswith("ERR"):
        raise ControlError(reply[4:] or f"{line} failed")
    raise ControlError(f"unexpected answer to {line!r}: {reply!r}")

"""The guest agent from the host: setup, exec, file transfers, and the one map of _smolvm errors to smolvm.errors."""

from __future__ import annotations

import errno
import os
import secrets
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from . import _stream, _validate, network
from ._native import native
from .errors import AgentError, ProtocolError, VMStartError
from .result import RunResult

HOST_GRACE_MS = 30_000  # the host gives the agent this long past the command's own timeout
SETUP_ENTROPY_BYTES = 64
SETUP_TIMEOUT_MS = 120_000  # the first setup of a disk VM mounts its root: guest kernel work
TRANSFER_TIMEOUT_S = 600.0

Probe = Callable[[], None]  # after a transport failure: raises VMGoneError if the VMM has ended


def agent_error(
    e: BaseException, vm_id: str, probe: Probe, *, req: _stream.ExecRequest | None = None,
    what: str = "",
) -> BaseException:  # fmt: skip
    """The exception a failed agent request means: of an exec (req) or a transfer (what,
    e.g. "upload of a to vm:/b"). An ERROR frame proves the VM alive; only a transport
    failure calls probe(), which raises VMGoneError if the VMM has ended."""
    if isinstance(e, ProtocolError):
        err = e.err
        if req is not None and e.code == native().ERRC_CWD and err:
            kind = {errno.ENOENT: FileNotFoundError, errno.ENOTDIR: NotADirectoryError}.get(err, OSError)
            return kind(err, f"cwd is not a folder in the guest of {vm_id}", req.cwd)
        if req is None:
            return AgentError(f"{what} failed: {e}")
        return AgentError(f"the guest agent of {vm_id} failed the request: {e}")
    if req is None and not isinstance(e, (TimeoutError, ConnectionError)):
        return e  # a transfer's guest or host file error (ENOSPC, EISDIR...): as it is
    probe()
    if req is None:
        return AgentError(f"{what} failed: {e}")
    if isinstance(e, TimeoutError):
        return AgentError(
            f"the guest agent of {vm_id} did not answer within "
            f"{req.host_timeout_ms / 1000:.0f} s (timeout + {HOST_GRACE_MS // 1000} s grace)"
        )
    return AgentError(f"lost the connection to the guest agent of {vm_id}: {e}")


SETUP_REFUSED_TRIES = 5
SETUP_REFUSED_WAIT_S = 0.2


def setup(uds: Path, vm_id: str, root: bool, net: network.NetworkPolicy) -> None:
    """Give the guest its own entropy, the host's clock and its vm_id as hostname (and, with
    root, the overlay root on its image; with a network, its addresses)."""
    nat = native()
    flags = nat.SETUP_ROOT if root else 0
    extra = network.setup_data(net) if net.enabled else b""
    try:
        for attempt in range(SETUP_REFUSED_TRIES):
            try:
                nat.setup(
                    str(uds), nat.AGENT_PORT, time.time_ns(), secrets.token_bytes(SETUP_ENTROPY_BYTES),
                    vm_id, SETUP_TIMEOUT_MS, flags | (network.SETUP_NET if extra else 0), extra,
                )  # fmt: skip
                break
            except ConnectionRefusedError:
                # Refused before the handshake, so the agent never saw the request: a guest
                # just restored may answer the first connection with a reset while its vsock
                # driver handles the VMM's transport-reset event (seen with fork children
                # started four at a time on a loaded host). Ask again, a few times.
                if attempt == SETUP_REFUSED_TRIES - 1:
                    raise
                time.sleep(SETUP_REFUSED_WAIT_S)
    except _stream.AGENT_ERRORS as e:
        raise VMStartError(
            f"VM {vm_id}: the guest agent refused its setup: {e}", vm_id=vm_id
        ) from e


def exec_request(
    uds: Path, command: str, t_ms: int, cwd: str, env: list[str]
) -> _stream.ExecRequest:
    """The request for one checked command (the host waits HOST_GRACE_MS past its timeout)."""
    return _stream.ExecRequest(str(uds), command, cwd, env, t_ms, t_ms + HOST_GRACE_MS)


def run(req: _stream.ExecRequest, vm_id: str, probe: Probe) -> RunResult:
    """One exec without stdin or callbacks, in one call of the extension."""
    nat = native()
    try:
        code, sig, out, err, timed_out = nat.exec(
            req.uds, nat.AGENT_PORT, req.command, req.cwd, req.env, req.timeout_ms,
            req.host_timeout_ms,
        )  # fmt: skip
    except _stream.AGENT_ERRORS as e:
        raise agent_error(e, vm_id, probe, req=req) from None
    return RunResult.from_bytes(code, out, err, req.elapsed(), timed_out=bool(timed_out), signal=sig)


def upload(
    uds: Path, vm_id: str, probe: Probe, local: Path, gpath: str, mode: int, t_ms: int,
    mkdir: Callable[[str], RunResult] | None,
) -> int:  # fmt: skip
    """put_file; a missing guest folder is made with mkdir(folder) (None: FileNotFoundError)."""
    nat = native()
    try:
        try:
            return int(nat.put_file(str(uds), nat.AGENT_PORT, str(local), gpath, mode, t_ms))
        except FileNotFoundError as e:
            folder = gpath.rstrip("/").rsplit("/", 1)[0] or "/"
            if mkdir is None or e.filename != gpath:
                raise
            made = mkdir(f"mkdir -p -- {shlex.quote(folder)}")
            if not made.ok:
                raise FileNotFoundError(
                    2, f"cannot make the guest folder: {made.stderr.strip()}", folder
                ) from None
            return int(nat.put_file(str(uds), nat.AGENT_PORT, str(local), gpath, mode, t_ms))
    except _stream.AGENT_ERRORS as e:
        mapped = agent_error(e, vm_id, probe, what=f"upload of {local} to {vm_id}:{gpath}")
        if mapped is e:
            raise
        raise mapped from None


def download(uds: Path, vm_id: str, probe: Probe, gpath: str, local: Path, t_ms: int) -> None:
    """get_file into a temporary file next to local, renamed into place when whole."""
    nat = native()
    tmp = local.parent / f".{local.name}.smolvm-{secrets.token_hex(4)}"
    try:
        _size, mode = nat.get_file(str(uds), nat.AGENT_PORT, gpath, str(tmp), t_ms)
        os.chmod(tmp, mode & 0o777)
        os.replace(tmp, local)
    except _stream.AGENT_ERRORS as e:
        mapped = agent_error(e, vm_id, probe, what=f"download of {vm_id}:{gpath}")
        if mapped is e:
            raise
        raise mapped from None
    finally:
        tmp.unlink(missing_ok=True)


def checked_upload_args(
    local_path: str | os.PathLike[str], guest_path: str, mode: int | None, timeout: float
) -> tuple[Path, str, int, int]:
    """upload_file()'s arguments checked: (local file, guest path, mode, timeout in ms)."""
    local = _validate.local_path(local_path)
    if isinstance(guest_path, str) and guest_path.endswith("/") and guest_path.strip("/"):
        guest_path = guest_path + local.name
    gpath = _validate.guest_path(guest_path)
    t_ms = _validate.timeout_ms(timeout)
    if not local.exists():
        raise FileNotFoundError(2, "No such file on the host", str(local))
    if not local.is_file():
        raise IsADirectoryError(21, "Not a regular file on the host", str(local))
    if mode is None:
        mode = local.stat().st_mode & 0o7777
    elif isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ValueError(f"mode must be permission bits between 0 and 0o7777, got {mode!r}")
    return local, gpath, mode, t_ms


def checked_download_args(
    guest_path: str, local_path: str | os.PathLike[str], make_dirs: bool, timeout: float
) -> tuple[str, Path, int]:
    """download_file()'s arguments checked: (guest path, local file, timeout in ms); makes
    the local folder if make_dirs."""
    gpath = _validate.guest_path(guest_path)
    raw = os.fspath(local_path) if isinstance(local_path, (str, os.PathLike)) else local_path
    local = _validate.local_path(local_path)
    t_ms = _validate.timeout_ms(timeout)
    if local.is_dir() or (isinstance(raw, str) and raw.endswith("/")):
        local = local / gpath.rstrip("/").rsplit("/", 1)[-1]
    if make_dirs:
        local.parent.mkdir(parents=True, exist_ok=True)
    if not local.parent.is_dir():
        raise FileNotFoundError(2, "No such folder on the host", str(local.parent))
    return gpath, local, t_ms

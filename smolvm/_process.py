"""The VMM child process from Python's side: reaping it, describing how it ended, reading its logs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for host tools we run (mkfs, mmdebstrap, tar): without this process's LD_PRELOAD.

    A preloaded library (the ASan runtime when the test suite runs a sanitized build) is
    for this Python process only: in mmdebstrap, apt and gpg it hangs or breaks them.
    """
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(extra)
    return env


def reap(pid: int, grace: float) -> int | None:
    """Wait up to `grace` seconds for pid to exit, then SIGKILL it; return its wait status.

    None means the status was not ours to collect (already reaped elsewhere).
    """
    deadline = time.monotonic() + grace
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done == pid:
            return status
        if time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    # Still ours (unreaped), so the pid cannot have been reused: kill its group, then it.
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


def is_child(pid: int) -> bool:
    """Is pid an unreaped child of this process?"""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None or True
    except ChildProcessError:
        return False


def wait_gone(pid: int, start: int | None, grace: float) -> None:
    """Wait up to grace seconds for a process that is not our child to end, then SIGKILL it.

    `start` (its start time in ticks) guards against killing a reused pid.
    """
    from .registry import process_start

    if start is None:
        return
    deadline = time.monotonic() + grace
    while process_start(pid) == start:
        if time.monotonic() >= deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                return
            deadline = time.monotonic() + grace
            grace = 0.0
            if deadline < time.monotonic():
                return
        time.sleep(0.01)


def poll_exit(pid: int) -> tuple[bool, int | None]:
    """(exited, status) without blocking; exited is True also when it is no longer our child."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True, None
    return (True, status) if done == pid else (False, None)


def describe_status(status: int | None) -> str:
    if status is None:
        return "ended (its exit status was collected elsewhere)"
    if os.WIFSIGNALED(status):
        num = os.WTERMSIG(status)
        try:
            name = signal.Signals(num).name
        except ValueError:
            name = f"signal {num}"
        if num == signal.SIGSYS:
            return (
                f"was killed by {name} ({num}): its seccomp filter stopped a system call it does not "
                "allow (a VMM bug or a guest attacking it; see SECURITY.md: `smolvm-vmm "
                "--seccomp-report` names the call)"
            )
        return f"was killed by {name} ({num})"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status:#x}"


def parse_exit_line(line: bytes) -> tuple[str, str] | None:
    """`EXIT <reason> <message>` from the VMM's ctl socket as (reason, message)."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text.startswith("EXIT"):
        return None
    parts = text.split(" ", 2)
    reason = parts[1] if len(parts) > 1 else "unknown"
    message = parts[2] if len(parts) > 2 else ""
    return reason, message


def tail(path: Path, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    """The last `lines` lines of a text file, or "" if it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return "\n".join(text.splitlines()[-lines:])


def format_tails(console: str, stderr: str, console_path: Path | None = None) -> str:
    parts = []
    where = f" ({console_path})" if console_path else ""
    if console:
        parts.append(f"--- guest console, last lines{where} ---\n{console}")
    else:
        parts.append("--- the guest console is empty ---")
    if stderr:
        parts.append(f"--- VMM stderr ---\n{stderr}")
    return "\n".join(parts)

"""PTY sessions without a VM: tests/c/test_pty.c (plain and ASan+UBSan) and smolvm._smolvm.pty_start/PtySession against the agent in --unix mode."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from types import ModuleType

import pytest

from agent_host import VARIANTS, run_client_against_agent
from test_files_host import agent_sock, nat  # noqa: F401  (fixtures)

BASH = shutil.which("bash")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pty_client_against_agent(variant: str, tmp_path: Path) -> None:
    run_client_against_agent(variant, tmp_path, "test_pty.c")


def _until(s: object, pattern: bytes, seen: bytearray, limit: float = 20.0) -> re.Match[bytes]:
    """Pump s until its output so far matches pattern."""
    deadline = time.monotonic() + limit
    while True:
        seen += s.read(1 << 16)  # type: ignore[attr-defined]
        m = re.search(pattern, bytes(seen))
        if m:
            return m
        assert not s.done and time.monotonic() < deadline, f"no {pattern!r} in {bytes(seen)!r}"  # type: ignore[attr-defined]
        s.pump(0.1)  # type: ignore[attr-defined]


def _start(nat: ModuleType, sock: str, cmd: str, rows: int = 24, cols: int = 80) -> object:
    s = nat.pty_start(sock, nat.AGENT_PORT, cmd, "", ["PS1=$ "], 0, 60_000, rows, cols)
    deadline = time.monotonic() + 10
    while s.pid is None:
        assert not s.pump(0.1) and time.monotonic() < deadline
    return s


@pytest.mark.skipif(BASH is None, reason="needs bash on the host")
def test_bash_on_a_tty_resizes_and_exits_with_its_code(nat: ModuleType, agent_sock: str) -> None:
    s = _start(nat, agent_sock, "exec bash --norc --noprofile -i", 24, 80)
    seen = bytearray()
    s.write(b"tty; stty size; echo T=$TERM\n")
    _until(s, rb"/dev/pts/\d+\r\n24 80\r\nT=xterm-256color\r\n", seen)
    s.resize(50, 132)
    s.write(b"stty size; exit 7\n")
    while not s.pump(0.1):
        pass
    seen += s.read(1 << 20)
    assert b"50 132\r\n" in seen
    assert s.status == (7, 0, False) and s.read(10) == b""
    with pytest.raises(ValueError, match="ended"):
        s.write(b"more")
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.resize(10, 10)


def test_close_kills_the_whole_session(nat: ModuleType, agent_sock: str, tmp_path: object) -> None:
    """A job in its own process group (setsid-less `sh -m` background job) dies with the session."""
    marker = f"/tmp/smolvm-pty-{os.getpid()}"
    s = _start(nat, agent_sock, f"set -m; sleep 300 & echo $! > {marker}; echo started; exec sleep 300")
    _until(s, rb"started", bytearray())
    job, leader = int(open(marker).read()), s.pid
    assert os.getpgid(job) != os.getpgid(leader)  # not reachable by a kill of the leader's group
    s.close()
    assert s.done
    deadline = time.monotonic() + 10
    for pid in (job, leader):
        while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
            assert time.monotonic() < deadline, f"pid {pid} outlived its closed PTY session"
            time.sleep(0.05)
    os.unlink(marker)


def test_signal_death_and_bad_requests(nat: ModuleType, agent_sock: str) -> None:
    s = _start(nat, agent_sock, "kill -9 $$")
    while not s.pump(0.1):
        pass
    assert s.status == (137, 9, False)
    for rows, cols in ((0, 80), (24, 0), (nat.PTY_MAX_DIM + 1, 80), (24, 70000)):
        with pytest.raises(ValueError, match="1..4096"):
            nat.pty_start(agent_sock, nat.AGENT_PORT, "sh", "", [], 0, 10_000, rows, cols)
    with pytest.raises(nat.ProtocolError) as info:
        s = nat.pty_start(agent_sock, nat.AGENT_PORT, "sh", "/nonexistent-smolvm", [], 0, 10_000, 24, 80)
        while not s.pump(0.1):
            pass
    assert info.value.code == nat.ERRC_CWD and info.value.err == 2

"""Streaming, stdin and error codes without a VM: smolvm._smolvm.exec_start/ExecStream against the agent in --unix mode."""

from __future__ import annotations

import hashlib
import os
import time
from types import ModuleType

import pytest

from test_files_host import agent_sock, nat  # noqa: F401  (fixtures)


def _drive(stream: object) -> list[tuple[int, bytes]]:
    events: list[tuple[int, bytes]] = []
    while not stream.done:  # type: ignore[attr-defined]
        events += stream.pump(0.1)  # type: ignore[attr-defined]
    return events


def test_chunks_arrive_before_the_command_ends(nat: ModuleType, agent_sock: str) -> None:
    s = nat.exec_start(agent_sock, nat.AGENT_PORT, "echo one; sleep 1; echo two >&2; sleep 1; echo three",
                       "", [], 0, 30_000, events=True)  # fmt: skip
    seen: list[tuple[int, bytes, bool]] = []
    while not s.done:
        for kind, chunk in s.pump(0.1):
            seen.append((kind, chunk, s.done))
    assert [(k, c) for k, c, _ in seen] == [(nat.STDOUT, b"one\n"), (nat.STDERR, b"two\n"), (nat.STDOUT, b"three\n")]
    assert seen[0][2] is False  # the first chunk came while the command still ran
    assert s.result() == (0, 0, b"one\nthree\n", b"two\n", False)


def test_stdin_round_trip_byte_exact(nat: ModuleType, agent_sock: str) -> None:
    data = os.urandom((1 << 20) + 3)
    s = nat.exec_start(agent_sock, nat.AGENT_PORT, "cat", "", [], 0, 60_000, input=data)
    assert _drive(s) == []  # events=False: output only in result()
    code, _sig, out, err, _t = s.result()
    assert code == 0 and err == b"" and hashlib.sha256(out).digest() == hashlib.sha256(data).digest()
    s = nat.exec_start(agent_sock, nat.AGENT_PORT, "wc -c", "", [], 0, 60_000, input=b"")
    _drive(s)
    assert s.result()[2].strip() == b"0"


def test_close_kills_the_command(nat: ModuleType, agent_sock: str, tmp_path: object) -> None:
    marker = f"/tmp/smolvm-stream-{os.getpid()}"
    s = nat.exec_start(agent_sock, nat.AGENT_PORT, f"echo $$ > {marker}; exec sleep 30", "", [], 0, 60_000,
                       events=True)  # fmt: skip
    deadline = time.monotonic() + 10
    while not os.path.exists(marker) or not open(marker).read().strip():
        s.pump(0.05)
        assert time.monotonic() < deadline
    pid = int(open(marker).read())
    s.close()
    assert s.done
    deadline = time.monotonic() + 10
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the command outlived its closed stream"
        time.sleep(0.05)
    os.unlink(marker)


def test_cwd_error_carries_its_code(nat: ModuleType, agent_sock: str) -> None:
    from smolvm.errors import ProtocolError, SmolVMError

    assert nat.ProtocolError is ProtocolError and issubclass(ProtocolError, SmolVMError)
    with pytest.raises(nat.ProtocolError) as info:
        s = nat.exec_start(agent_sock, nat.AGENT_PORT, "pwd", "/nonexistent-smolvm", [], 0, 10_000)
        _drive(s)
    assert info.value.code == nat.ERRC_CWD and info.value.err == 2
    with pytest.raises(nat.ProtocolError) as info:
        nat.exec(agent_sock, nat.AGENT_PORT, "pwd", "/nonexistent-smolvm", [], 0, 10_000)
    assert info.value.code == nat.ERRC_CWD
    with pytest.raises(TypeError):
        nat.exec_start(agent_sock, nat.AGENT_PORT, "cat", "", [], 0, 10_000, input="text")

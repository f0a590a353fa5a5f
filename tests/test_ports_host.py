"""Host-only tests of the agent's FORWARD relay: the agent in --unix mode, TCP servers on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _helpers import Listener
from agent_host import WARN, VARIANTS, need_toolchain
from smolvm.build import agent as agent_build

MAGIC = 0x34564D53  # "SMV4"
T_FORWARD = 20


def forward_frame(port: int, flags: int = 0, length: int = 8) -> bytes:
    return struct.pack("<IHHI", MAGIC, T_FORWARD, 0, length) + struct.pack("<II", port, flags)[:length]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def agent_sock(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    need_toolchain()
    d = tmp_path_factory.mktemp(f"agent-{request.param}")
    agent = d / "agent"
    agent_build.compile_agent(agent, None if request.param == "plain" else [*WARN, *VARIANTS[request.param]])
    sock = d / "agent.sock"
    env = {"PATH": "/usr/bin:/bin", "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "halt_on_error=1"}
    proc = subprocess.Popen([str(agent), "--unix", str(sock)], env=env, stderr=subprocess.PIPE)
    for _ in range(200):
        if sock.exists():
            break
        time.sleep(0.01)
    yield sock
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    assert b"ERROR: AddressSanitizer" not in err and b"runtime error" not in err, err.decode()


def open_forward(sock: Path, port: int, frame: bytes | None = None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(sock))
    s.sendall(b"CONNECT 52\n")
    line = b""
    while not line.endswith(b"\n"):
        line += s.recv(1)
    assert line == b"OK 52\n"
    s.sendall(forward_frame(port) if frame is None else frame)
    return s


def recv_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


class Echo:
    """A TCP server on 127.0.0.1 that echoes each connection until EOF, then closes it."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.listener = Listener(self.srv, self._echo)

    @staticmethod
    def _echo(c: socket.socket) -> None:
        with c:
            while data := c.recv(65536):
                c.sendall(data)


@pytest.fixture(scope="module")
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.listener.close()


def test_relay_half_close_big(agent_sock: Path, echo: Echo) -> None:
    data = os.urandom(3 << 20)
    s = open_forward(agent_sock, echo.port)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(recv_all(s)))
    reader.start()
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)  # the echo server sees EOF only through the agent's half-close
    reader.join(30)
    assert got and got[0] == data
    s.close()


def test_relay_many_connections(agent_sock: Path, echo: Echo) -> None:
    socks = [open_forward(agent_sock, echo.port) for _ in range(20)]
    for i, s in enumerate(socks):
        s.sendall(b"hello %d" % i)
        s.shutdown(socket.SHUT_WR)
    for i, s in enumerate(socks):
        assert recv_all(s) == b"hello %d" % i
        s.close()


def test_relay_refused_closes(agent_sock: Path) -> None:
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    s = open_forward(agent_sock, port)
    assert recv_all(s) == b""  # closed without an answer
    s.close()


@pytest.mark.parametrize("frame", [
    forward_frame(0), forward_frame(70000), forward_frame(80, flags=1),
    forward_frame(80, length=4), struct.pack("<IHHI", MAGIC, T_FORWARD, 0, 1 << 30),
])  # fmt: skip
def test_relay_bad_forward_frames_close(agent_sock: Path, echo: Echo, frame: bytes) -> None:
    s = open_forward(agent_sock, 0, frame=frame)
    try:
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b""
    except ConnectionResetError:
        pass  # closed with our bytes unread: a reset, also a close
    s.close()
    # the agent still serves
    s = open_forward(agent_sock, echo.port)
    s.sendall(b"still here")
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b"still here"
    s.close()

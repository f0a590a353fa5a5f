"""Tests of the C extension that need no VM: spawn_vmm and wait_line with fake children, exec against a fake agent."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from _helpers import Listener, run_threads
from smolvm._native import native

MAGIC = 0x34564D53  # "SMV4"
HDR = struct.Struct("<IHHI")
T_EXEC, T_STDOUT, T_STDERR, T_EXIT, T_ERROR = 1, 2, 3, 4, 5


@pytest.fixture(scope="module")
def nat() -> ModuleType:
    return native()


# ---- spawn_vmm / wait_line ---------------------------------------------------------------


def spawn_sh(nat: ModuleType, script: str, **kw: object) -> tuple[int, int]:
    return nat.spawn_vmm(["/bin/sh", "-c", script], **kw)


def reap(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


def sigint_main_soon(delay: float = 0.3) -> None:
    """Send SIGINT to this (the main) thread after delay seconds, from a thread of its own."""
    main = threading.get_ident()

    def poke() -> None:
        time.sleep(delay)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=poke).start()


def test_spawn_gives_ctl_on_fd3_in_new_group(nat: ModuleType) -> None:
    pid, fd = spawn_sh(nat, 'echo READY >&3; echo "pg $(cut -d" " -f5 /proc/$$/stat)" >&3; cat <&3 >/dev/null; exit 7')
    try:
        assert not os.get_inheritable(fd), "the parent's end must be close-on-exec"
        assert nat.wait_line(fd, 10) == b"READY\n"
        assert nat.wait_line(fd, 10) == f"pg {pid}\n".encode()
        assert os.getpgid(pid) == pid
    finally:
        os.close(fd)  # the child sees EOF on fd 3 and exits: the no-orphans mechanism
    assert os.WEXITSTATUS(reap(pid)) == 7


def test_spawn_stdio_null_and_no_leaked_fds(nat: ModuleType, tmp_path: Path) -> None:
    leak_path = tmp_path / "leak"
    leak = os.open(leak_path, os.O_CREAT | os.O_RDWR)
    os.set_inheritable(leak, True)  # a careless library's fd: must not reach the VMM
    try:
        # Command substitutions run in subshells, so /proc/$$ shows the spawned shell's own fds.
        pid, fd = spawn_sh(
            nat,
            'echo "$(readlink /proc/$$/fd/0) $(readlink /proc/$$/fd/1) $(readlink /proc/$$/fd/2)" >&3; '
            'echo "$(for f in /proc/$$/fd/*; do readlink $f; done | tr "\\n" " ")" >&3',
        )
        stdio = nat.wait_line(fd, 10)
        targets = nat.wait_line(fd, 10)
        os.close(fd)
        reap(pid)
    finally:
        os.close(leak)
    assert stdio == b"/dev/null /dev/null /dev/null\n"
    assert targets is not None and b"socket:" in targets
    assert str(leak_path).encode() not in targets, targets


def test_spawn_stderr_path(nat: ModuleType, tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    pid, fd = spawn_sh(nat, "echo oops >&2", stderr_path=str(log))
    assert nat.wait_line(fd, 10) == b""
    os.close(fd)
    reap(pid)
    assert log.read_text() == "oops\n"


def test_spawn_resets_signal_mask(nat: ModuleType) -> None:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    try:
        # exec: grep inherits the spawned shell's mask (dash blocks signals around its own vforks).
        pid, fd = spawn_sh(nat, "exec grep SigBlk /proc/self/status >&3")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    line = nat.wait_line(fd, 10)
    os.close(fd)
    reap(pid)
    assert line is not None and int(line.split()[1], 16) == 0


def test_spawn_missing_program(nat: ModuleType) -> None:
    with pytest.raises(FileNotFoundError):
        nat.spawn_vmm(["/nonexistent/smolvm-vmm"])
    with pytest.raises(ValueError):
        nat.spawn_vmm([])
    with pytest.raises(TypeError):
        nat.spawn_vmm("/bin/true")


def test_wait_line_timeout_eof_and_exit_line(nat: ModuleType) -> None:
    pid, fd = spawn_sh(nat, "sleep 1; printf 'EXIT shutdown bye\\npartial' >&3")
    t0 = time.monotonic()
    assert nat.wait_line(fd, 0.2) is None
    assert 0.15 < time.monotonic() - t0 < 0.9
    assert nat.wait_line(fd, 10) == b"EXIT shutdown bye\n"
    assert nat.wait_line(fd, 10) == b"partial"
    assert nat.wait_line(fd, 10) == b""
    os.close(fd)
    reap(pid)


def test_wait_line_interrupted_by_signal(nat: ModuleType) -> None:
    pid, fd = spawn_sh(nat, "sleep 30")
    sigint_main_soon()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            nat.wait_line(fd, 20)
        assert time.monotonic() - t0 < 3
    finally:
        os.close(fd)
        os.kill(pid, signal.SIGKILL)
        reap(pid)


def test_wait_line_bad_fd(nat: ModuleType) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError):
        nat.wait_line(r, 0.1)


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="/dev/kvm is not usable here")
def test_kvm_info(nat: ModuleType) -> None:
    info = nat.kvm_info()
    assert info["api_version"] == 12
    for key in ("irqchip", "pit2", "ioeventfd", "irqfd", "nr_vcpus", "max_vcpus", "immediate_exit"):
        assert isinstance(info[key], int)
    assert info["irqchip"] > 0


# ---- exec against a fake agent -----------------------------------------------------------


def frame(ftype: int, payload: bytes = b"", magic: int = MAGIC) -> bytes:
    return HDR.pack(magic, ftype, 0, len(payload)) + payload


def exit_frame(code: int, sig: int = 0, flags: int = 0) -> bytes:
    return frame(T_EXIT, struct.pack("<iiI", code, sig, flags))


def recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


class Request:
    def __init__(self, payload: bytes) -> None:
        self.timeout_ms, n_env, self.flags = struct.unpack_from("<III", payload)
        parts = payload[12:].split(b"\0")
        self.command = parts[0].decode("utf-8", "surrogateescape")
        self.cwd = parts[1].decode()
        self.env = [p.decode() for p in parts[2 : 2 + n_env]]


Handler = Callable[[socket.socket, Request], None]


class FakeAgent:
    """A Unix socket speaking the VMM's CONNECT handshake and the agent's frames."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[Request] = []
        self.ports: list[int] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.listener = Listener(self.sock, self.one)

    def one(self, conn: socket.socket) -> None:
        with conn:
            try:
                line = b""
                while not line.endswith(b"\n"):
                    line += recv_exact(conn, 1)
                assert line.startswith(b"CONNECT ")
                self.ports.append(int(line.split()[1]))
                conn.sendall(b"OK 1073741824\n")
                magic, ftype, _flags, length = HDR.unpack(recv_exact(conn, HDR.size))
                assert magic == MAGIC and ftype == T_EXEC
                req = Request(recv_exact(conn, length))
                self.requests.append(req)
                self.handler(conn, req)
            except (EOFError, OSError):
                pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[[Handler], FakeAgent]]:
    agents: list[FakeAgent] = []

    def make(handler: Handler) -> FakeAgent:
        agent = FakeAgent(tmp_path / f"vsock{len(agents)}.sock", handler)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.close()


def call(nat: ModuleType, agent: FakeAgent, command: str = "true", cwd: str = "", env: list[str] | None = None,
         timeout_ms: int = 1000, host_timeout_ms: int = 10000) -> tuple:
    return nat.exec(str(agent.path), nat.AGENT_PORT, command, cwd, env or [], timeout_ms, host_timeout_ms)


def test_exec_round_trip(nat: ModuleType, agent_factory) -> None:
    def handler(conn: socket.socket, req: Request) -> None:
        conn.sendall(frame(T_STDOUT, b"out1 ") + frame(T_STDERR, b"err") + frame(T_STDOUT, b"out2"))
        conn.sendall(exit_frame(3))

    agent = agent_factory(handler)
    code, sig, out, err, timed_out = call(nat, agent, "echo hi", "/tmp", ["A=1", "B=two words"], 2500)
    assert (code, sig, out, err, timed_out) == (3, 0, b"out1 out2", b"err", False)
    req = agent.requests[0]
    assert agent.ports == [52]
    assert (req.command, req.cwd, req.env, req.timeout_ms) == ("echo hi", "/tmp", ["A=1", "B=two words"], 2500)


def test_exec_empty_output_is_bytes(nat: ModuleType, agent_factory) -> None:
    agent = agent_factory(lambda conn, req: conn.sendall(exit_frame(0)))
    assert call(nat, agent) == (0, 0, b"", b"", False)


def test_exec_timed_out_and_signal(nat: ModuleType, agent_factory) -> None:
    agent = agent_factory(lambda conn, req: conn.sendall(frame(T_STDOUT, b"so far") + exit_frame(124, 9, 1)))
    assert call(nat, agent) == (124, 9, b"so far", b"", True)


def test_exec_large_output(nat: ModuleType, agent_factory) -> None:
    blob = os.urandom(3 << 20)

    def handler(conn: socket.socket, req: Request) -> None:
        for i in range(0, len(blob), 60000):
            conn.sendall(frame(T_STDOUT if (i // 60000) % 2 == 0 else T_STDERR, blob[i : i + 60000]))
        conn.sendall(exit_frame(0))

    agent = agent_factory(handler)
    _code, _sig, out, err, _t = call(nat, agent)
    chunks = [blob[i : i + 60000] for i in range(0, len(blob), 60000)]
    assert out == b"".join(chunks[0::2])
    assert err == b"".join(chunks[1::2])


def test_exec_error_frame(nat: ModuleType, agent_factory) -> None:
    agent = agent_factory(lambda conn, req: conn.sendall(frame(T_ERROR, struct.pack("<iI", 0, 0) + b"cannot spawn: out of memory")))
    with pytest.raises(nat.ProtocolError, match="out of memory"):
        call(nat, agent)


def test_exec_bad_magic(nat: ModuleType, agent_factory) -> None:
    agent = agent_factory(lambda conn, req: conn.sendall(frame(T_STDOUT, b"x", magic=0xDEADBEEF)))
    with pytest.raises(nat.ProtocolError):
        call(nat, agent)


def test_exec_peer_closes_early(nat: ModuleType, agent_factory) -> None:
    agent = agent_factory(lambda conn, req: conn.sendall(frame(T_STDOUT, b"partial")))
    with pytest.raises(ConnectionResetError):
        call(nat, agent)


def test_exec_no_socket(nat: ModuleType, tmp_path: Path) -> None:
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        nat.exec(str(tmp_path / "missing.sock"), 52, "true", "", [], 1000, 1000)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()  # the file stays, nobody listens
    with pytest.raises(ConnectionRefusedError):
        nat.exec(str(tmp_path / "dead.sock"), 52, "true", "", [], 1000, 1000)


def test_exec_host_timeout(nat: ModuleType, agent_factory) -> None:
    agent = agent_factory(lambda conn, req: time.sleep(5))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        call(nat, agent, host_timeout_ms=500)
    assert 0.4 < time.monotonic() - t0 < 3


def test_exec_ctrl_c(nat: ModuleType, agent_factory) -> None:
    agent = agent_factory(lambda conn, req: time.sleep(10))
    sigint_main_soon()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        call(nat, agent, host_timeout_ms=20000)
    assert time.monotonic() - t0 < 3


def test_exec_concurrent(nat: ModuleType, agent_factory) -> None:
    def handler(conn: socket.socket, req: Request) -> None:
        n = int(req.command)
        time.sleep(0.2)
        for i in range(50):
            conn.sendall(frame(T_STDOUT, f"{n}:{i}\n".encode()))
        conn.sendall(exit_frame(n))

    agent = agent_factory(handler)
    results: dict[int, tuple] = {}

    def worker(n: int) -> None:
        results[n] = call(nat, agent, str(n))

    run_threads(worker, range(8))
    for n in range(8):
        assert results[n][0] == n
        assert results[n][2] == "".join(f"{n}:{i}\n" for i in range(50)).encode()


def test_exec_argument_errors(nat: ModuleType, agent_factory) -> None:
    agent = agent_factory(lambda conn, req: conn.sendall(exit_frame(0)))
    with pytest.raises(ValueError):
        call(nat, agent, "a\0b")
    with pytest.raises(TypeError):
        nat.exec(str(agent.path), 52, "true", "", "A=1", 1000, 1000)
    with pytest.raises(TypeError):
        nat.exec(str(agent.path), 52, 42, "", [], 1000, 1000)
    with pytest.raises(ValueError):
        call(nat, agent, "x" * (2 << 20))
    assert call(nat, agent, "ok") == (0, 0, b"", b"", False)

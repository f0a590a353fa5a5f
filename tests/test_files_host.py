"""File transfer without a VM: tests/c/test_files.c and smolvm._smolvm.put_file/get_file against the agent in --unix mode."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from smolvm.build import agent as agent_build

from agent_host import VARIANTS, need_toolchain, run_client_against_agent  # noqa: E402


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_file_client_against_agent(variant: str, tmp_path: Path) -> None:
    run_client_against_agent(variant, tmp_path, "test_files.c")


# ---- the Python binding ---------------------------------------------------------------


@pytest.fixture(scope="module")
def nat() -> ModuleType:
    from smolvm._native import native

    try:
        mod = native()
    except Exception as e:  # not built: the C test above still covers the client
        pytest.skip(f"smolvm._smolvm is not importable: {e}")
    if not hasattr(mod, "put_file"):
        pytest.skip(f"{mod.__file__} predates put_file/get_file: reinstall smolvm (pip install .)")
    return mod


@pytest.fixture(scope="module")
def agent_sock(nat: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The static agent listening in --unix mode; the path of its socket."""
    need_toolchain()
    work = tmp_path_factory.mktemp("agent")
    binary = work / "agent"
    agent_build.compile_agent(binary)
    sock = str(work / "vsock.sock")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    proc = subprocess.Popen([str(binary), "--unix", sock], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                nat.exec(sock, nat.AGENT_PORT, "true", "", [], 0, 5000)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.02)
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".smolvm-" in p.name]


def test_put_get_round_trip(nat: ModuleType, agent_sock: str, tmp_path: Path) -> None:
    for size in (0, 1, 3 * 1024 * 1024 + 7):
        data = os.urandom(size)
        local, guest, back = tmp_path / "local", tmp_path / "guest", tmp_path / "back"
        local.write_bytes(data)
        sent = nat.put_file(agent_sock, nat.AGENT_PORT, str(local), str(guest), 0o754, 30_000)
        assert sent == size
        assert guest.read_bytes() == data
        assert guest.stat().st_mode & 0o7777 == 0o754
        got_size, got_mode = nat.get_file(agent_sock, nat.AGENT_PORT, str(guest), str(back), 30_000)
        assert (got_size, got_mode & 0o170777) == (size, 0o100754)
        assert back.read_bytes() == data
        assert back.stat().st_mode & 0o777 == 0o600
    assert _temps(tmp_path) == []


def test_put_errors(nat: ModuleType, agent_sock: str, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.write_bytes(b"x" * 100)
    missing_local = tmp_path / "no-such-local"
    with pytest.raises(FileNotFoundError) as e:
        nat.put_file(agent_sock, nat.AGENT_PORT, str(missing_local), str(tmp_path / "g"), 0o644, 10_000)
    assert e.value.filename == str(missing_local)

    target = str(tmp_path / "no-such-dir" / "f")
    with pytest.raises(FileNotFoundError) as e:
        nat.put_file(agent_sock, nat.AGENT_PORT, str(local), target, 0o644, 10_000)
    assert e.value.filename == target and "no-such-dir" in e.value.strerror
    with pytest.raises(IsADirectoryError):
        nat.put_file(agent_sock, nat.AGENT_PORT, str(local), str(tmp_path), 0o644, 10_000)
    with pytest.raises(OSError) as e:
        nat.put_file(agent_sock, nat.AGENT_PORT, str(local), "relative/f", 0o644, 10_000)
    assert e.value.errno == errno.EINVAL and "absolute" in e.value.strerror
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]


def test_get_errors(nat: ModuleType, agent_sock: str, tmp_path: Path) -> None:
    back = tmp_path / "back"
    guest = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as e:
        nat.get_file(agent_sock, nat.AGENT_PORT, guest, str(back), 10_000)
    assert e.value.filename == guest
    assert not back.exists(), "a failed download leaves no local file"
    with pytest.raises(IsADirectoryError):
        nat.get_file(agent_sock, nat.AGENT_PORT, str(tmp_path), str(back), 10_000)
    (tmp_path / "f").write_bytes(b"abc")
    with pytest.raises(FileNotFoundError) as e:
        nat.get_file(agent_sock, nat.AGENT_PORT, str(tmp_path / "f"), str(tmp_path / "no-dir" / "back"), 10_000)
    assert e.value.filename == str(tmp_path / "no-dir" / "back")


def test_transfer_errors_of_the_connection(nat: ModuleType, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.write_bytes(b"x")
    with pytest.raises(FileNotFoundError):
        nat.put_file(str(tmp_path / "no.sock"), nat.AGENT_PORT, str(local), "/tmp/x", 0o644, 1000)
    # a peer that accepts and never answers: the host timeout
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(tmp_path / "mute.sock"))
        srv.listen(1)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            nat.get_file(str(tmp_path / "mute.sock"), nat.AGENT_PORT, "/x", str(tmp_path / "back"), 300)
        assert time.monotonic() - t0 < 5


def test_setup_flags_and_error_messages(nat: ModuleType, agent_sock: str) -> None:
    # SETUP_ROOT is accepted (and ignored) by the agent in --unix mode
    nat.setup(agent_sock, nat.AGENT_PORT, 0, b"", "", 10_000, nat.SETUP_ROOT)
    nat.setup(agent_sock, nat.AGENT_PORT, 0, b"", "", 10_000)
    with pytest.raises(nat.ProtocolError, match="unknown flags"):
        nat.setup(agent_sock, nat.AGENT_PORT, 0, b"", "", 10_000, 0x80)
    with pytest.raises(nat.ProtocolError, match="cwd /nonexistent-smolvm: No such file"):
        nat.exec(agent_sock, nat.AGENT_PORT, "true", "/nonexistent-smolvm", [], 0, 10_000)

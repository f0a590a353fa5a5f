"""vm.fork() against real VMs: children start from the parent's instant, then go their own way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from smolvm import SmolVM, forks, registry
from smolvm.errors import VMGoneError, VMNotRunningError

from test_lifecycle import _assert_no_trace, _delete_quietly

pytestmark = pytest.mark.vm

T = 120  # seconds per guest command on a busy host
COUNTER = (
    "setsid nohup sh -c 'echo $$ > /tmp/counter.pid; i=0; "
    "while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done' >/dev/null 2>&1 &"
)


def _count(vm: SmolVM) -> int:
    """The counter's value (0 before its first tick; a read between its truncate and its write
    sees an empty file, so read again)."""
    for _ in range(20):
        out = vm.run("cat /tmp/count 2>/dev/null || echo 0", timeout=T).stdout.strip()
        if out:
            return int(out)
    raise AssertionError(f"/tmp/count stays empty in {vm.vm_id}")


def _wait_count_above(vm: SmolVM, value: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (now := _count(vm)) <= value and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


@pytest.fixture(scope="module")
def parent(vm: SmolVM) -> Iterator[SmolVM]:
    """A restored sandbox with a counter running, a file on its disk and one in its memory
    (tmpfs), checked against the kernel's page map at every fork (SMOLVM_FORK_VERIFY)."""
    os.environ["SMOLVM_FORK_VERIFY"] = "1"
    try:
        with SmolVM() as p:
            r = p.run(f"echo on-disk > /root/before && echo in-ram > /tmp/before && {COUNTER}", timeout=T)
            assert r.ok, r
            _wait_count_above(p, 5)
            yield p
    finally:
        os.environ.pop("SMOLVM_FORK_VERIFY", None)


@pytest.fixture(scope="module")
def pair(parent: SmolVM) -> Iterator[tuple[list[SmolVM], int]]:
    """Two children of parent, and the parent's counter read just before the fork."""
    before = _count(parent)
    kids = parent.fork(2)
    try:
        yield kids, before
    finally:
        for k in kids:
            k.delete()


def test_fork_is_layered_and_its_dirty_log_misses_nothing(parent: SmolVM, pair: tuple[list[SmolVM], int]) -> None:
    cap = parent.last_fork
    assert cap is not None and cap.layered, cap
    # pages written since the restore: the counter, the files, page cache; far from all 512 MiB
    assert 0 < cap.pages < parent.memory * 256 // 2, cap
    assert cap.missed == 0, f"KVM's dirty log and the VMM's marks missed {cap.missed} written pages"
    assert (cap.path / "overlay.bin").is_file() and (cap.path / "memory.bin").stat().st_nlink >= 2


def test_counter_keeps_counting_in_every_child(parent: SmolVM, pair: tuple[list[SmolVM], int]) -> None:
    kids, before = pair
    pid = parent.run("cat /tmp/counter.pid", timeout=T).stdout
    for k in kids:
        assert k.run("cat /tmp/counter.pid", timeout=T).stdout == pid  # the same process, not a new one
        start = _count(k)
        assert start >= before, f"child {k.vm_id} counts from {start}, the parent was at {before}"
        assert _wait_count_above(k, start) > start, f"the counter stopped in {k.vm_id}"
    assert _wait_count_above(parent, before) > before


def test_files_written_before_the_fork_are_in_every_child(pair: tuple[list[SmolVM], int]) -> None:
    kids, _ = pair
    for k in kids:
        assert k.run("cat /root/before /tmp/before", timeout=T).stdout == "on-disk\nin-ram\n"


def test_files_written_after_the_fork_stay_in_their_sandbox(parent: SmolVM, pair: tuple[list[SmolVM], int]) -> None:
    (a, b), _ = pair
    assert a.run("echo a > /root/after && echo a > /tmp/after-ram", timeout=T).ok
    assert b.run("echo b > /root/after-b", timeout=T).ok
    for other in (b, parent):
        r = other.run("ls /root/after /tmp/after-ram", timeout=T)
        assert r.exit_code != 0 and "No such file" in r.stderr, (other.vm_id, r)
    assert parent.run("ls /root/after-b", timeout=T).exit_code != 0
    assert a.run("cat /root/after", timeout=T).stdout == "a\n"


def test_children_have_their_own_identity_and_randomness(parent: SmolVM, pair: tuple[list[SmolVM], int]) -> None:
    (a, b), _ = pair
    assert len({parent.vm_id, a.vm_id, b.vm_id}) == 3
    assert a.run("hostname", timeout=T).output == a.vm_id
    cmd = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
    ra, rb = a.run(cmd, timeout=T).output, b.run(cmd, timeout=T).output
    assert len(ra) == 64 and ra != rb


def test_fork_of_a_fork_is_layered_and_complete(pair: tuple[list[SmolVM], int]) -> None:
    (a, _b), _ = pair
    assert a.run("echo grand > /tmp/for-grandchild", timeout=T).ok
    (g,) = a.fork()
    try:
        cap = a.last_fork
        assert cap is not None and cap.layered and cap.missed == 0, cap
        assert g.run("cat /root/before /tmp/before /tmp/for-grandchild", timeout=T).stdout == (
            "on-disk\nin-ram\ngrand\n"
        )
        start = _count(g)
        assert _wait_count_above(g, start) > start
    finally:
        g.delete()


def test_fork_of_a_paused_vm_leaves_it_paused(parent: SmolVM) -> None:
    parent.pause()
    try:
        (k,) = parent.fork()
        try:
            assert parent.status == "paused" and k.status == "running"
            start = _count(k)
            assert _wait_count_above(k, start) > start  # the child runs
        finally:
            k.delete()
        assert parent.status == "paused"
    finally:
        parent.resume()


def test_fork4_with_an_exposed_port_then_delete_leaves_nothing(parent: SmolVM) -> None:
    port = parent.expose_local(8000)
    try:
        kids = parent.fork(4)
        cap = parent.last_fork
        assert cap is not None and cap.path.is_dir()
        recs = [registry.load(k.vm_id) for k in kids]
        assert all(forks.of(r.source) == cap.path for r in recs)
        for k in kids:
            assert k.exposed_ports() == []  # forwards belong to the parent's VMM
            assert k.run("cat /root/before", timeout=T).stdout == "on-disk\n"
        assert [p.host_port for p in parent.exposed_ports()] == [port]
        kids[0].delete()
        assert cap.path.is_dir()  # three children still need it
        for k in kids[1:]:
            k.delete()
        assert not cap.path.exists(), "the capture outlived its last child"
        for k, r in zip(kids, recs):
            _assert_no_trace(k.vm_id, r)
    finally:
        parent.unexpose_local(port)


def test_fork_of_a_dead_or_deleted_vm_is_a_clear_error(parent: SmolVM) -> None:
    dead, deleted = parent.fork(2, persistent=True)
    cap = parent.last_fork
    assert cap is not None
    try:
        deleted.delete()
        with pytest.raises(VMNotRunningError, match=deleted.vm_id):
            deleted.fork()
        os.kill(registry.load(dead.vm_id).pid, signal.SIGKILL)
        for _ in range(2):  # the first call finds out, the second remembers
            with pytest.raises(VMGoneError, match=dead.vm_id):
                dead.fork()
        with pytest.raises(ValueError, match="fork"):
            parent.fork(0)
        forks.collect()  # what `smolvm rm` and `smolvm doctor` run: the orphaned capture goes
        assert not cap.path.exists()
    finally:
        _delete_quietly(dead.vm_id)


def test_cli_fork_makes_persistent_children(parent: SmolVM, smolvm_env: dict[str, str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "smolvm", "fork", parent.vm_id, "-n", "1", "--json"],
        env=smolvm_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    ids = json.loads(out.stdout)["children"]
    try:
        assert len(ids) == 1
        child = SmolVM.from_id(ids[0])
        assert child.run("cat /root/before", timeout=T).stdout == "on-disk\n"
    finally:
        for i in ids:
            _delete_quietly(i)

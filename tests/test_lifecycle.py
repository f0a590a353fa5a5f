"""Snapshots, lifecycle, registry and CLI against real VMs: restore, isolation, pause, delete, from_id."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from _helpers import processes_naming
from smolvm import SmolVM, SmolVMError, VMStartError, registry, snapshots
from smolvm.errors import SnapshotError, VMNotFoundError

pytestmark = pytest.mark.vm

T = 120  # seconds per guest command: each spawn takes seconds on emulating, busy hosts
GONE_WAIT = 15.0  # seconds for a VMM to go after its owner or delete()
CLOCK_GAP = 5.0  # restore at least this long after the snapshot, so a stale guest clock shows


def _alive(pid: int) -> bool:
    """Is pid a live process? A zombie is gone, unless its other threads are still exiting
    (a zombie thread-group leader whose threads still hold its files and sockets)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state not in ("Z", "X"):
            return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except (OSError, IndexError):
        return False


def _vmm_alive(rec: registry.VMRecord) -> bool:
    return registry.process_start(rec.pid) == rec.pid_start and _alive(rec.pid)


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains text (a VMM's carries its vm_id in paths)."""
    return [pid for pid, _ in processes_naming(text) if _alive(pid)]


def _unix_sockets_naming(text: str) -> list[str]:
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return [line for line in lines if text in line]


def _wait_vmm_gone(rec: registry.VMRecord, timeout: float = GONE_WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while _vmm_alive(rec) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _vmm_alive(rec)


def _assert_no_trace(vm_id: str, rec: registry.VMRecord) -> None:
    """Nothing of the VM is left: no VMM process, no socket, no state folder, no record."""
    assert _wait_vmm_gone(rec), f"VMM pid {rec.pid} of {vm_id} still runs"
    assert _processes_naming(vm_id) == [], f"processes still name {vm_id}"
    # The VMM's io_uring polls hold its listening sockets until the kernel tears the ring
    # down, asynchronously and just after the process is gone: give that a moment.
    deadline = time.monotonic() + GONE_WAIT
    while _unix_sockets_naming(vm_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _unix_sockets_naming(vm_id) == [], f"Unix sockets of {vm_id} remain"
    assert not (registry.vms_root() / vm_id).exists(), f"state folder of {vm_id} remains"
    assert vm_id not in [r.vm_id for r in SmolVM.list()]
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id(vm_id)


def _python(env: dict[str, str], code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600
    )


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smolvm", *args], env=env, capture_output=True, text=True, timeout=600
    )


def _delete_quietly(vm_id: str | None) -> None:
    if vm_id is None:
        return
    try:
        SmolVM.from_id(vm_id).delete()
    except VMNotFoundError:
        pass


# ---- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snap(vm: SmolVM) -> Iterator[tuple[str, str, float]]:
    """(name, token, created): a user snapshot of the shared VM holding /tmp/lifecycle-marker = token."""
    token = secrets.token_hex(8)
    name = f"test-lifecycle-{token}"
    r = vm.run(f"echo {token} > /tmp/lifecycle-marker && echo ok", timeout=T)
    assert r.stdout == "ok\n", r
    info = vm.snapshot(name)
    assert info.name == name and info.memory == vm.memory and info.vcpus == vm.vcpus
    yield name, token, info.created
    try:
        snapshots.delete(name)
    except SnapshotError:
        pass


@pytest.fixture(scope="module")
def trio(snap: tuple[str, str, float]) -> Iterator[list[SmolVM]]:
    """Three ephemeral sandboxes restored from `snap`, at least CLOCK_GAP s after it was taken."""
    name, _token, created = snap
    time.sleep(max(0.0, created + CLOCK_GAP - time.time()))
    with ExitStack() as stack:
        yield [stack.enter_context(SmolVM.from_snapshot(name)) for _ in range(3)]


# ---- restore ---------------------------------------------------------------------------


def test_restore_gives_working_sandbox(trio: list[SmolVM], snap: tuple[str, str, float]) -> None:
    _name, token, _created = snap
    vm = trio[0]
    assert vm.status == "running"
    assert vm.vm_id in [r.vm_id for r in SmolVM.list()]
    r = vm.run("cat /tmp/lifecycle-marker; hostname; echo err >&2; exit 3", timeout=T)
    assert r.stdout == f"{token}\n{vm.vm_id}\n", r  # the snapshot's files, its own hostname
    assert r.stderr == "err\n" and r.exit_code == 3


def test_sandboxes_from_one_snapshot_are_isolated(trio: list[SmolVM]) -> None:
    a, b, c = trio
    assert a.run("echo mine > /tmp/only-in-a && cat /tmp/only-in-a", timeout=T).stdout == "mine\n"
    for other in (b, c):
        r = other.run("cat /tmp/only-in-a", timeout=T)
        assert r.exit_code != 0 and r.stdout == "", f"{other.vm_id} sees a file written in {a.vm_id}"
    assert a.run("cat /tmp/only-in-a", timeout=T).stdout == "mine\n"


def test_restored_sandboxes_have_their_own_randomness(trio: list[SmolVM]) -> None:
    cmd = "cat /proc/sys/kernel/random/uuid; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo"
    uuids, rand = [], []
    for vm in trio:
        r = vm.run(cmd, timeout=T)
        assert r.exit_code == 0, r
        u, x = r.stdout.split()
        assert re.fullmatch(r"[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}", u), u
        assert re.fullmatch(r"[0-9a-f]{64}", x), x
        uuids.append(u)
        rand.append(x)
    assert len(set(uuids)) == 3, f"UUIDs repeat across sandboxes: {uuids}"
    assert len(set(rand)) == 3, f"/dev/urandom repeats across sandboxes: {rand}"


def test_guest_clock_matches_host_after_restore(trio: list[SmolVM], snap: tuple[str, str, float]) -> None:
    assert time.time() - snap[2] >= CLOCK_GAP  # a guest clock left at snapshot time would be off
    t0 = time.time()
    r = trio[2].run("date +%s", timeout=T)
    t1 = time.time()
    guest = int(r.stdout)
    assert int(t0) - 2 <= guest <= t1 + 2, f"guest clock {guest}, host {t0:.1f}..{t1:.1f}"


# ---- corrupt and truncated snapshots ------------------------------------------------------


def _flip_state(d: Path) -> None:
    p = d / snapshots.STATE
    data = bytearray(p.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0x5A
    p.write_bytes(bytes(data))


def _truncate_state(d: Path) -> None:
    p = d / snapshots.STATE
    os.truncate(p, p.stat().st_size // 2)


def _truncate_memory(d: Path) -> None:
    p = d / snapshots.MEMORY
    os.truncate(p, p.stat().st_size // 2)


def _foreign_state(d: Path) -> None:
    (d / snapshots.STATE).write_bytes(secrets.token_bytes(4096))


DAMAGE = {
    "state-flipped": (_flip_state, snapshots.STATE, "checksum"),
    "state-truncated": (_truncate_state, snapshots.STATE, "truncated"),
    "memory-truncated": (_truncate_memory, snapshots.MEMORY, "truncated"),
    "state-foreign": (_foreign_state, snapshots.STATE, "not a smolvm snapshot"),
}


@pytest.mark.parametrize("when", ["before-from_snapshot", "before-start"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_snapshot_gives_clear_error(snap: tuple[str, str, float], damage: str, when: str) -> None:
    hurt, file, word = DAMAGE[damage]
    name = f"test-damaged-{secrets.token_hex(6)}"
    src, dst = snapshots.user_dir(snap[0]), snapshots.user_dir(name)
    subprocess.run(["cp", "-r", "--sparse=always", str(src), str(dst)], check=True)
    vm: SmolVM | None = None
    try:
        if when == "before-start":  # past the Python-side check: the VMM's own check must refuse
            vm = SmolVM.from_snapshot(name)
        hurt(dst)
        with pytest.raises(SmolVMError) as ei:
            if vm is None:
                vm = SmolVM.from_snapshot(name)
            vm.start()
        err = ei.value
        msg = str(err)
        if when == "before-from_snapshot":
            assert isinstance(err, SnapshotError), repr(err)
        else:
            assert isinstance(err, (SnapshotError, VMStartError)), repr(err)
        assert file in msg and word in msg.lower() and name in msg, msg
        if vm is not None:
            assert vm.status == "stopped"
            assert not vm.state_dir.exists()
            assert _processes_naming(vm.vm_id) == []
    finally:
        if vm is not None:
            vm.delete()
        snapshots.delete(name)


# ---- registry, from_id and the seed's reusable sandbox --------------------------------------

FROM_ID = r"""
import sys
from smolvm import SmolVM
vm = SmolVM.from_id(sys.argv[1])
r = vm.run("cat /tmp/parent-note; hostname", timeout=120)
vm.close()
print(r.stdout, end="")
sys.exit(r.exit_code)
"""


def test_from_id_in_another_process_uses_parents_vm(smolvm_env: dict[str, str], vm: SmolVM) -> None:
    note = secrets.token_hex(8)
    own = SmolVM()
    own.start()  # persistent: reachable from other processes
    try:
        assert own.run(f"echo {note} > /tmp/parent-note", timeout=T).ok
        out = _python(smolvm_env, FROM_ID, own.vm_id)
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"{note}\n{own.vm_id}\n"
        # the child's close() let go of its handle only
        assert own.status == "running"
        assert own.run("cat /tmp/parent-note", timeout=T).stdout == f"{note}\n"
    finally:
        own.delete()


# The seed's reusable-sandbox example (pydantic-ai docs), as written; RunContext stands in
# for pydantic_ai's (the tool only reads ctx.deps), so no LLM or pydantic-ai is needed.
SEED = r'''
from dataclasses import dataclass
from smolvm import SmolVM


class RunContext:
    def __init__(self, deps):
        self.deps = deps


@dataclass
class SandboxDeps:
    vm_id: str | None = None


def _connect_vm(deps: SandboxDeps) -> SmolVM:
    """Return the active sandbox, creating it on first use."""
    if deps.vm_id is None:
        vm = SmolVM()
        vm.start()
        deps.vm_id = vm.vm_id
        return vm
    return SmolVM.from_id(deps.vm_id)


def _cleanup_vm(vm_id: str | None) -> None:
    """Delete the reusable sandbox if one was created."""
    if vm_id is None:
        return
    vm = SmolVM.from_id(vm_id)
    try:
        vm.delete()
    finally:
        vm.close()


def run_in_reusable_smolvm(
    ctx: RunContext[SandboxDeps], command: str, timeout: int = 30
) -> str:
    vm = _connect_vm(ctx.deps)
    try:
        result = vm.run(command, timeout=timeout)
        return (
            f"exit_code: {result.exit_code}\n"
            f"stdout:\n{result.stdout.strip() or '<empty>'}\n"
            f"stderr:\n{result.stderr.strip() or '<empty>'}"
        )
    finally:
        vm.close()
'''.replace("RunContext[SandboxDeps]", "RunContext")

SEED_TURN = SEED + r"""
import json, sys
deps = SandboxDeps(vm_id=sys.argv[1] or None)
out = run_in_reusable_smolvm(RunContext(deps), sys.argv[2], timeout=120)
print(json.dumps({"vm_id": deps.vm_id, "out": out}))
"""

SEED_CLEANUP = SEED + "\nimport sys\n_cleanup_vm(sys.argv[1])\n"


def test_seed_reusable_sandbox_across_processes(smolvm_env: dict[str, str], vm: SmolVM) -> None:
    vm_id: str | None = None
    try:
        one = _python(smolvm_env, SEED_TURN, "", "echo hello > /tmp/note.txt && echo written")
        assert one.returncode == 0, one.stderr
        turn1 = json.loads(one.stdout)
        vm_id = turn1["vm_id"]
        assert turn1["out"] == "exit_code: 0\nstdout:\nwritten\nstderr:\n<empty>"
        rec = registry.load(vm_id)
        assert _vmm_alive(rec), "the sandbox died with the process of turn 1"

        two = _python(smolvm_env, SEED_TURN, vm_id, "cat /tmp/note.txt")
        assert two.returncode == 0, two.stderr
        turn2 = json.loads(two.stdout)
        assert turn2["vm_id"] == vm_id
        assert turn2["out"] == "exit_code: 0\nstdout:\nhello\nstderr:\n<empty>"

        done = _python(smolvm_env, SEED_CLEANUP, vm_id)
        assert done.returncode == 0, done.stderr
        _assert_no_trace(vm_id, rec)
        vm_id = None
    finally:
        _delete_quietly(vm_id)


def test_unknown_and_gone_ids_raise_not_found(smolvm_env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(VMNotFoundError, match="vm-000000000000.*smolvm ls"):
        SmolVM.from_id("vm-000000000000")
    with pytest.raises(VMNotFoundError, match="not a smolvm VM id"):
        SmolVM.from_id("../../etc")
    # A record whose VMM has ended: from_id says so and cleans it up.
    gone = _gone_record()
    with pytest.raises(VMNotFoundError, match="gone"):
        SmolVM.from_id(gone)
    assert not (registry.vms_root() / gone).exists(), "the gone VM's record was not cleaned up"
    # The CLI: an unknown id is an error with exit status 1.
    out = _cli(smolvm_env, "exec", "vm-000000000000", "--", "true")
    assert out.returncode == 1 and "vm-000000000000" in out.stderr, out
    out = _cli(smolvm_env, "rm", "vm-000000000000")
    assert out.returncode == 1 and "vm-000000000000" in out.stderr, out
    # `ls` and `rm --all` report the gone records they clean up (in a private SMOLVM_HOME:
    # `rm --all` must not touch VMs of other test runs on this machine).
    env = dict(smolvm_env, SMOLVM_HOME=str(tmp_path / "home"))
    for args in (["ls", "--json"], ["rm", "--all"]):
        gone = _gone_record(tmp_path / "home")
        out = _cli(env, *args)
        assert out.returncode == 0, out
        if args[0] == "ls":
            assert json.loads(out.stdout) == {"vms": [], "gone": [gone]}
        else:
            assert gone in out.stderr, out
        assert not (tmp_path / "home" / "vms" / gone).exists()


def _gone_record(home: Path | None = None) -> str:
    """Write the registry record of a VM whose process has ended; return its id."""
    proc = subprocess.Popen(["sleep", "60"])
    start = registry.process_start(proc.pid)
    proc.kill()
    proc.wait()
    rec = registry.VMRecord(
        vm_id=f"vm-{secrets.token_hex(6)}", pid=proc.pid, pid_start=start or 1, memory=512,
        vcpus=1, persistent=True, owner_pid=os.getpid(), created=time.time(),
    )  # fmt: skip
    folder = (home / "vms" if home else registry.vms_root()) / rec.vm_id
    folder.mkdir(parents=True)
    (folder / registry.RECORD).write_text(json.dumps(rec.__dict__))
    return rec.vm_id


# ---- pause, delete, owner death -----------------------------------------------------------

TICKER = (
    "sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/c; echo smolvm-tick-$i > /dev/kmsg; "
    "sleep 1; done' >/dev/null 2>&1 & echo $!"
)


def _last_tick(vm: SmolVM) -> int:
    """The counter's last value as the guest printed it on its console (readable while paused)."""
    ticks = re.findall(r"smolvm-tick-(\d+)", vm.console_log.read_text(errors="replace"))
    return int(ticks[-1]) if ticks else 0


def _wait_tick_past(vm: SmolVM, n: int, timeout: float = T) -> tuple[int, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = _last_tick(vm)
        if last > n:
            return last, time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"the counter did not pass {n} within {timeout} s")


def test_pause_resume_keeps_background_process(vm: SmolVM) -> None:
    with SmolVM() as box:
        pid = box.run(TICKER, timeout=T).stdout.strip()
        assert pid.isdigit()
        n1, t1 = _wait_tick_past(box, 0)
        n2, t2 = _wait_tick_past(box, n1)
        per_tick = (t2 - t1) / (n2 - n1)  # seconds per tick, as slow as this host makes it
        box.pause()
        assert box.status == "paused"
        time.sleep(0.5)  # a console write already under way lands
        frozen = _last_tick(box)
        time.sleep(min(60.0, max(5.0, 3 * per_tick)))
        assert _last_tick(box) == frozen, "the counter advanced while the VM was paused"
        box.resume()
        assert box.status == "running"
        _wait_tick_past(box, frozen)
        for _ in range(5):  # `echo $i > /tmp/c` truncates first: a read can land in between
            r = box.run(f"kill -0 {pid} && cat /tmp/c", timeout=T)
            assert r.exit_code == 0, f"the background process is gone after resume: {r}"
            if r.stdout.strip():
                break
        assert int(r.stdout) > frozen


@pytest.mark.parametrize("kind", ["persistent", "ephemeral"])
def test_delete_leaves_nothing(vm: SmolVM, kind: str) -> None:
    box = SmolVM()
    if kind == "persistent":
        box.start()
    else:
        box.__enter__()
    try:
        rec = registry.load(box.vm_id)
        assert _vmm_alive(rec)
        assert (rec.dir / "vsock.sock").exists() and (rec.dir / "ctl.sock").exists()
        assert _unix_sockets_naming(box.vm_id)
        assert box.run("echo up", timeout=T).stdout == "up\n"
    finally:
        if kind == "persistent":
            box.delete()
        else:
            box.__exit__(None, None, None)
    assert box.status == "stopped"
    _assert_no_trace(box.vm_id, rec)


OWNER = r"""
import sys, time
from smolvm import SmolVM
if sys.argv[1] == "with":
    with SmolVM() as vm:
        print(vm.vm_id, flush=True)
        time.sleep(1000)
else:
    vm = SmolVM()
    assert vm.run("echo up", timeout=120).stdout == "up\n"
    print(vm.vm_id, flush=True)
    time.sleep(1000)
"""


@pytest.mark.parametrize("how", ["with", "run"])
def test_killed_owner_leaves_no_orphan_vmm(smolvm_env: dict[str, str], vm: SmolVM, how: str) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, how], env=smolvm_env, stdout=subprocess.PIPE, text=True
    )
    rec: registry.VMRecord | None = None
    try:
        assert owner.stdout is not None
        vm_id = owner.stdout.readline().strip()
        assert vm_id, "the owner process did not start its VM"
        rec = registry.load(vm_id)
        assert not rec.persistent and rec.owner_pid == owner.pid
        assert _vmm_alive(rec)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    try:
        assert _wait_vmm_gone(rec), f"VMM pid {rec.pid} outlived its SIGKILLed owner"
        with pytest.raises(VMNotFoundError, match="gone"):
            SmolVM.from_id(rec.vm_id)  # the record is cleaned up and reported
        assert not rec.dir.exists()
    finally:
        if _vmm_alive(rec):
            os.kill(rec.pid, signal.SIGKILL)
        registry.remove(rec.vm_id)


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_ls_exec_snapshot_rm(smolvm_env: dict[str, str], vm: SmolVM) -> None:
    env = smolvm_env
    box = SmolVM()
    box.start()
    snap_name = f"test-cli-{secrets.token_hex(6)}"
    try:
        rec = registry.load(box.vm_id)
        out = _cli(env, "ls", "--json")
        assert out.returncode == 0, out
        mine = [v for v in json.loads(out.stdout)["vms"] if v["vm_id"] == box.vm_id]
        assert len(mine) == 1, out.stdout
        assert mine[0]["status"] == "running" and mine[0]["pid"] == rec.pid
        assert (mine[0]["memory"], mine[0]["vcpus"], mine[0]["persistent"]) == (512, 1, True)
        assert mine[0]["age_s"] >= 0

        box.pause()
        try:
            vms = json.loads(_cli(env, "ls", "--json").stdout)["vms"]
            assert [v["status"] for v in vms if v["vm_id"] == box.vm_id] == ["paused"]
        finally:
            box.resume()

        out = _cli(env, "exec", box.vm_id, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
        assert (out.returncode, out.stdout, out.stderr) == (3, "out\n", "err\n"), out
        out = _cli(env, "exec", "--json", "--env", "FOO=b a r", "--cwd", "/tmp", box.vm_id, "--",
                   'echo "$FOO"; pwd')  # fmt: skip
        assert out.returncode == 0, out
        res = json.loads(out.stdout)
        got = (res["exit_code"], res["stdout"], res["stderr"], res["timed_out"])
        assert got == (0, "b a r\n/tmp\n", "", False), res
        out = _cli(env, "exec", box.vm_id, "--timeout", "3", "--", "echo start; sleep 100")
        assert out.returncode == 124 and out.stdout == "start\n" and "timed out" in out.stderr, out

        out = _cli(env, "snapshot", "create", box.vm_id, snap_name)
        assert out.returncode == 0, out
        snaps = json.loads(_cli(env, "snapshot", "ls", "--json").stdout)["snapshots"]
        mine = [s for s in snaps if s["name"] == snap_name]
        assert len(mine) == 1 and mine[0]["memory"] == 512 and mine[0]["problem"] is None, snaps
        assert 0 < mine[0]["bytes"] < 512 << 20  # disk actually used: the memory file is sparse
        out = _cli(env, "doctor", "--json")
        rep = json.loads(out.stdout)
        assert box.vm_id in rep["vms"]["ids"], rep["vms"]
        assert rep["snapshots"]["default_base_cached"] is True  # box was restored from it
        assert snap_name in [s["name"] for s in rep["snapshots"]["user"]]
        assert rep["snapshots"]["base_bytes"] > 0 and rep["snapshots"]["user_bytes"] > 0
        out = _cli(env, "snapshot", "rm", snap_name)
        assert out.returncode == 0, out
        snaps = json.loads(_cli(env, "snapshot", "ls", "--json").stdout)["snapshots"]
        assert snap_name not in [s["name"] for s in snaps]

        out = _cli(env, "rm", box.vm_id)
        assert out.returncode == 0 and box.vm_id in out.stdout, out
        _assert_no_trace(box.vm_id, rec)
        assert box.status == "stopped"
        out = _cli(env, "rm", box.vm_id)
        assert out.returncode == 1, out
    finally:
        box.delete()
        if snapshots.user_dir(snap_name).exists():
            snapshots.delete(snap_name)

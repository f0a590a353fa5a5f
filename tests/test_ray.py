"""smolvm.ray on a real two-node Ray cluster on this machine: pool placement, map, connect, node loss, close."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Ray clusters on this host talk over loopback only (Ray picks the LAN address otherwise).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="smolvm.ray needs Ray: pip install 'smolvm[ray]'")

import smolvm  # noqa: E402
from _helpers import ray_cluster  # noqa: E402
from smolvm import SmolVM  # noqa: E402
from smolvm.errors import SandboxLostError, SmolVMError  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.own_vm, pytest.mark.guest_only]

POOL_VM = {"memory": 256}  # small guests keep the host's memory low
PER_NODE = 6  # each node's `smolvm` resource: a pool of 6 spreads 3 + 3, and 3 more fit after a loss
T = 180  # command timeout: generous, the guests share 2 emulating cores with other work here
SMOLVM_ROOT = Path(smolvm.__file__).resolve().parent.parent  # the folder smolvm is imported from


def _vmm_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "smolvm-vmm"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _wait_gone(pids: set[int], seconds: float = 60.0) -> set[int]:
    """The pids of `pids` still running after waiting up to `seconds` for them to end."""
    deadline = time.monotonic() + seconds
    while pids & _vmm_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    return pids & _vmm_pids()


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[object, object, list[Path]]]:
    """Head and worker node, each with `smolvm` resource and SMOLVM_HOME of its own."""
    # Two Ray nodes plus their guests did not finish the 30-command map on a loaded 2-core
    # compat host (2026-12-01); nested ran this module in 167 s on the same host with five other
    # suites running. So compat runs it only when asked for.
    from smolvm.profile import detect

    profile = detect().name
    if profile == "compat" and os.environ.get("SMOLVM_RAY_TESTS") != "1":
        pytest.skip("compat profile: the two-node Ray cluster is too slow here for the suite's time; "
                    "SMOLVM_RAY_TESTS=1 runs it anyway")
    from smolvm.build.image import ensure_image
    from smolvm.build.initramfs import ensure_initramfs
    from smolvm.build.kernel import ensure_kernel

    ensure_kernel()
    ensure_initramfs(with_busybox=False)
    ensure_image()

    with SmolVM(**POOL_VM) as warm:  # make (or find) the pool VMs' base snapshot once
        assert warm.run("true").ok
    c, (worker,), homes = ray_cluster(2, PER_NODE)
    # Ray puts the driver's working directory first on its workers' sys.path: make that the
    # folder this smolvm is imported from, so a checkout's smolvm/ does not shadow it.
    old_cwd = os.getcwd()
    os.chdir(SMOLVM_ROOT)
    try:
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        yield c, worker, homes
    finally:
        ray.shutdown()
        c.shutdown()
        os.chdir(old_cwd)


@pytest.fixture(scope="module")
def node_ids(cluster: tuple[object, object, list[Path]]) -> tuple[str, str]:
    c, worker, _ = cluster
    return c.head_node.node_id, worker.node_id  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def pool(cluster: tuple[object, object, list[Path]]) -> Iterator[object]:
    import smolvm.ray

    messages: list[str] = []
    p = smolvm.ray.SandboxPool(6, on_progress=messages.append, **POOL_VM)
    p.progress_messages = messages  # type: ignore[attr-defined]
    try:
        yield p
    finally:
        p.close()


def test_pool_lands_on_both_nodes(pool, node_ids) -> None:
    head, worker = node_ids
    per_node = pool.nodes()
    assert set(per_node) == {head, worker}
    assert sorted(len(v) for v in per_node.values()) == [3, 3]
    assert len({s.vm_id for s in pool.sandboxes}) == 6
    # one agent actor per node: every sandbox of a node shares it
    for vm_ids in per_node.values():
        assert len({pool._agent_of[v]._actor_id for v in vm_ids}) == 1
    # start-up progress per node, with its base snapshot found (or built) once
    for nid in (head, worker):
        assert pool.node_stats[nid]["base"] in ("built", "found")
        assert any(nid[:8] in m and "base snapshot" in m for m in pool.progress_messages)
    # each node's VMs live in that node's own SMOLVM_HOME
    assert all(pid > 0 for _nid, pid in pool.pids().values())


def test_map_returns_each_commands_output(pool) -> None:
    for s in pool.sandboxes:  # tag each sandbox through the object store
        assert pool.upload(s.index, s.vm_id.encode(), "/tmp/who") == len(s.vm_id)
    first = pool.sandboxes[0]
    assert pool.download(first.index, "/tmp/who") == first.vm_id.encode()
    cmds = [f"echo {i}:$(( {i} * 7 )):$(cat /tmp/who)" for i in range(30)]
    results = pool.map(cmds, timeout=T)
    assert len(results) == 30
    live = pool.sandboxes
    for i, r in enumerate(results):
        assert r.ok, r
        assert r.output == f"{i}:{i * 7}:{live[i % len(live)].vm_id}"
    assert pool.run("echo one more", timeout=T).output == "one more"


def test_connect_from_second_driver(cluster, node_ids, smolvm_env) -> None:
    import smolvm.ray

    c, _worker, homes = cluster
    _head, worker = node_ids
    sb = smolvm.ray.create(node_id=worker, **POOL_VM)
    try:
        assert sb.node_id == worker
        assert (homes[1] / "vms" / sb.vm_id).is_dir()  # on the worker node, in its own home
        assert sb.run("echo from-first > /tmp/note.txt", timeout=T).ok
        script = (
            "import json, sys, ray, smolvm.ray\n"
            "ray.init(address=sys.argv[1], log_to_driver=False)\n"
            "h = smolvm.ray.connect(sys.argv[2])\n"
            "r = h.run('cat /tmp/note.txt; echo second >> /tmp/note.txt', timeout=180)\n"
            "print(json.dumps({'node': h.node_id, 'out': r.stdout, 'code': r.exit_code}))\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script, c.address, sb.vm_id],
            capture_output=True, text=True, timeout=600, env=smolvm_env, cwd=SMOLVM_ROOT,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got == {"node": worker, "out": "from-first\n", "code": 0}
        assert sb.run("cat /tmp/note.txt", timeout=T).output == "from-first\nsecond"
        with pytest.raises(SmolVMError, match="no live smolvm node"):
            smolvm.ray.connect("vm-000000000000")
    finally:
        sb.delete()
    with pytest.raises(SmolVMError, match=sb.vm_id):
        smolvm.ray.connect(sb.vm_id)


def test_node_loss_then_replace_then_close(cluster, pool, node_ids) -> None:
    c, worker_node, _homes = cluster
    head, worker = node_ids
    pids = pool.pids()
    worker_pids = {pid for nid, pid in pids.values() if nid == worker}
    on_worker = [s for s in pool.sandboxes if s.node_id == worker]
    on_head = [s for s in pool.sandboxes if s.node_id == head]
    c.remove_node(worker_node)
    for s in on_worker:
        with pytest.raises(SandboxLostError, match=worker) as info:
            pool.run("true", timeout=T, sandbox=s.index)
        assert info.value.node_id == worker and info.value.vm_id == s.vm_id
    for s in on_head:
        assert pool.run(f"echo still-{s.index}", timeout=T, sandbox=s.index).output == f"still-{s.index}"
    assert {s.vm_id for s in pool.lost} == {s.vm_id for s in on_worker}
    assert not _wait_gone(worker_pids), "the lost node's VMMs outlived it"

    new = pool.replace_lost()
    assert len(new) == 3 and {s.node_id for s in new} == {head}
    assert len(pool.sandboxes) == 6
    results = pool.map([f"echo r{i}" for i in range(6)], timeout=T)
    assert [r.output for r in results] == [f"r{i}" for i in range(6)]

    every = {pid for _nid, pid in pool.pids().values()}
    assert every <= _vmm_pids()
    pool.close()
    assert not _wait_gone(every), "close() left VMM processes running"
    with pytest.raises(SmolVMError, match="closed"):
        pool.run("true")


def test_ray_node_prints_the_resources_flag(smolvm_env) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "smolvm", "ray-node", "--json", "--per-sandbox-mib", "1024"],
        capture_output=True, text=True, timeout=120, env=smolvm_env,
    )  # fmt: skip
    rep = json.loads(proc.stdout)
    assert rep["ok"] and proc.returncode == 0, rep
    assert rep["resources"] == {"smolvm": rep["sandboxes"]} and rep["sandboxes"] >= 1
    assert rep["sandboxes"] <= rep["memory_mib"] // 1024
    plain = subprocess.run(
        [sys.executable, "-m", "smolvm", "ray-node", "--sandboxes", "3"],
        capture_output=True, text=True, timeout=120, env=smolvm_env,
    )  # fmt: skip
    assert plain.returncode == 0 and plain.stdout.strip() == '--resources={"smolvm":3}'

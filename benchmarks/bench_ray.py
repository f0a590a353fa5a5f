"""Benchmark smolvm.ray: commands/s through a SandboxPool vs the same sandboxes driven in one process; JSON out.

    python3 benchmarks/bench_ray.py [--sandboxes 2] [--commands 12] [--nodes 2] [--out FILE.json]

Runs a local Ray cluster (ray.cluster_utils.Cluster) of --nodes nodes on this host, each
with its own SMOLVM_HOME under $SMOLVM_HOME/ray-nodes/ that shares this home's caches and
base snapshots (so no node boots a guest if this home has the base snapshot already).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Ray clusters on this host talk over loopback only (Ray picks the LAN address otherwise).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray

import smolvm.ray
from smolvm import SmolVM

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]  # _common; the tests' ray_cluster (_helpers)
from _common import arguments, host_facts, ratio, write_result  # noqa: E402
from _helpers import ray_cluster  # noqa: E402

COMMAND = "echo {i}"
TIMEOUT = 300.0  # per command: generous for busy shared hosts; the figures are wall times

METHODOLOGY = (
    "The same N sandboxes (memory=--memory) run the same M commands ('echo i'), command i in "
    "sandbox i mod N, each sandbox's commands one after another and the sandboxes in parallel: "
    "'direct' drives N SmolVMs from threads of one process, 'pool' sends them through "
    "SandboxPool.map (one Ray call per node) and SandboxPool.run (one Ray call per command, "
    "N driver threads). Commands/s = M / wall time. 'started_per_s_per_node' is each node's "
    "sandboxes restored from its base snapshot divided by the time its agent took to start them "
    "(SandboxPool.node_stats; the base snapshot already cached). Start-up is excluded from the "
    "commands/s figures. All nodes share one host here, so the Ray figures include its "
    "processes competing for the same cores as the guests."
)


def direct(n: int, m: int, memory: int) -> dict[str, Any]:
    t0 = time.monotonic()
    vms = [SmolVM(memory=memory) for _ in range(n)]
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(lambda v: v.__enter__(), vms))
    started = time.monotonic() - t0
    try:
        def drain(k: int) -> list[str]:
            return [vms[k].run(COMMAND.format(i=i), timeout=TIMEOUT).output for i in range(k, m, n)]

        t1 = time.monotonic()
        with ThreadPoolExecutor(n) as ex:
            list(ex.map(drain, range(n)))
        wall = time.monotonic() - t1
    finally:
        for v in vms:
            v.delete()
    return {"commands": m, "wall_s": round(wall, 3), "commands_per_s": round(m / wall, 3),
            "start_s": round(started, 3), "started_per_s": round(n / started, 3)}  # fmt: skip


def through_pool(n: int, m: int, memory: int, nodes: int) -> dict[str, Any]:
    c, _workers, _homes = ray_cluster(nodes, -(-n // nodes))
    c.wait_for_nodes()
    # Ray puts the driver's working directory first on its workers' sys.path: use the folder
    # smolvm is imported from, so a checkout's smolvm/ does not shadow the built one.
    os.chdir(Path(smolvm.__file__).resolve().parent.parent)
    ray.init(address=c.address, log_to_driver=False)
    try:
        t0 = time.monotonic()
        pool = smolvm.ray.SandboxPool(n, memory=memory, on_progress=lambda s: print(s, file=sys.stderr))
        start_s = time.monotonic() - t0
        try:
            pool.map(["true"] * len(pool.sandboxes), timeout=TIMEOUT)  # warm the agents' code paths
            t1 = time.monotonic()
            out = pool.map([COMMAND.format(i=i) for i in range(m)], timeout=TIMEOUT)
            map_wall = time.monotonic() - t1
            assert [r.output for r in out] == [str(i) for i in range(m)]

            def drain(k: int) -> None:
                for i in range(k, m, n):
                    pool.run(COMMAND.format(i=i), timeout=TIMEOUT, sandbox=k)

            t2 = time.monotonic()
            with ThreadPoolExecutor(n) as ex:
                list(ex.map(drain, range(n)))
            run_wall = time.monotonic() - t2
            stats = {
                nid[:8]: {
                    "base": st["base"],
                    "restored": st["restored"],
                    "start_s": round(st["start_seconds"], 3),
                    "started_per_s_per_node": round(st["restored"] / st["start_seconds"], 3)
                    if st["start_seconds"] > 0 else None,
                }
                for nid, st in pool.node_stats.items()
            }  # fmt: skip
        finally:
            pool.close()
    finally:
        ray.shutdown()
        c.shutdown()
    return {
        "commands": m,
        "map_wall_s": round(map_wall, 3), "map_commands_per_s": round(m / map_wall, 3),
        "run_wall_s": round(run_wall, 3), "run_commands_per_s": round(m / run_wall, 3),
        "pool_start_s": round(start_s, 3), "nodes": stats,
    }  # fmt: skip


def main() -> int:
    ap = arguments(__doc__, "bench_ray")
    ap.add_argument("--sandboxes", type=int, default=2)
    ap.add_argument("--commands", type=int, default=12)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--memory", type=int, default=256)
    args = ap.parse_args()
    with SmolVM(memory=args.memory) as warm:  # the base snapshot exists before anything is timed
        warm.run("true", timeout=TIMEOUT)
    result = {
        "benchmark": "bench_ray",
        "host": {**host_facts("machine", "profile"), "ray": ray.__version__},
        "sandboxes": args.sandboxes, "nodes": args.nodes, "memory_mib": args.memory,
        "methodology": METHODOLOGY,
        "direct": direct(args.sandboxes, args.commands, args.memory),
        "pool": through_pool(args.sandboxes, args.commands, args.memory, args.nodes),
    }  # fmt: skip
    d, p = result["direct"], result["pool"]
    result["pool_map_vs_direct"] = ratio(p["map_commands_per_s"], d["commands_per_s"])
    result["pool_run_vs_direct"] = ratio(p["run_commands_per_s"], d["commands_per_s"])
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

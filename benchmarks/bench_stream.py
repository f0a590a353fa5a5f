"""Benchmark the ways to run a command: warm run("true") sync vs async vs streaming, and many concurrent async runs; JSON out.

    python3 benchmarks/bench_stream.py [--runs 5] [--concurrent 100] [--vms 10] [--out FILE.json]

On hosts whose KVM emulates guest ring 0 (the compat profile) a guest fork+exec takes
seconds, so absolute times say little about real hardware; the differences between the
three paths (host-side overhead) and the thread count do.
"""

from __future__ import annotations

import asyncio
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

from smolvm import RunResult, SmolVM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import arguments, host_facts, median, timed, write_result  # noqa: E402

METHODOLOGY = (
    "sync/async/stream: median wall time of run('true'), await async_run('true') and a full "
    "stream('true') loop in one started VM, after one warm-up each. concurrent: N async_run "
    "('echo i') spread round-robin over M started VMs, all awaited with asyncio.gather; "
    "wall time, and the peak of threading.active_count() sampled every 10 ms while they ran "
    "(baseline = before)."
)


def _stream_true(vm: SmolVM) -> None:
    for item in vm.stream("true", timeout=600):
        if isinstance(item, RunResult):
            assert item.ok


async def _concurrent(vms: list[SmolVM], n: int) -> dict[str, Any]:
    base = threading.active_count()
    peak = base
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(vms[i % len(vms)].async_run(f"echo {i}", timeout=600)) for i in range(n)]
    while not all(t.done() for t in tasks):
        peak = max(peak, threading.active_count())
        await asyncio.sleep(0.01)
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    assert all(r.stdout == f"{i}\n" for i, r in enumerate(results))
    return {"n": n, "vms": len(vms), "wall_s": round(wall, 3), "threads_before": base, "threads_peak": peak}


def main() -> None:
    ap = arguments(__doc__, "bench_stream")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=100)
    ap.add_argument("--vms", type=int, default=10)
    args = ap.parse_args()

    out: dict[str, Any] = {"host": platform.node(), **host_facts("profile"), "methodology": METHODOLOGY}
    vms = [SmolVM() for _ in range(args.vms)]
    try:
        for vm in vms:
            vm.__enter__()
        vm = vms[0]
        out["sync_true_s"] = median(timed(lambda: vm.run("true", timeout=600), args.runs))
        out["async_true_s"] = median(timed(lambda: asyncio.run(vm.async_run("true", timeout=600)), args.runs))
        out["stream_true_s"] = median(timed(lambda: _stream_true(vm), args.runs))
        out["concurrent"] = asyncio.run(_concurrent(vms, args.concurrent))
    finally:
        for vm in vms:
            vm.delete()
    write_result(args.out, out)


if __name__ == "__main__":
    main()

"""Benchmark the ways to run a command: warm run("true") sync vs async vs streaming, and many concurrent async runs; JSON out.

    python3 benchmarks/bench_stream.py [--runs 5] [--concurrent 100] [--vms 10] [--out FILE.json]

On hosts whose KVM emulates guest ring 0 (the compat profile) a guest fork+exec takes
seconds, so absolute times say little about real hardware; the differences between the
three paths (host-side overhead) and the thread count do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from smolvm import RunResult, SmolVM
from smolvm.profile import detect

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_stream.json"

METHODOLOGY = (
    "sync/async/stream: median wall time of run('true'), await async_run('true') and a full "
    "stream('true') loop in one started VM, after one warm-up each. concurrent: N async_run "
    "('echo i') spread round-robin over M started VMs, all awaited with asyncio.gather; "
    "wall time, and the peak of threading.active_count() sampled every 10 ms while they ran "
    "(baseline = before)."
)


def _median(f: Any, runs: int) -> float:
    f()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=100)
    ap.add_argument("--vms", type=int, default=10)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    out: dict[str, Any] = {"host": platform.node(), "profile": detect().name, "methodology": METHODOLOGY}
    vms = [SmolVM() for _ in range(args.vms)]
    try:
        for vm in vms:
            vm.__enter__()
        vm = vms[0]
        out["sync_true_s"] = round(_median(lambda: vm.run("true", timeout=600), args.runs), 4)
        out["async_true_s"] = round(
            _median(lambda: asyncio.run(vm.async_run("true", timeout=600)), args.runs), 4
        )
        out["stream_true_s"] = round(_median(lambda: _stream_true(vm), args.runs), 4)
        out["concurrent"] = asyncio.run(_concurrent(vms, args.concurrent))
    finally:
        for vm in vms:
            vm.delete()
    text = json.dumps(out, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

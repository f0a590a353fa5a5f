"""Benchmark vm.fork() against snapshot() + from_snapshot() of the same VM; JSON out.

    python3 benchmarks/bench_fork.py [--memory 512] [--write-mib 64] [--out FILE.json]

Two parents, both restored from the base snapshot: one idle, one that wrote --write-mib MiB
(a file in its page cache and on its disk) since its restore. For each, fork(1) and fork(8)
(VMM capture time, the parent's pause, wall time until every child is ready) against
snapshot() + n x from_snapshot().start() of the same VM; host disk and memory each child adds;
and what the dirty log costs a run("true") and a 32 MiB write (SMOLVM_DIRTY_LOG=0 turns it off).
All in one run on one host: compare the ratios, not the absolute times.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from smolvm import SmolVM, forks, snapshots

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import arguments, host_facts, median, pss_kib, ratio, rss_kib, timed, vmm_lines, write_result  # noqa: E402

METHODOLOGY = (
    "fork: vm.fork(n) = PAUSE, FORK (the VMM writes state + the pages written since restore on top "
    "of a hard link to the memory file it was restored from), sparse copy of the disk, RESUME, then n "
    "restores of that capture, each to a ready agent. 'vmm_capture_ms' is the VMM's own time for "
    "FORK, 'pause_ms' the parent's pause (disk copy included), 'wall_s' all of fork(n). snapshot: "
    "vm.snapshot(name) (whole memory) then n x SmolVM.from_snapshot(name).start(); 'vmm_snapshot_ms' "
    "is the VMM's t_snapshot_us line; one snapshot serves both n (snapshot_8 = it + 8 restores). Disk per child: the capture's own bytes / n plus the child's "
    "disk copy. Memory per child: Pss of each child VMM (native, compat), or the nested host VM's "
    "QEMU RSS growth / n (nested: the VMMs run inside it)."
)


def _ready(vm: SmolVM) -> None:
    r = vm.run("true", timeout=600)
    if not r.ok:
        raise RuntimeError(f"run('true') failed in {vm.vm_id}: {r!r}")


def _host_vm_rss() -> int | None:
    from smolvm import hostvm

    cur = hostvm.current()
    return rss_kib(cur.pid) if cur is not None else None


def _memory_per_child(kids: list[SmolVM], nested: bool, rss_before: int | None) -> int | None:
    if nested:
        after = _host_vm_rss()
        return (after - rss_before) // len(kids) if after is not None and rss_before is not None else None
    pss = [pss_kib(k.pid or 0) for k in kids]
    known = [p for p in pss if p is not None]
    return int(sum(known) / len(known)) if known else None


def _disk_per_child(kids: list[SmolVM], shared_bytes: int) -> int:
    own = [k.state_dir.joinpath("disk.img").stat().st_blocks * 512 for k in kids if k.state_dir.joinpath("disk.img").exists()]
    return int(shared_bytes / len(kids) + (sum(own) / len(own) if own else 0))


def bench_fork(parent: SmolVM, n: int, nested: bool) -> dict[str, Any]:
    rss = _host_vm_rss() if nested else None
    t0 = time.monotonic()
    kids = parent.fork(n)
    for k in kids:
        _ready(k)
    wall = time.monotonic() - t0
    cap = parent.last_fork
    assert cap is not None
    out = {
        "n": n, "layered": cap.layered, "pages": cap.pages, "vmm_capture_ms": cap.vmm_us / 1000,
        "pause_ms": round(cap.wall_s * 1000, 1), "wall_s": round(wall, 3),
        "capture_bytes": forks.used_bytes(cap.path), "vmm_parts_ms": {k: v / 1000 for k, v in cap.parts_us.items()},
        "disk_bytes_per_child": _disk_per_child(kids, forks.used_bytes(cap.path)),
        "memory_kib_per_child": _memory_per_child(kids, nested, rss),
        "child_vmm_restore_ms": median([int(vmm_lines(k.console_log).get("t_restore_us", 0)) / 1000 for k in kids]),
    }  # fmt: skip
    if not cap.layered:
        out["why_full"] = cap.why_full
    for k in kids:
        k.delete()
    return out


def bench_snapshot(parent: SmolVM, ns: tuple[int, ...], nested: bool) -> dict[str, Any]:
    """One snapshot(), then max(ns) restores of it; 'snapshot_<n>' is the snapshot plus the first n."""
    name = f"bench-fork-{secrets.token_hex(4)}"
    rss = _host_vm_rss() if nested else None
    t0 = time.monotonic()
    info = parent.snapshot(name)
    t_snap = time.monotonic() - t0
    kids: list[SmolVM] = []
    out: dict[str, Any] = {}
    try:
        for i in range(1, max(ns) + 1):
            k = SmolVM.from_snapshot(name)
            k.start()
            kids.append(k)
            _ready(k)
            if i in ns:
                out[f"snapshot_{i}"] = {
                    "n": i, "snapshot_s": round(t_snap, 3),
                    "vmm_snapshot_ms": int(vmm_lines(parent.console_log).get("t_snapshot_us", 0)) / 1000,
                    "wall_s": round(time.monotonic() - t0, 3), "snapshot_bytes": info.size_bytes,
                    "disk_bytes_per_child": _disk_per_child(kids, info.size_bytes),
                    "memory_kib_per_child": _memory_per_child(kids, nested, rss),
                }  # fmt: skip
    finally:
        for k in kids:
            k.delete()
        snapshots.delete(name)
    return out


def dirty_log_cost(memory: int) -> dict[str, Any]:
    """run('true') and a 32 MiB page-cache write with and without the dirty log (fresh VMs)."""
    out: dict[str, Any] = {}
    write = "head -c 33554432 /dev/zero > /tmp/dirty-cost && rm /tmp/dirty-cost"
    for label, env in (("on", None), ("off", "0")):
        if env is None:
            os.environ.pop("SMOLVM_DIRTY_LOG", None)
        else:
            os.environ["SMOLVM_DIRTY_LOG"] = env
        try:
            with SmolVM(memory=memory) as vm:
                out[f"true_s_median_{label}"] = median(timed(lambda: _ready(vm), 15))
                out[f"write_32mib_s_median_{label}"] = median(timed(lambda: vm.run(write, timeout=600), 3))
        finally:
            os.environ.pop("SMOLVM_DIRTY_LOG", None)
    out["ratio_true_on_over_off"] = ratio(out["true_s_median_on"], out["true_s_median_off"])
    out["ratio_write_on_over_off"] = ratio(out["write_32mib_s_median_on"], out["write_32mib_s_median_off"])
    return out


def main() -> int:
    ap = arguments(__doc__, "bench_fork")
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--write-mib", type=int, default=64)
    args = ap.parse_args()
    from smolvm.profile import detect

    profile = detect()
    nested = profile.nested
    report: dict[str, Any] = {
        "benchmark": "fork", **host_facts("node", "kernel", "cpus", "profile", "profile_reason", profile=profile),
        "memory_mib": args.memory, "methodology": METHODOLOGY, "scenarios": {},
    }  # fmt: skip
    for scenario, setup in (
        ("idle", "true"),
        # not /dev/urandom: generating 64 MiB of it takes minutes in a TCG guest (nested)
        (f"wrote_{args.write_mib}mib", f"yes smolvm-fork-bench | head -c {args.write_mib << 20} > /root/blob && sync"),
    ):
        with SmolVM(memory=args.memory) as parent:
            r = parent.run(setup, timeout=1200)
            assert r.ok, r
            res: dict[str, Any] = {}
            for n in (1, 8):
                res[f"fork_{n}"] = bench_fork(parent, n, nested)
                print(f"{scenario} fork_{n}: {res[f'fork_{n}']}", file=sys.stderr, flush=True)
            res.update(bench_snapshot(parent, (1, 8), nested))
            for n in (1, 8):
                res[f"ratio_wall_snapshot_over_fork_{n}"] = ratio(res[f"snapshot_{n}"]["wall_s"], res[f"fork_{n}"]["wall_s"])
            res["ratio_vmm_snapshot_over_fork_capture"] = ratio(
                res["snapshot_1"]["vmm_snapshot_ms"], res["fork_1"]["vmm_capture_ms"]
            )
            report["scenarios"][scenario] = res
            write_result(args.out, report)  # partial results survive a later failure
    report["dirty_log_cost"] = dirty_log_cost(args.memory)
    forks.collect()
    write_result(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

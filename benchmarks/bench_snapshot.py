"""Benchmark snapshot restore against cold boot, and host memory per sandbox; JSON out.

    python3 benchmarks/bench_snapshot.py [--sandboxes 10] [--booted 2] [--out FILE.json]

All figures are ratios or VMM-side times measured in one run on one host: on hosts whose
KVM emulates guest ring 0 absolute times say little about real hardware.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from smolvm import SmolVM
from smolvm.profile import detect

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_snapshot.json"
VMM_LINE = re.compile(r"^smolvm-vmm: ([A-Za-z0-9_]+)=(\d+)\s*$")

METHODOLOGY = (
    "cold_boot: SmolVM(cold_boot=True).start() = spawn, kernel boot, agent ready, setup frame. "
    "restore: SmolVM().start() restoring the configuration's base snapshot (made first if missing) = "
    "spawn, restore, setup frame. 'to_first_run' adds run('true'). 'vmm_restore_us' is the VMM's own "
    "t_restore_us line: from process start to vCPUs running again (excludes guest time). Memory: "
    "Pss from /proc/PID/smaps_rollup of each idle VMM after one run('true'); restored sandboxes share "
    "the snapshot's memory file copy-on-write, booted ones own every page they touched. Booted "
    "sandboxes are fewer than restored ones when a boot takes minutes (PSS of a booted VM does not "
    "depend on how many run)."
)


def pss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def vmm_timings(console: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in console.read_text(errors="replace").splitlines():
            m = VMM_LINE.match(line)
            if m:
                out[m.group(1)] = int(m.group(2))
    except OSError:
        pass
    return out


def start(vm: SmolVM) -> tuple[float, float, dict[str, int]]:
    t0 = time.monotonic()
    vm.start()
    t_ready = time.monotonic() - t0
    r = vm.run("true")
    if not r.ok:
        raise RuntimeError(f"run('true') failed: {r!r}")
    return t_ready, time.monotonic() - t0, vmm_timings(vm.console_log)


def median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sandboxes", type=int, default=10, help="restored sandboxes (default 10)")
    ap.add_argument("--booted", type=int, default=2, help="cold-booted sandboxes (default 2)")
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    report: dict[str, Any] = {
        "benchmark": "smolvm snapshot restore vs cold boot",
        "host": {"machine": platform.machine(), "kernel": platform.release(),
                 "profile": detect().name},
        "methodology": METHODOLOGY,
    }  # fmt: skip
    vms: list[SmolVM] = []
    try:
        # Make sure the base snapshot exists, so every restore below is a restore.
        warm = SmolVM(memory=args.memory)
        warm.start()
        vms.append(warm)

        booted: list[dict[str, Any]] = []
        for _ in range(args.booted):
            vm = SmolVM(memory=args.memory, cold_boot=True)
            vms.append(vm)
            ready, first, t = start(vm)
            booted.append({"to_ready_s": ready, "to_first_run_s": first,
                           "pss_kib": pss_kib(vm.pid or 0), "vmm": t})  # fmt: skip
        restored: list[dict[str, Any]] = []
        for _ in range(args.sandboxes):
            vm = SmolVM(memory=args.memory)
            vms.append(vm)
            ready, first, t = start(vm)
            restored.append({"to_ready_s": ready, "to_first_run_s": first,
                             "pss_kib": pss_kib(vm.pid or 0), "vmm": t})  # fmt: skip

        def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
            pss = [r["pss_kib"] for r in rows if r["pss_kib"] is not None]
            return {
                "n": len(rows),
                "to_ready_s_median": median([r["to_ready_s"] for r in rows]),
                "to_first_run_s_median": median([r["to_first_run_s"] for r in rows]),
                "pss_kib_median": median([float(p) for p in pss]),
                "pss_kib_total": sum(pss),
                "vmm_restore_us_median": median(
                    [float(r["vmm"]["t_restore_us"]) for r in rows if "t_restore_us" in r["vmm"]]
                ),
            }

        b, r = summary(booted), summary(restored)
        report["cold_boot"] = b
        report["restore"] = r
        if b["to_ready_s_median"] and r["to_ready_s_median"]:
            report["ratio_boot_over_restore_to_ready"] = round(
                b["to_ready_s_median"] / r["to_ready_s_median"], 1)
        if b["to_first_run_s_median"] and r["to_first_run_s_median"]:
            report["ratio_boot_over_restore_to_first_run"] = round(
                b["to_first_run_s_median"] / r["to_first_run_s_median"], 1)
        if b["pss_kib_median"] and r["pss_kib_median"]:
            report["ratio_pss_booted_over_restored"] = round(
                b["pss_kib_median"] / r["pss_kib_median"], 1)
        report["qemu"] = (
            "not measured: restoring this guest in QEMU needs a migration stream made by QEMU itself "
            "(-incoming after a QMP migrate); not wired up yet"
        )
    finally:
        for vm in vms:
            vm.delete()
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark snapshot restore against cold boot, and host memory per sandbox; JSON out.

    python3 benchmarks/bench_snapshot.py [--sandboxes 10] [--booted 2] [--out FILE.json]

All figures are ratios or VMM-side times measured in one run on one host: on hosts whose
KVM emulates guest ring 0 absolute times say little about real hardware.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from smolvm import SmolVM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import arguments, host_facts, median, pss_kib, ratio, vmm_lines, write_result  # noqa: E402

# The report's cold-boot / restore ratios: (report key, summary field); left out where either is 0.
RATIOS = (
    ("ratio_boot_over_restore_to_ready", "to_ready_s_median"),
    ("ratio_boot_over_restore_to_first_run", "to_first_run_s_median"),
    ("ratio_pss_booted_over_restored", "pss_kib_median"),
)
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


def vmm_timings(console: Path) -> dict[str, int]:
    return {k: int(v) for k, v in vmm_lines(console).items() if v.isdigit()}


def start(vm: SmolVM) -> tuple[float, float, dict[str, int]]:
    t0 = time.monotonic()
    vm.start()
    t_ready = time.monotonic() - t0
    r = vm.run("true")
    if not r.ok:
        raise RuntimeError(f"run('true') failed: {r!r}")
    return t_ready, time.monotonic() - t0, vmm_timings(vm.console_log)


def main() -> int:
    ap = arguments(__doc__, "bench_snapshot")
    ap.add_argument("--sandboxes", type=int, default=10, help="restored sandboxes (default 10)")
    ap.add_argument("--booted", type=int, default=2, help="cold-booted sandboxes (default 2)")
    ap.add_argument("--memory", type=int, default=512)
    args = ap.parse_args()

    report: dict[str, Any] = {
        "benchmark": "smolvm snapshot restore vs cold boot",
        "host": host_facts("machine", "kernel", "profile"),
        "methodology": METHODOLOGY,
    }  # fmt: skip
    vms: list[SmolVM] = []
    try:
        # Make sure the base snapshot exists, so every restore below is a restore.
        warm = SmolVM(memory=args.memory)
        warm.start()
        vms.append(warm)

        def measure(vm: SmolVM) -> dict[str, Any]:
            vms.append(vm)  # deleted below even if its start fails
            ready, first, t = start(vm)
            return {"to_ready_s": ready, "to_first_run_s": first, "pss_kib": pss_kib(vm.pid or 0), "vmm": t}

        booted = [measure(SmolVM(memory=args.memory, cold_boot=True)) for _ in range(args.booted)]
        restored = [measure(SmolVM(memory=args.memory)) for _ in range(args.sandboxes)]

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
        for name, key in RATIOS:
            if (x := ratio(b[key], r[key], 1)) is not None:
                report[name] = x
        report["qemu"] = (
            "not measured: restoring this guest in QEMU needs a migration stream made by QEMU itself "
            "(-incoming after a QMP migrate); not wired up yet"
        )
    finally:
        for vm in vms:
            vm.delete()
    write_result(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The cost of the VMM's seccomp filters and of its jail: restore-to-ready and first run, with and without; JSON out.

    python3 benchmarks/bench_sysfilter.py [--runs 10] [--out FILE.json]

Every arm restores the same base snapshot with the same smolvm-vmm binary; the "off" arm runs
it through a two-line wrapper adding --no-seccomp, the "nojail" arm one adding --no-jail (the
debugging switches). Arms alternate, so host noise falls on all alike.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from smolvm import SmolVM
from smolvm._native import vmm_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import arguments, host_facts, median, ratio, vmm_lines, write_result  # noqa: E402

METHODOLOGY = (
    "'restore_to_ready_s': wall time of SmolVM().start() (spawn the VMM, restore the base snapshot, "
    "guest agent READY; the filters load in between: each vCPU thread before its first KVM_RUN, the "
    "loop thread before its event loop), then 'first_run_s': the first vm.run('true') (the first "
    "device traffic under the filters); 'vmm_t_restore_us' is the VMM's own restore line. Medians of "
    "N runs per arm, arms alternating; 'off' is the same binary with --no-seccomp, 'nojail' with --no-jail "
    "(the jail: namespaces and fds before set-up, capabilities, dumpability and rlimits after it)."
)


def one(vmm: str) -> dict[str, float]:
    os.environ["SMOLVM_VMM"] = vmm
    t0 = time.perf_counter()
    vm = SmolVM().start()
    t1 = time.perf_counter()
    vm.run("true")
    t2 = time.perf_counter()
    lines = vmm_lines(vm.console_log)
    vm.delete()
    return {"restore_to_ready_s": t1 - t0, "first_run_s": t2 - t1,
            "vmm_t_restore_us": float(lines.get("t_restore_us", "nan"))}  # fmt: skip


def main() -> None:
    ap = arguments(__doc__ or "", "sysfilter")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    real = str(vmm_path())
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:  # the nested host VM sees the host's /
        wrappers: dict[str, Path] = {}
        for arm, flag in (("off", "--no-seccomp"), ("nojail", "--no-jail")):
            wrappers[arm] = Path(tmp) / f"smolvm-vmm{flag}"
            wrappers[arm].write_text(f'#!/bin/sh\nexec {real} {flag} "$@"\n')
            wrappers[arm].chmod(0o755)
        one(real)  # warm-up: the base snapshot exists, the page cache holds it
        arms: dict[str, list[dict[str, float]]] = {"on": [], "off": [], "nojail": []}
        for _ in range(args.runs):
            arms["on"].append(one(real))
            arms["off"].append(one(str(wrappers["off"])))
            arms["nojail"].append(one(str(wrappers["nojail"])))
    result: dict[str, Any] = {"benchmark": "sysfilter", **host_facts("node", "kernel", "cpus", "profile")}
    for arm, rows in arms.items():
        result[arm] = {k: median([r[k] for r in rows]) for k in rows[0]}
    keys = ("restore_to_ready_s", "first_run_s")
    result["ratio_on_over_off"] = {k: ratio(result["on"][k], result["off"][k]) for k in keys}
    result["cost_ms"] = {k: round((result["on"][k] - result["off"][k]) * 1000, 2) for k in keys}
    result["ratio_on_over_nojail"] = {k: ratio(result["on"][k], result["nojail"][k]) for k in keys}
    result["jail_cost_ms"] = {k: round((result["on"][k] - result["nojail"][k]) * 1000, 2) for k in keys}
    result["runs"] = args.runs
    result["methodology"] = METHODOLOGY
    write_result(args.out, result)


if __name__ == "__main__":
    main()

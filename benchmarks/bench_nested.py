"""Nested profile vs compat profile on this host, in one run; JSON out.

    python3 benchmarks/bench_nested.py [--runs 3] [--out FILE.json] [--skip-chromium]

Each profile runs in its own subprocess (SMOLVM_PROFILE=compat, then nested) on the same
kernel, image and caches: cold boot to a ready agent (SmolVM(cold_boot=True)), restore from the
base snapshot to ready, warm `true`, `python3 -c pass`, `pip install` of a local wheel (no
network), `chromium --version` in the browser image, and a CPU-bound user-space loop. For
nested also: host VM start time (stopped first), QEMU's RSS idle and with one sandbox (what a
sandbox costs the host: the growth, plus the relay's own RSS). Medians of --runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_nested.json"

CHILD = r"""
import json, os, statistics, sys, time, tempfile, zipfile
from pathlib import Path
from smolvm import SmolVM
from smolvm.profile import detect
runs = int(sys.argv[1]); chromium = sys.argv[2] == "1"; pip = sys.argv[3] == "1"
out = {"profile": detect().name}

def rss_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None

if out["profile"] == "nested":
    from smolvm import hostvm
    hostvm.stop()
    t = time.monotonic(); vm_host = hostvm.ensure(); out["host_vm_start_s"] = time.monotonic() - t
    out["host_vm_qemu_rss_kib_idle"] = rss_kib(vm_host.pid)

t = time.monotonic()
with SmolVM(cold_boot=True) as vm:
    vm.run("true")
out["cold_boot_to_ready_s"] = time.monotonic() - t

def med(xs):
    return statistics.median(xs)

restores, trues, pys, loops = [], [], [], []
for _ in range(runs):
    t = time.monotonic(); vm = SmolVM(); vm.start(); restores.append(time.monotonic() - t)
    for _ in range(3):
        t = time.monotonic(); vm.run("true"); trues.append(time.monotonic() - t)
    for _ in range(2):
        t = time.monotonic(); assert vm.run("python3 -c pass").ok; pys.append(time.monotonic() - t)
    r = vm.run("python3 -c 'import time; t=time.perf_counter(); n=0\nfor i in range(3000000): n+=i\nprint(time.perf_counter()-t)'")
    loops.append(float(r.stdout))
    if out["profile"] == "nested":
        out["host_vm_qemu_rss_kib_one_sandbox"] = rss_kib(hostvm.current().pid)
        out["relay_rss_kib"] = rss_kib(vm.pid)
    vm.delete()
out["restore_to_ready_s"] = med(restores)
out["warm_true_s"] = med(trues)
out["python_pass_s"] = med(pys)
out["cpu_loop_3M_adds_guest_s"] = med(loops)

# pip install of a local wheel (built on the host, uploaded; no network needed)
if pip:
    with tempfile.TemporaryDirectory() as d:
        whl = Path(d) / "smolbench-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr("smolbench/__init__.py", "VALUE = 42\n")
            z.writestr("smolbench-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: smolbench\nVersion: 1.0\n")
            z.writestr("smolbench-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr("smolbench-1.0.dist-info/RECORD", "")
        with SmolVM() as vm:
            vm.upload_file(str(whl), "/root/" + whl.name)
            t = time.monotonic()
            r = vm.run(f"python3 -m venv /root/v && /root/v/bin/pip install --no-index -q /root/{whl.name} && /root/v/bin/python -c 'import smolbench; print(smolbench.VALUE)'", timeout=1800)
            out["venv_pip_install_local_wheel_s"] = time.monotonic() - t
            out["pip_ok"] = r.ok and r.stdout.strip() == "42"

if chromium:
    with SmolVM(image="browser", memory=1024, disk_size=2048) as vm:
        t = time.monotonic()
        r = vm.run("chromium --version", timeout=1800)
        out["chromium_version_s"] = time.monotonic() - t
        out["chromium_ok"] = r.ok
print("RESULT " + json.dumps(out))
"""


def run_profile(profile: str, runs: int, chromium: bool, pip: bool) -> dict[str, Any]:
    env = dict(os.environ, SMOLVM_PROFILE=profile)
    t = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(runs), "1" if chromium else "0", "1" if pip else "0"], env=env,
        capture_output=True, text=True, timeout=4 * 3600,
    )  # fmt: skip
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            out = dict(json.loads(line[7:]))
            out["wall_s"] = time.monotonic() - t
            return out
    return {"profile": profile, "error": f"exit {res.returncode}: {res.stderr[-2000:]}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--skip-chromium", action="store_true")
    ap.add_argument("--skip-pip", action="store_true", help="no venv + pip install (minutes under compat)")
    ap.add_argument("--profiles", default="compat,nested")
    args = ap.parse_args()
    results = {p: run_profile(p, args.runs, not args.skip_chromium, not args.skip_pip) for p in args.profiles.split(",")}
    ratios: dict[str, float] = {}
    c, n = results.get("compat", {}), results.get("nested", {})
    for key, value in n.items():
        if key.endswith("_s") and isinstance(value, (int, float)) and isinstance(c.get(key), (int, float)) and value:
            ratios[key] = round(c[key] / value, 2)
    doc = {
        "benchmark": "bench_nested",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "kernel": platform.release()},
        "methodology": __doc__.strip().splitlines()[2:],
        "results": results,
        "compat_over_nested": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

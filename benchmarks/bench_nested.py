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

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import arguments, host_facts, rss_kib, timed, write_result  # noqa: E402

# The child process (one per profile): puts this folder on sys.path and runs child_main().
CHILD = "import sys; sys.path.insert(0, sys.argv[1]); from bench_nested import child_main; child_main(sys.argv[2:])"
LOOP = "python3 -c 'import time; t=time.perf_counter(); n=0\nfor i in range(3000000): n+=i\nprint(time.perf_counter()-t)'"


def _wheel(d: Path) -> Path:
    """A tiny pure-Python wheel (smolbench 1.0, VALUE = 42) in d."""
    whl = d / "smolbench-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("smolbench/__init__.py", "VALUE = 42\n")
        z.writestr("smolbench-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: smolbench\nVersion: 1.0\n")
        z.writestr("smolbench-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("smolbench-1.0.dist-info/RECORD", "")
    return whl


def child(runs: int, chromium: bool, pip: bool) -> dict[str, Any]:
    """The figures of the active profile (SMOLVM_PROFILE), measured in this process."""
    from smolvm import SmolVM, hostvm
    from smolvm.profile import detect

    out: dict[str, Any] = {"profile": detect().name}
    if out["profile"] == "nested":
        hostvm.stop()
        t = time.monotonic()
        vm_host = hostvm.ensure()
        out["host_vm_start_s"] = time.monotonic() - t
        out["host_vm_qemu_rss_kib_idle"] = rss_kib(vm_host.pid)

    t = time.monotonic()
    with SmolVM(cold_boot=True) as vm:
        vm.run("true")
    out["cold_boot_to_ready_s"] = time.monotonic() - t

    restores: list[float] = []
    trues: list[float] = []
    pys: list[float] = []
    loops: list[float] = []
    for _ in range(runs):
        t = time.monotonic()
        vm = SmolVM()
        vm.start()
        restores.append(time.monotonic() - t)

        def python_pass() -> None:
            assert vm.run("python3 -c pass").ok

        trues += timed(lambda: vm.run("true"), 3, warmup=False)
        pys += timed(python_pass, 2, warmup=False)
        loops.append(float(vm.run(LOOP, timeout=600).stdout))
        if out["profile"] == "nested":
            host_now = hostvm.current()
            assert host_now is not None, "the host VM is gone"
            out["host_vm_qemu_rss_kib_one_sandbox"] = rss_kib(host_now.pid)
            out["relay_rss_kib"] = rss_kib(vm.pid or 0)
        vm.delete()
    out["restore_to_ready_s"] = statistics.median(restores)
    out["warm_true_s"] = statistics.median(trues)
    out["python_pass_s"] = statistics.median(pys)
    out["cpu_loop_3M_adds_guest_s"] = statistics.median(loops)

    if pip:  # pip install of a local wheel (built on the host, uploaded; no network needed)
        with tempfile.TemporaryDirectory() as d:
            whl = _wheel(Path(d))
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
    return out


def child_main(argv: list[str]) -> None:
    """The child's entry: argv is runs, chromium (1/0), pip (1/0); prints one RESULT line."""
    runs, chromium, pip = int(argv[0]), argv[1] == "1", argv[2] == "1"
    print("RESULT " + json.dumps(child(runs, chromium, pip)))


def run_profile(profile: str, runs: int, chromium: bool, pip: bool) -> dict[str, Any]:
    env = dict(os.environ, SMOLVM_PROFILE=profile)
    t = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(HERE), str(runs), "1" if chromium else "0", "1" if pip else "0"], env=env,
        capture_output=True, text=True, timeout=4 * 3600,
    )  # fmt: skip
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            out = dict(json.loads(line[7:]))
            out["wall_s"] = time.monotonic() - t
            return out
    return {"profile": profile, "error": f"exit {res.returncode}: {res.stderr[-2000:]}"}


def main() -> int:
    ap = arguments(__doc__, "bench_nested")
    ap.add_argument("--runs", type=int, default=3)
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
        "host": host_facts("machine", "cpus", "kernel"),
        "methodology": __doc__.strip().splitlines()[2:],
        "results": results,
        "compat_over_nested": ratios,
    }
    write_result(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

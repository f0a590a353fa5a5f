"""Benchmark smolvm (VMM start, boot, warm run round trip, VMM memory) against QEMU microvm on the same guest; JSON out.

    python3 benchmarks/bench_vm.py [--runs 10] [--out FILE.json] [--no-qemu]

Both VMMs boot the same vmlinux + initramfs with the same kernel command line; the
common yardstick is the time from starting the VMM process until the kernel's
"Run /init as init process" line appears in the console file (polled every 10 ms).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from smolvm import SmolVM
from smolvm.build.initramfs import ensure_initramfs
from smolvm.build.kernel import ensure_kernel
from smolvm.profile import detect, host_info, kernel_cmdline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import arguments, host_facts, median, pss_kib, ratio, rss_kib, vmm_lines, write_result  # noqa: E402

INIT_MARKER = "Run /init as init process"
AGENT_MARKER = "smolvm-agent:"
POLL_S = 0.01
PRINTK_TIME = re.compile(r"^\[\s*(\d+\.\d+)\]")

METHODOLOGY = (
    "Same vmlinux, initramfs and kernel command line (base args + active profile) for both VMMs, "
    "booted one after the other on an otherwise idle host. 'spawn_to_init_marker_s': host wall time "
    "from starting the VMM process to the kernel line 'Run /init as init process' appearing in the "
    "serial console file (polled every 10 ms); 'guest_time_at_init_marker_s' is the printk timestamp on "
    "that line (guest clock). smolvm only: 'spawn_to_ready_s' is start of the VMM to the VMM's READY "
    "(guest agent listening on vsock), 'vmm_start_to_first_kvm_run_us' is the VMM's own "
    "t_first_run_us console line, 'warm_run_true_s' is the round trip of vm.run('true') on the booted "
    "VM (median of N). QEMU has no vsock-over-Unix-socket here, so its agent cannot become ready; "
    "'spawn_to_agent_output_s' is the first 'smolvm-agent:' console line if the agent prints one "
    "(it logs its failure to listen without a vsock device). Memory: VmRSS from /proc/PID/status and "
    "Pss from /proc/PID/smaps_rollup of the VMM process, smolvm after the warm runs, QEMU at the "
    "init marker plus the agent wait."
)


def mem_kib(pid: int) -> dict[str, int | None]:
    return {"rss_kib": rss_kib(pid), "pss_kib": pss_kib(pid)}


class ConsoleWatch:
    """Polls a console file and records when each marker first appears (monotonic seconds)."""

    def __init__(self, path: Path, markers: list[str]) -> None:
        self.path = path
        self.markers = markers
        self.seen: dict[str, float] = {}
        self.lines: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pos, buf = 0, b""
        while not self._stop.is_set() and len(self.seen) < len(self.markers):
            try:
                with open(self.path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except OSError:
                chunk = b""
            now = time.monotonic()
            if chunk:
                pos += len(chunk)
                buf += chunk
                *complete, buf = buf.split(b"\n")
                for raw in complete:
                    line = raw.decode("utf-8", "replace").strip("\r")
                    for m in self.markers:
                        if m not in self.seen and m in line:
                            self.seen[m] = now
                            self.lines[m] = line
            time.sleep(POLL_S)

    def wait(self, marker: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while marker not in self.seen and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return self.seen.get(marker)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def printk_time(line: str | None) -> float | None:
    if not line:
        return None
    m = PRINTK_TIME.match(line.strip())
    return float(m.group(1)) if m else None


def bench_smolvm(kernel: Path, initrd: Path, runs: int, boot_timeout: float) -> dict[str, Any]:
    vm = SmolVM(kernel=kernel, initrd=initrd, boot_timeout=boot_timeout, cold_boot=True)
    watch = ConsoleWatch(vm.console_log, [INIT_MARKER])
    t0 = time.monotonic()
    try:
        vm.start()
        t_ready = time.monotonic()
        watch.stop()
        timings = vmm_lines(vm.console_log)
        samples = []
        for _ in range(runs):
            r = vm.run("true")
            if not r.ok:
                raise RuntimeError(f"run('true') failed: {r!r}")
            samples.append(r.duration)
        assert vm.pid is not None
        mem = mem_kib(vm.pid)
    finally:
        watch.stop()
        vm.delete()
    t_init = watch.seen.get(INIT_MARKER)
    first_run = timings.get("t_first_run_us")
    return {
        "vmm_start_to_first_kvm_run_us": int(first_run) if first_run and first_run.isdigit() else None,
        "vmm_timings": timings,
        "spawn_to_init_marker_s": round(t_init - t0, 4) if t_init else None,
        "guest_time_at_init_marker_s": printk_time(watch.lines.get(INIT_MARKER)),
        "spawn_to_ready_s": round(t_ready - t0, 4),
        "init_marker_to_ready_s": round(t_ready - t_init, 4) if t_init else None,
        "warm_run_true_s": {
            "n": len(samples),
            "median": median(samples, 6),
            "min": round(min(samples), 6) if samples else None,
            "max": round(max(samples), 6) if samples else None,
        },
        "vmm_rss_kib": mem["rss_kib"],
        "vmm_pss_kib": mem["pss_kib"],
    }


def bench_qemu(kernel: Path, initrd: Path, cmdline: str, memory: int, boot_timeout: float, agent_wait: float) -> dict[str, Any]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return {"available": False, "reason": "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"}
    tmp = Path(tempfile.mkdtemp(prefix="smolvm-bench-qemu-"))
    serial = tmp / "console.log"
    serial.touch()
    argv = [
        qemu, "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-M", "microvm,x-option-roms=off,rtc=off", "-m", str(memory),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", f"file:{serial}",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
    ]  # fmt: skip
    watch = ConsoleWatch(serial, [INIT_MARKER, AGENT_MARKER])
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    result: dict[str, Any] = {"available": True, "command": argv}
    try:
        deadline = t0 + boot_timeout
        while INIT_MARKER not in watch.seen and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
        t_init = watch.seen.get(INIT_MARKER)
        if t_init is None:
            why = (
                f"QEMU exited with status {proc.returncode}" if proc.poll() is not None
                else f"no '{INIT_MARKER}' within {boot_timeout:.0f} s"
            )  # fmt: skip
            result.update(available=False, reason=f"QEMU could not boot the guest here: {why}")
        else:
            result["spawn_to_init_marker_s"] = round(t_init - t0, 4)
            result["guest_time_at_init_marker_s"] = printk_time(watch.lines.get(INIT_MARKER))
            t_agent = watch.wait(AGENT_MARKER, agent_wait)
            result["spawn_to_agent_output_s"] = round(t_agent - t0, 4) if t_agent else None
            result["agent_output"] = watch.lines.get(AGENT_MARKER)
            result.update({f"vmm_{k}": v for k, v in mem_kib(proc.pid).items()})
    finally:
        watch.stop()
        proc.kill()
        out = proc.communicate()[0].decode("utf-8", "replace")
    if not result.get("available", False) or out.strip():
        result["qemu_output_tail"] = out[-2000:]
    if not result["available"]:
        result["console_tail"] = serial.read_text(errors="replace")[-2000:]
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> int:
    ap = arguments(__doc__, "bench_vm")
    ap.add_argument("--runs", type=int, default=10, help="warm run('true') samples (default 10)")
    ap.add_argument("--memory", type=int, default=512, help="guest RAM in MiB for both VMMs (default 512)")
    ap.add_argument("--boot-timeout", type=float, default=900.0, help="seconds per boot (default 900)")
    ap.add_argument("--agent-wait", type=float, default=60.0, help="seconds to wait for QEMU's agent output")
    ap.add_argument("--no-qemu", action="store_true", help="skip the QEMU baseline")
    args = ap.parse_args()

    kernel = ensure_kernel() / "vmlinux"
    initrd = ensure_initramfs()
    profile = detect()
    cmdline = kernel_cmdline(profile)
    host = host_info()
    report: dict[str, Any] = {
        "benchmark": "smolvm bench_vm",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "kind": host.kind,
            **host_facts("profile", "profile_reason", "kernel", "cpus", "python", profile=profile),
        },
        "guest": {"kernel": str(kernel), "initrd": str(initrd), "cmdline": cmdline, "memory_mib": args.memory},
        "methodology": METHODOLOGY,
    }
    print("bench: booting smolvm ...", file=sys.stderr, flush=True)
    try:
        report["smolvm"] = bench_smolvm(kernel, initrd, args.runs, args.boot_timeout)
    except Exception as e:  # still report the baseline and say what failed
        report["smolvm"] = {"error": f"{type(e).__name__}: {e}"}
    if args.no_qemu:
        report["qemu"] = {"available": False, "reason": "skipped (--no-qemu)"}
    else:
        print("bench: booting QEMU microvm ...", file=sys.stderr, flush=True)
        report["qemu"] = bench_qemu(kernel, initrd, cmdline, args.memory, args.boot_timeout, args.agent_wait)
    s, q = report["smolvm"], report["qemu"]
    report["ratios"] = {
        "note": "qemu / smolvm: above 1 means smolvm is faster or smaller",
        "spawn_to_init_marker": ratio(q.get("spawn_to_init_marker_s"), s.get("spawn_to_init_marker_s")),
        "guest_time_at_init_marker": ratio(q.get("guest_time_at_init_marker_s"), s.get("guest_time_at_init_marker_s")),
        "vmm_rss": ratio(q.get("vmm_rss_kib"), s.get("vmm_rss_kib")),
        "vmm_pss": ratio(q.get("vmm_pss_kib"), s.get("vmm_pss_kib")),
    }
    write_result(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

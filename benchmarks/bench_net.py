"""Benchmark guest networking against QEMU on the same guest, passt and kernel; JSON with ratios from one run.

    python3 benchmarks/bench_net.py [--mib 8] [--runs 10] [--no-qemu] [--out FILE.json]

Traffic goes only to an HTTP server on the host's 127.0.0.1 (the guest's gateway, 10.0.2.2).
Three guests run the same shell script on the same kernel and busybox initramfs, with busybox
wget as the client: smolvm with an open network, smolvm under an egress policy (allowed_cidrs =
the gateway: every frame goes through the VMM's filter), and `qemu-system-x86_64 -M microvm`
with a virtio-net-device on `-netdev stream` to a passt started with the same options (its
`--socket` instead of smolvm's `--fd`). In the nested profile smolvm's VMM and passt run in the
host VM, so QEMU and its passt run there too (through smolvm-vmm-relay), with KVM; otherwise
both run on this host. Timings are taken by the host's HTTP server, the same way for all:
download_mib_s: the blob's size over the time from the request arriving to its last byte written;
request_period_s: median interval between consecutive requests of an empty file in a loop of
`wget` (a process start, TCP connect, GET and close in the guest: the connect latency as the
guest's programs see it). vmm_cpu_s_per_mib: the VMM process's user+sys CPU (vCPU threads'
guest time included) over the download, per MiB: smolvm's from getrusage (control command
RUSAGE), QEMU's from /proc/PID/stat. expose_local_get_s: median round trip of a GET from the
host through `expose_local` to busybox httpd in the guest (smolvm only: QEMU has no such path).
Ratios: qemu / smolvm for times and CPU (above 1: smolvm faster or cheaper), smolvm / qemu for
throughput (above 1: smolvm faster), and the policy's cost (restricted / open).
"""

from __future__ import annotations

import http.server
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from smolvm import SmolVM, _paths, network
from smolvm.build.initramfs import CpioEntry, ensure_initramfs, newc_archive
from smolvm.build.kernel import ensure_kernel
from smolvm.profile import detect, kernel_cmdline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import arguments, host_facts, write_result  # noqa: E402

GW = network.GATEWAY


class Server:
    """HTTP/1.0 on 127.0.0.1: /blob (random bytes) and /empty; records when each request came and ended."""

    def __init__(self, mib: int) -> None:
        self.blob = os.urandom(mib << 20)
        self.log: list[tuple[str, float, float]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                t0 = time.monotonic()
                body = outer.blob if self.path.startswith("/blob") else b""
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                outer.log.append((self.path, t0, time.monotonic()))

            def log_message(self, *args: object) -> None:
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def take(self) -> list[tuple[str, float, float]]:
        out, self.log = self.log, []
        return out

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def loop_script(port: int, runs: int, tag: str) -> str:
    return (f"i=0; while [ $i -lt {runs + 1} ]; do wget -q -O /dev/null http://{GW}:{port}/empty-{tag}-$i || exit 1; "
            "i=$((i+1)); done")  # fmt: skip


def blob_script(port: int) -> str:
    return f"wget -q -O /dev/null http://{GW}:{port}/blob"


def figures(log: list[tuple[str, float, float]], mib: int) -> dict[str, Any]:
    starts = sorted(t0 for p, t0, _ in log if p.startswith("/empty"))
    periods = [b - a for a, b in zip(starts[1:], starts[2:])]  # the first request may pay ARP and warm-up
    blob = [(t0, t1) for p, t0, t1 in log if p.startswith("/blob")]
    out: dict[str, Any] = {"request_period_s": round(statistics.median(periods), 5) if periods else None}
    if blob:
        out["download_mib_s"] = round(mib / (blob[-1][1] - blob[-1][0]), 3)
    return out


def vmm_cpu_s(vm: SmolVM) -> float:
    user, sys_ = vm._command("RUSAGE").split()
    return (int(user) + int(sys_)) / 1e6


def bench_smolvm(srv: Server, mib: int, runs: int, policy: dict[str, Any] | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"internet_settings": policy} if policy else {}
    with SmolVM(image=None, memory=256, **kw) as vm:
        r = vm.run(loop_script(srv.port, 1, "warm"), timeout=600)
        assert r.ok, r
        srv.take()
        r = vm.run(loop_script(srv.port, runs, "s"), timeout=1800)
        assert r.ok, r
        c0 = vmm_cpu_s(vm)
        r = vm.run(blob_script(srv.port), timeout=1800)
        c1 = vmm_cpu_s(vm)
        assert r.ok, r
        out = figures(srv.take(), mib)
        out["vmm_cpu_s_per_mib"] = round((c1 - c0) / mib, 4)
        if policy is None:
            vm.run("mkdir -p /tmp/w && echo ok > /tmp/w/x && busybox httpd -p 127.0.0.1:8000 -h /tmp/w", timeout=300)
            hp = vm.expose_local(8000)
            url = f"http://127.0.0.1:{hp}/x"
            assert urllib.request.urlopen(url, timeout=60).read() == b"ok\n"
            rts = []
            for _ in range(runs):
                t0 = time.monotonic()
                urllib.request.urlopen(url, timeout=60).read()
                rts.append(time.monotonic() - t0)
            out["expose_local_get_s"] = round(statistics.median(rts), 5)
    return out


GUEST_INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
ip link set eth0 mtu {mtu} up
ip addr add {addr}/{prefix} dev eth0
ip route add default via {gw}
{warm}
echo BENCH-LOOP
{loop}
echo BENCH-BLOB
sleep 1
{blob}
echo BENCH-DONE $?
poweroff -f
"""

# Runs where QEMU runs (the host VM when nested): passt on a socket, QEMU to it, CPU samples at the markers.
RUNNER = """
set -u
cd {work}
trap 'kill $(cat {sock}.pid 2>/dev/null) 2>/dev/null; rm -f {sock} {sock}.pid' EXIT  # passt daemonizes
{passt} --socket {sock} --pid {sock}.pid >passt.log 2>&1
i=0; while [ ! -S {sock} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
{qemu} >qemu.log 2>&1 &
Q=$!
until grep -q BENCH-BLOB serial.log 2>/dev/null || ! kill -0 $Q 2>/dev/null; do sleep 0.02; done
cat /proc/$Q/stat >cpu0 2>/dev/null
until grep -q BENCH-DONE serial.log 2>/dev/null || ! kill -0 $Q 2>/dev/null; do sleep 0.02; done
cat /proc/$Q/stat >cpu1 2>/dev/null
getconf CLK_TCK >clk
kill $Q 2>/dev/null  # without ACPI the guest's poweroff only halts it
wait $Q
echo finished >done
"""


def bench_qemu(srv: Server, mib: int, runs: int, nested: bool, timeout: float) -> dict[str, Any]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return {"available": False, "reason": "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"}
    home = _paths.home()
    work = Path(tempfile.mkdtemp(prefix="bench-net-qemu-", dir=home if nested else None))  # the host VM sees home
    work.chmod(0o777)  # passt drops to nobody
    try:
        # Unix sockets need a local file system: in the host VM its /dev/shm, not the 9p share
        sock = f"/dev/shm/smolvm-bench-net-{os.getpid()}.sock" if nested else f"{work}/passt.sock"
        init = GUEST_INIT.format(
            mtu=network.MTU, addr=network.GUEST_ADDR, prefix=network.PREFIX, gw=GW,
            warm=loop_script(srv.port, 1, "warm"), loop=loop_script(srv.port, runs, "q"), blob=blob_script(srv.port),
        )  # fmt: skip
        base = ensure_initramfs()
        initrd = work / "initrd.cpio"
        initrd.write_bytes(base.read_bytes() + newc_archive([CpioEntry("bench-init", 0o100755, init.encode())]))
        kernel = ensure_kernel() / "vmlinux"
        cmdline = kernel_cmdline(detect()) + " rdinit=/bench-init"
        qemu_argv = [
            # acpi=off: our guest kernel has no ACPI, so QEMU lists the virtio-mmio devices on its command line
            qemu, "-enable-kvm", "-cpu", "host,-arch-capabilities", "-M", "microvm,rtc=off,acpi=off",
            "-m", "256", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", f"file:{work}/serial.log", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
            "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}",
            "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56",
        ]  # fmt: skip
        passt = [w for w in network.passt_argv(network.NetworkPolicy(), nested) if w != "--foreground"]
        script = RUNNER.format(work=shlex.quote(str(work)), sock=shlex.quote(sock), passt=shlex.join(passt),
                               qemu=shlex.join(qemu_argv))  # fmt: skip
        argv = ["/bin/sh", "-c", script]
        if nested:
            from smolvm import hostvm

            argv = hostvm.relay_argv(argv)
        srv.take()
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            done = subprocess.CompletedProcess(argv, -1, e.stdout or b"", e.stderr or b"")
        serial = (work / "serial.log").read_text(errors="replace") if (work / "serial.log").exists() else ""
        if "BENCH-DONE 0" not in serial:
            return {"available": False, "reason": f"the QEMU guest did not finish (status {done.returncode})",
                    "serial_tail": serial[-1500:], "qemu_log": _tail(work / "qemu.log"),
                    "passt_log": _tail(work / "passt.log"), "stderr": done.stderr.decode(errors="replace")[-800:]}  # fmt: skip
        out: dict[str, Any] = {"available": True, "where": "in the host VM (KVM inside it)" if nested else "this host",
                               "command": qemu_argv, **figures(srv.take(), mib)}  # fmt: skip
        try:
            f0, f1 = ((work / n).read_text().rsplit(")", 1)[1].split() for n in ("cpu0", "cpu1"))
            clk = int((work / "clk").read_text())
            out["vmm_cpu_s_per_mib"] = round((int(f1[11]) + int(f1[12]) - int(f0[11]) - int(f0[12])) / clk / mib, 4)
        except (OSError, ValueError, IndexError) as e:
            out["vmm_cpu_s_per_mib"] = None
            out["cpu_note"] = f"no CPU samples: {e}"
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tail(p: Path) -> str:
    return p.read_text(errors="replace")[-800:] if p.exists() else ""


def ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def main() -> None:
    ap = arguments(__doc__, "bench_net")
    ap.add_argument("--mib", type=int, default=8, help="size of the download (default 8 MiB)")
    ap.add_argument("--runs", type=int, default=10, help="requests in the loop and expose_local GETs (default 10)")
    ap.add_argument("--no-qemu", action="store_true", help="skip the QEMU baseline")
    ap.add_argument("--qemu-timeout", type=float, default=1800.0)
    args = ap.parse_args()
    profile = detect()
    srv = Server(args.mib)
    out: dict[str, Any] = {"benchmark": "smolvm bench_net", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "host": host_facts("node", "profile", "cpus", profile=profile), "mib": args.mib,
                           "runs": args.runs}  # fmt: skip
    try:
        print("bench_net: smolvm, open network ...", file=sys.stderr, flush=True)
        out["smolvm"] = bench_smolvm(srv, args.mib, args.runs, None)
        print("bench_net: smolvm, egress policy ...", file=sys.stderr, flush=True)
        out["smolvm_restricted"] = bench_smolvm(srv, args.mib, args.runs, {"allowed_cidrs": [GW]})
        if args.no_qemu:
            out["qemu"] = {"available": False, "reason": "skipped (--no-qemu)"}
        else:
            print("bench_net: QEMU microvm + passt ...", file=sys.stderr, flush=True)
            out["qemu"] = bench_qemu(srv, args.mib, args.runs, profile.nested, args.qemu_timeout)
    finally:
        srv.close()
    s, p, q = out["smolvm"], out["smolvm_restricted"], out["qemu"]
    out["ratios"] = {
        "note": "download: smolvm / qemu (above 1: smolvm faster); period and CPU: qemu / smolvm (above 1: smolvm "
                "faster or cheaper); policy: restricted / open (the filter's cost; 1 = none)",
        "download_smolvm_over_qemu": ratio(s.get("download_mib_s"), q.get("download_mib_s")),
        "request_period_qemu_over_smolvm": ratio(q.get("request_period_s"), s.get("request_period_s")),
        "cpu_per_mib_qemu_over_smolvm": ratio(q.get("vmm_cpu_s_per_mib"), s.get("vmm_cpu_s_per_mib")),
        "policy_download": ratio(p.get("download_mib_s"), s.get("download_mib_s")),
        "policy_request_period": ratio(p.get("request_period_s"), s.get("request_period_s")),
        "policy_cpu_per_mib": ratio(p.get("vmm_cpu_s_per_mib"), s.get("vmm_cpu_s_per_mib")),
    }  # fmt: skip
    out["methodology"] = __doc__
    write_result(args.out, out, indent=1)


if __name__ == "__main__":
    main()

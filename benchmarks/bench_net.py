"""Benchmark guest networking and port forwards; JSON out. Traffic only to the host's loopback.

    python3 benchmarks/bench_net.py [--mib 4] [--runs 5] [--out FILE.json]

download: `curl` in the guest of a random file from an HTTP server on the host's 127.0.0.1
(through virtio-net and passt, as host.smolvm.internal), MiB/s of the guest-side curl time.
connect: median `curl` time of a 0-byte page (TCP connect + request + answer), guest-side.
expose_local: median round trip of an HTTP GET from the host to a tiny server in the guest
through the forward (host 127.0.0.1 -> VMM -> vsock -> agent -> guest 127.0.0.1).
vmm_cpu_s_per_mib: the VMM's user+sys CPU time over the download, per MiB.
On hosts whose KVM emulates guest ring 0 (the compat profile) guest-side figures are far
below real hardware: the guest's TCP stack runs at ~1.5 M instructions/s.
"""

from __future__ import annotations

import http.server
import os
import platform
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from smolvm import SmolVM
from smolvm.network import HOST_ALIAS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import arguments, host_facts, median, timed, write_result  # noqa: E402


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = arguments(__doc__, "bench_net")
    ap.add_argument("--mib", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"smolvm-bench-net-{os.getpid()}"
    root.mkdir()
    (root / "blob").write_bytes(os.urandom(args.mib << 20))
    (root / "empty").write_bytes(b"")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: _Quiet(*a, directory=str(root), **k))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    out: dict[str, Any] = {"host": platform.node(), **host_facts("profile"), "mib": args.mib}
    with SmolVM() as vm:
        assert vm.pid is not None
        url = f"http://{HOST_ALIAS}:{port}"
        vm.run(f"curl -fsS -o /dev/null {url}/empty", timeout=300)  # warm up
        c0 = cpu_s(vm.pid)
        r = vm.run(f"curl -fsS -o /tmp/b -w '%{{time_total}}' {url}/blob", timeout=1800)
        c1 = cpu_s(vm.pid)
        assert r.ok, r.stderr
        secs = float(r.stdout)
        out["download_mib_s"] = round(args.mib / secs, 3)
        out["vmm_cpu_s_per_mib"] = round((c1 - c0) / args.mib, 4)
        times = []
        for _ in range(args.runs):
            r = vm.run(f"curl -fsS -o /dev/null -w '%{{time_total}}' {url}/empty", timeout=300)
            times.append(float(r.stdout))
        out["connect_request_s_median"] = median(times)
        vm.run("mkdir -p /tmp/w && echo ok > /tmp/w/x && cd /tmp/w && "
               "setsid nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 </dev/null &",
               timeout=300)  # fmt: skip
        hp = vm.expose_local(8000)
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{hp}/x", timeout=30).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        rt = timed(lambda: urllib.request.urlopen(f"http://127.0.0.1:{hp}/x", timeout=60).read(), args.runs, warmup=False)
        out["expose_local_get_s_median"] = median(rt)
    srv.shutdown()
    for f in root.iterdir():
        f.unlink()
    root.rmdir()
    out["methodology"] = __doc__
    write_result(args.out, out, indent=1)


if __name__ == "__main__":
    main()

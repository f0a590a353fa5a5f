"""Benchmark BrowserSession: snapshot build, restore -> CDP ready (restored vs cold), page.goto, screenshot, memory; JSON out.

    python3 benchmarks/bench_browser.py [--sessions 5] [--rebuild] [--no-cold] [--out FILE.json]

The configuration is the reference docs' (live, record_video, 1440x900, 2048 MiB). --rebuild
removes its browser base snapshot first, so 'snapshot_build_s' (boot, Chromium cold start,
save) is measured; without it that figure is only there when the snapshot was missing.
'restored_ready_s' is BrowserSession() until CDP answers on the host; 'cold_chromium_s' is a
cold start of Chromium in the same (restored) VM until its DevTools port has a page. In the
nested profile the same restore is also timed with SMOLVM_MEMORY_CACHE=0 (the snapshot's
memory paged in over 9p, as before csrc/vmm/memcache.c), and memory is the host VM's own
MemAvailable drop per idle session (its VMMs run in there; the host's PSS of the relay
process says nothing), the QEMU process's RSS growth beside it. Elsewhere memory is the
VMM's PSS. On hosts that emulate guest ring 0 or run VMMs under TCG absolute times say little
about real hardware; ratios measured in one run do.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from smolvm import BrowserSession, BrowserSessionConfig
from smolvm.browser import CDP_PORT, READY_TIMEOUT_S, snapshot_dir, snapshot_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import arguments, host_facts, median, pss_kib, ratio, rss_kib, timed, vmm_lines, write_result  # noqa: E402

PAGE = "<!doctype html><title>bench</title><h1>bench</h1><p id=n></p><script>n.textContent=6*7</script>"


def host_vm_available_kib() -> int | None:
    """MemAvailable inside the nested profile's host VM (read there through hostd), or None."""
    from smolvm import hostvm

    try:
        argv = hostvm.relay_argv(["/bin/sh", "-c", "cat /proc/meminfo >&2"])
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return None


def qemu_pid() -> int | None:
    from smolvm import hostvm

    return hostvm._read_pid()


def ready_once(cfg: BrowserSessionConfig) -> tuple[float, BrowserSession]:
    t = time.monotonic()
    s = BrowserSession(cfg)
    s.__enter__()
    return time.monotonic() - t, s


def main() -> int:
    ap = arguments(__doc__, "bench_browser")
    ap.add_argument("--sessions", type=int, default=5, help="idle restored sessions for the memory figure")
    ap.add_argument("--rebuild", action="store_true", help="remove the browser base snapshot first")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold Chromium start (minutes off native)")
    args = ap.parse_args()
    from smolvm.profile import detect

    nested = detect().name == "nested"
    cfg = BrowserSessionConfig(mode="live", record_video=True, viewport={"width": 1440, "height": 900})
    snap = snapshot_dir(snapshot_key(cfg))
    if args.rebuild:
        shutil.rmtree(snap, ignore_errors=True)
    had_snapshot = (snap / "meta.json").exists()
    result: dict[str, Any] = {"host": platform.node(), **host_facts("profile"), "had_snapshot": had_snapshot,
                              "config": "live, record_video, 1440x900, 2048 MiB"}  # fmt: skip
    if not had_snapshot:
        t, s = ready_once(cfg)
        s.stop()
        result["snapshot_build_s"] = round(t, 1)

    import http.server
    import threading

    from smolvm.network import HOST_ALIAS

    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://{HOST_ALIAS}:{srv.server_address[1]}/"

    restored: list[float] = []
    uncached: list[float] = []
    runs: list[dict[str, Any]] = []
    sessions: list[BrowserSession] = []
    try:
        for mode in (["0", "1"] if nested else ["1"]) + ["1"]:
            os.environ["SMOLVM_MEMORY_CACHE"] = mode
            t, s = ready_once(cfg)
            t0 = time.monotonic()
            s.page().title()  # Playwright connected and answering
            first = time.monotonic() - t0
            (uncached if mode == "0" else restored).append(t)
            us = vmm_lines(s.vm.console_log).get("t_memcache_us")
            runs.append({"memcache": mode == "1", "ready_s": round(t, 2), "first_command_s": round(first, 2),
                         "memcache_open_ms": round(int(us) / 1000, 1) if us else None})  # fmt: skip
            s.stop()
        os.environ.pop("SMOLVM_MEMORY_CACHE", None)

        # One session: page.goto of a small page from the host's loopback, screenshot, a cold Chromium.
        _, s = ready_once(cfg)
        page = s.page()
        gotos = timed(lambda: page.goto(url), 3, warmup=False)
        assert page.text_content("#n") == "42"
        shots = timed(lambda: s.screenshot(full_page=False), 3, warmup=False)
        cold = None
        if not args.no_cold:
            s._close_playwright()
            s._guest("stop-browser", timeout=120)
            t0 = time.monotonic()
            s._guest("start", cfg.mode, "1440", "900", str(CDP_PORT), "6080", "0", timeout=300)
            s._guest("wait-ready", str(CDP_PORT), str(READY_TIMEOUT_S), timeout=READY_TIMEOUT_S + 60)
            cold = time.monotonic() - t0
        s.stop()

        # Memory per idle restored session.
        before_avail, qpid = (host_vm_available_kib(), qemu_pid()) if nested else (None, None)
        before_rss = rss_kib(qpid) if qpid else None
        for _ in range(args.sessions):
            sessions.append(ready_once(cfg)[1])
        time.sleep(10)
        if nested:
            after_avail = host_vm_available_kib()
            after_rss = rss_kib(qpid) if qpid else None
            n = len(sessions)
            result["host_vm_available_drop_kib_per_session"] = (
                (before_avail - after_avail) // n if before_avail and after_avail else None
            )
            result["qemu_rss_growth_kib_per_session"] = (
                (after_rss - before_rss) // n if before_rss and after_rss else None
            )
        else:
            result["pss_kib_per_session"] = [pss_kib(x.vm.pid or 0) for x in sessions]
    finally:
        for x in sessions:
            x.stop()
        srv.shutdown()
    result.update({
        "restored_ready_s": [round(x, 2) for x in restored],
        "restored_ready_median_s": median(restored, 2),
        "restores": runs,
        "cold_chromium_s": round(cold, 1) if cold is not None else None,
        "cold_over_restored": ratio(cold, median(restored, 2), 1),
        "goto_s": [round(x, 3) for x in gotos], "screenshot_s": [round(x, 3) for x in shots],
    })  # fmt: skip
    if nested:
        result["restored_ready_without_memcache_s"] = [round(x, 2) for x in uncached]
        result["without_over_with_memcache"] = ratio(median(uncached, 2), median(restored, 2), 1)
    write_result(args.out, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark BrowserSession: browser snapshot build, restore -> CDP ready, page.goto, screenshot, PSS per session; JSON out.

    python3 benchmarks/bench_browser.py [--sessions 5] [--out FILE.json]

The first session of the configuration makes the browser snapshot (boot, Chromium cold
start, snapshot) when it is missing: that run's 'first_start_s' is the snapshot build time.
On hosts whose KVM emulates guest ring 0 absolute times say little about real hardware.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from smolvm import BrowserSession, BrowserSessionConfig
from smolvm.browser import snapshot_dir, snapshot_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import arguments, host_facts, median, pss_kib, timed, write_result  # noqa: E402

PAGE = "<!doctype html><title>bench</title><h1>bench</h1><p id=n></p><script>n.textContent=6*7</script>"


def main() -> int:
    ap = arguments(__doc__, "bench_browser")
    ap.add_argument("--sessions", type=int, default=5)
    args = ap.parse_args()
    cfg = BrowserSessionConfig(viewport={"width": 1280, "height": 720})
    had_snapshot = (snapshot_dir(snapshot_key(cfg)) / "meta.json").exists()
    result: dict[str, Any] = {"host": platform.node(), **host_facts("profile"), "had_snapshot": had_snapshot}
    sessions: list[BrowserSession] = []
    starts: list[float] = []
    gotos: list[float] = []
    shots: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        page_file = Path(tmp) / "bench.html"
        page_file.write_text(PAGE)
        try:
            for i in range(args.sessions):
                t = time.monotonic()
                s = BrowserSession(cfg)
                s.__enter__()
                starts.append(time.monotonic() - t)
                sessions.append(s)
                if i == 0:
                    s.push_file(page_file, "/opt/pages/bench.html")
                    page = s.page()
                    gotos = timed(lambda: page.goto("file:///opt/pages/bench.html"), 3, warmup=False)
                    shots = timed(lambda: s.screenshot(full_page=False), 3, warmup=False)
            time.sleep(2)
            pss = [pss_kib(s.vm.pid or 0) for s in sessions]
        finally:
            for s in sessions:
                s.stop()
    result.update({
        "first_start_s": round(starts[0], 2),
        "restored_start_s": [round(x, 2) for x in starts[1:]],
        "restored_start_median_s": median(starts[1:], 2),
        "goto_s": [round(x, 3) for x in gotos], "screenshot_s": [round(x, 3) for x in shots],
        "pss_kib_per_session": pss,
    })  # fmt: skip
    write_result(args.out, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

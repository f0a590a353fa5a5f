"""What the benchmarks share: the parser with --out, host facts, /proc memory figures, timing, medians, the JSON result.

A benchmark puts this folder on sys.path itself (so it works under PYTHONSAFEPATH=1 too) and
imports this module; smolvm is imported only where a fact needs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
VMM_LINE = re.compile(r"^smolvm-vmm: ([A-Za-z0-9_]+)=(\S+)\s*$")


def arguments(doc: str, name: str) -> argparse.ArgumentParser:
    """A parser whose --help shows the benchmark's docstring, with --out FILE.json defaulting
    to benchmarks/results/<name>.json; the benchmark adds its own flags."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = RESULTS / f"{name}.json"
    ap.add_argument("--out", type=Path, default=default, help=f"JSON file to write (default {default})")
    return ap


PLATFORM: dict[str, Callable[[], Any]] = {
    "node": platform.node,
    "machine": platform.machine,
    "kernel": platform.release,
    "cpus": os.cpu_count,
    "python": platform.python_version,
}


def host_facts(*names: str, profile: Any = None) -> dict[str, Any]:
    """The named facts about this host, in that order, for a result's header: keys of PLATFORM,
    and "profile" / "profile_reason" (of `profile`, else smolvm.profile.detect(), asked once)."""
    facts: dict[str, Any] = {}
    for name in names:
        if name in ("profile", "profile_reason"):
            if profile is None:
                from smolvm.profile import detect

                profile = detect()
            facts[name] = profile.name if name == "profile" else profile.reason
        else:
            facts[name] = PLATFORM[name]()
    return facts


def _proc_kib(pid: int, file: str, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def pss_kib(pid: int) -> int | None:
    """The process's proportional set size (Pss of /proc/PID/smaps_rollup), or None if it is gone."""
    return _proc_kib(pid, "smaps_rollup", "Pss:")


def rss_kib(pid: int) -> int | None:
    """The process's resident set size (VmRSS of /proc/PID/status), or None if it is gone."""
    return _proc_kib(pid, "status", "VmRSS:")


def vmm_lines(console: Path) -> dict[str, str]:
    """The `smolvm-vmm: key=value` lines (the VMM's own timings) of a console log, by key."""
    found: dict[str, str] = {}
    try:
        for line in console.read_text(errors="replace").splitlines():
            m = VMM_LINE.match(line.strip())
            if m:
                found[m.group(1)] = m.group(2)
    except OSError:
        pass
    return found


def timed(f: Callable[[], object], runs: int, warmup: bool = True) -> list[float]:
    """Wall seconds of each of `runs` calls of f, after one untimed call when warmup."""
    if warmup:
        f()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float], digits: int = 4) -> float | None:
    """The median rounded to digits, None for no samples."""
    return round(statistics.median(xs), digits) if xs else None


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """a / b rounded to digits, None when either is missing or zero."""
    if not a or not b:
        return None
    return round(a / b, digits)


def write_result(out: Path, doc: dict[str, Any], indent: int = 2) -> None:
    """Write the result as JSON to out (making its folder) and to stdout."""
    text = json.dumps(doc, indent=indent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)

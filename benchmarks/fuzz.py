"""Fuzz every guest- and agent-facing parser for a fixed number of executions; JSON out.

    python3 benchmarks/fuzz.py [--runs 10000000] [--max-time SECONDS] [--target NAME ...]
                               [--nice 15] [--out FILE.json]

Builds each libFuzzer harness of tests/fuzz/ (clang, -fsanitize=fuzzer,address,undefined),
runs it from its seed corpus for --runs executions (or until --max-time seconds, whichever comes
first) and reports execs/s and coverage. A crash leaves its input in the artifacts folder named
in the JSON; turn it into a regression input in tests/fuzz/regress/<target>/.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "fuzz")]

import fuzz_targets as ft  # noqa: E402
from _common import arguments, host_facts, write_result  # noqa: E402

METHODOLOGY = (
    "Each target is built with clang -O1 -fsanitize=fuzzer,address,undefined and run single-"
    "process from a scratch copy of tests/fuzz/corpus/<target>/ with -runs=N (and -max_total_time "
    "when --max-time is set). execs is libFuzzer's number_of_executed_units, exec_per_s its "
    "average_exec_per_sec; cov is the number of coverage points (edges) reached, ft the number "
    "of features, corpus_units the corpus size at the end. wall_s includes start-up and the "
    "initial corpus pass. 'crashed' means libFuzzer stopped on a sanitizer report, leak or "
    "timeout; its input is under artifacts."
)


def bench(target: ft.Target, cc: str, work: Path, runs: int, max_time: int, nice: int) -> dict[str, Any]:
    exe = ft.build(cc, target, work / "bin")
    args = [f"-runs={runs}", "-seed=1"]
    if max_time:
        args.append(f"-max_total_time={max_time}")
    t0 = time.monotonic()
    res = ft.run(exe, target, work, args, timeout=(max_time or 86400) + 300, nice=nice)
    wall = time.monotonic() - t0
    art = work / f"artifacts-{target.name}"
    crashes = sorted(p.name for p in art.iterdir())
    return {
        "execs": res.execs,
        "runs_asked": runs,
        "wall_s": round(wall, 1),
        "exec_per_s": res.exec_per_s or (round(res.execs / wall) if wall else 0),
        "cov": res.cov,
        "ft": res.ft,
        "corpus_units": res.corpus_units,
        "crashed": res.returncode != 0,
        "artifacts": [str(art / c) for c in crashes],
        "tail": res.output.strip().splitlines()[-3:] if res.returncode != 0 else [],
    }


def main() -> int:
    p = arguments(__doc__, "fuzz")
    p.add_argument("--runs", type=int, default=10_000_000, help="executions per target (default 10 M)")
    p.add_argument("--max-time", type=int, default=0, help="stop a target after this many seconds (0 = no limit)")
    p.add_argument("--target", action="append", choices=sorted(ft.TARGETS), help="only these (repeatable)")
    p.add_argument("--nice", type=int, default=0, help="run the fuzzers under nice -n N")
    p.add_argument("--work", type=Path, help="keep builds, corpora and artifacts here (default: a temp dir)")
    a = p.parse_args()
    cc = ft.find_clang()
    if cc is None:
        print("fuzz: no clang with libFuzzer; apt-get install clang", file=sys.stderr)
        return 2
    names = a.target or list(ft.TARGETS)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="smolvm-fuzz-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"fuzz: {name} ...", file=sys.stderr, flush=True)
            results[name] = bench(ft.TARGETS[name], cc, work, a.runs, a.max_time, a.nice)
            r = results[name]
            print(f"fuzz: {name}: {r['execs']} execs, {r['exec_per_s']}/s, cov {r['cov']}, ft {r['ft']}"
                  f"{', CRASHED' if r['crashed'] else ''}", file=sys.stderr, flush=True)  # fmt: skip
    report = {
        "benchmark": "fuzz",
        "host": {**host_facts("machine", "kernel"), "clang": cc},
        "methodology": METHODOLOGY,
        "targets": results,
    }
    write_result(a.out, report)
    return 1 if any(r["crashed"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

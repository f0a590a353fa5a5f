"""Fuzz smoke run: build every libFuzzer harness of tests/fuzz/, fuzz each briefly, replay the regression corpus.

No KVM needed. Skipped when no clang with libFuzzer is installed (Debian: apt-get install clang).
The long runs and the execs/s and coverage figures are benchmarks/fuzz.py's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))

import fuzz_targets as ft  # noqa: E402

SMOKE_RUNS = 2000
SMOKE_SECONDS = 8


@pytest.fixture(scope="module")
def clang() -> str:
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("the harnesses carry their own ASan+UBSan: they run in the normal pass only")
    cc = ft.find_clang()
    if cc is None:
        pytest.skip("no clang with libFuzzer (apt-get install clang)")
    return cc


@pytest.mark.parametrize("name", sorted(ft.TARGETS))
def test_fuzz_smoke(clang: str, tmp_path: Path, name: str) -> None:
    target = ft.TARGETS[name]
    assert any(target.corpus.iterdir()), f"no seeds in {target.corpus}: run tests/fuzz/make_corpus.py"
    exe = ft.build(clang, target, tmp_path / "bin")

    # every seed and every input that once crashed must run clean under ASan+UBSan
    inputs = sorted(target.corpus.iterdir())
    if target.regress.is_dir():
        inputs += sorted(target.regress.iterdir())
    done = ft.replay(exe, inputs, tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("Executed ") == len(inputs), done.stderr[-2000:]

    res = ft.run(exe, target, tmp_path, [f"-runs={SMOKE_RUNS}", f"-max_total_time={SMOKE_SECONDS}", "-seed=1"],
                 timeout=120)  # fmt: skip
    assert res.returncode == 0, res.output[-4000:]
    assert res.execs > 0 and res.cov > 0, res.output[-2000:]


def test_seed_corpus_current() -> None:
    """The seeds are what tests/fuzz/make_corpus.py writes for this tree (e.g. after a protocol bump)."""
    import make_corpus

    stale = [
        f"{target}/{name}"
        for target, make in make_corpus.SEEDS.items()
        for name, data in make().items()
        if not (ft.TARGETS[target].corpus / name).is_file() or (ft.TARGETS[target].corpus / name).read_bytes() != data
    ]
    assert not stale, f"stale fuzz seeds {stale}: run python3 tests/fuzz/make_corpus.py"

"""The libFuzzer targets of tests/fuzz/: their sources, how to build them, how to run them.

Shared by benchmarks/fuzz.py (long runs, execs/s and coverage) and tests/test_fuzz_smoke.py
(short bounded runs and the regression corpus). Needs clang with libFuzzer (Debian: `clang`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "tests" / "fuzz"
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # an installed smolvm comes first; either says the same

from smolvm import _binaries  # noqa: E402

CLIENT = tuple(str(p.relative_to(ROOT)) for p in _binaries.library("_smolvm", ROOT))  # csrc/client/ but module.c
CFLAGS = [
    "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-g", "-O1", "-fno-omit-frame-pointer",
    "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined",
]  # fmt: skip


@dataclass(frozen=True)
class Target:
    name: str
    sources: tuple[str, ...]  # relative to the repo root, the harness first
    libs: tuple[str, ...] = ()
    max_len: int = 4096

    @property
    def corpus(self) -> Path:
        return FUZZ / "corpus" / self.name

    @property
    def regress(self) -> Path:
        return FUZZ / "regress" / self.name


# The fake VM, evloop and snapshot sections of the C device tests, for the harnesses that include fuzz_common.h.
FAKES = ("tests/c/fake_test.c", "tests/c/fake_vm.c", "tests/c/fake_loop.c", "tests/c/fake_snap.c")

TARGETS = {
    t.name: t
    for t in (
        Target("queue", ("tests/fuzz/fuzz_queue.c", "csrc/vmm/virtio/queue.c", *FAKES), max_len=8192),
        Target("mmio", ("tests/fuzz/fuzz_mmio.c", "csrc/vmm/virtio/queue.c", "csrc/vmm/virtio/mmio.c", *FAKES)),
        Target("blk", ("tests/fuzz/fuzz_blk.c", "csrc/vmm/virtio/queue.c", "csrc/vmm/virtio/mmio.c", "csrc/vmm/virtio/blk.c",
                       *FAKES), ("-luring",)),  # fmt: skip
        Target("vsock", ("tests/fuzz/fuzz_vsock.c", "csrc/vmm/virtio/queue.c", "csrc/vmm/virtio/mmio.c",
                         "csrc/vmm/virtio/vsock.c", *FAKES)),  # fmt: skip
        Target("exec_client", ("tests/fuzz/fuzz_exec_client.c", *CLIENT), ("-luring", "-lpthread")),
        Target("file_client", ("tests/fuzz/fuzz_file_client.c", *CLIENT), ("-luring", "-lpthread")),
        Target("agent", ("tests/fuzz/fuzz_agent.c",), max_len=8192),
        Target("serial", ("tests/fuzz/fuzz_serial.c", "csrc/vmm/serial.c", *FAKES), ("-lpthread",)),
        Target("net_filter", ("tests/fuzz/fuzz_net_filter.c", "csrc/vmm/net_filter.c", "csrc/vmm/dns.c", *FAKES),
               max_len=2048),
    )
}


def find_clang() -> str | None:
    """A clang that links -fsanitize=fuzzer programs, or None."""
    for cc in (os.environ.get("FUZZ_CC"), "clang", "clang-14", "clang-15", "clang-16"):
        if not cc or shutil.which(cc) is None:
            continue
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "t.c"
            src.write_text("#include <stdint.h>\n#include <stddef.h>\n"
                           "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n")  # fmt: skip
            done = subprocess.run([cc, "-fsanitize=fuzzer,address,undefined", "-o", str(Path(d) / "t"), str(src)],
                                  capture_output=True, check=False)  # fmt: skip
            if done.returncode == 0:
                return cc
    return None


def build(cc: str, target: Target, out_dir: Path) -> Path:
    """Compile target into out_dir/fuzz_<name>; raises CalledProcessError (with the compiler's output)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / f"fuzz_{target.name}"
    incs = {f"-I{d}" for b in ("smolvm-vmm", "_smolvm") for d in _binaries.include_dirs(b, ROOT)}
    cmd = [cc, *CFLAGS, *sorted(incs), "-o", str(exe), *(str(ROOT / s) for s in target.sources),
           *target.libs]  # fmt: skip
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    return exe


def fuzz_env(tmp: Path) -> dict[str, str]:
    """The environment a harness runs in: its own sanitizer runtime, temporary files under tmp."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(
        TMPDIR=str(tmp),
        ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:symbolize=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
    )
    return env


@dataclass
class RunResult:
    returncode: int
    execs: int
    exec_per_s: int
    cov: int
    ft: int
    corpus_units: int
    output: str


_DONE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_STAT = re.compile(r"stat::(\w+):\s+(\d+)")


def run(exe: Path, target: Target, work: Path, args: list[str], timeout: float, nice: int = 0) -> RunResult:
    """Fuzz from a scratch copy of the seed corpus (the seeds in the repo stay as they are)."""
    corpus = work / f"corpus-{target.name}"
    if corpus.exists():
        shutil.rmtree(corpus)
    shutil.copytree(target.corpus, corpus)
    art = work / f"artifacts-{target.name}"
    art.mkdir(parents=True, exist_ok=True)
    cmd = [str(exe), f"-max_len={target.max_len}", "-timeout=20", "-rss_limit_mb=2048", "-print_final_stats=1",
           f"-artifact_prefix={art}/", *args, str(corpus)]  # fmt: skip
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=fuzz_env(work), check=False)
    out = done.stderr + done.stdout
    stats = {k: int(v) for k, v in _STAT.findall(out)}
    last = _DONE.findall(out)
    cov, ft, units = (int(last[-1][1]), int(last[-1][2]), int(last[-1][3])) if last else (0, 0, 0)
    execs = stats.get("number_of_executed_units", int(last[-1][0]) if last else 0)
    return RunResult(done.returncode, execs, stats.get("average_exec_per_sec", 0), cov, ft, units, out)


def replay(exe: Path, files: list[Path], work: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run each input once (libFuzzer's file mode); a sanitizer report fails the run."""
    cmd = [str(exe), "-timeout=20", "-rss_limit_mb=2048", *(str(f) for f in files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=fuzz_env(work), check=False)

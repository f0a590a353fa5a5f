"""Build and run a C unit test of csrc/ under a sanitizer (shared by the device, xstate and other C tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from smolvm import _binaries

ROOT = Path(__file__).resolve().parent.parent
CFLAGS = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-g", "-O1", "-fno-omit-frame-pointer"]
SANITIZERS = ["address,undefined", "thread"]  # every device test runs under both
# What every device test links (tests/c/fake_*.h): CHECK, the fake VM and the fake guest driver. Tests add
# fake_loop.c (instead of the real evloop) or fake_snap.c (instead of csrc/vmm/snapshot.c) as they need.
DEVICE_FAKES = ["tests/c/fake_test.c", "tests/c/fake_vm.c", "tests/c/fake_driver.c"]


def compiler() -> str:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler {cc!r}; install gcc or set CC")
    return cc


def build(exe: Path, sources: list[str], sanitizer: str, libs: list[str]) -> subprocess.CompletedProcess[str]:
    """Compile sources (relative to the repo root) into exe with -fsanitize=sanitizer.

    A TSan build this compiler can't make is skipped; so is a missing liburing.
    """
    cmd = [
        compiler(), *CFLAGS, f"-fsanitize={sanitizer}",
        *(["-fno-sanitize-recover=undefined"] if "undefined" in sanitizer else []),
        *(f"-I{d}" for d in _binaries.include_dirs("smolvm-vmm", ROOT)), "-o", str(exe), *(str(ROOT / s) for s in sources), *libs,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 and sanitizer == "thread" and "fsanitize=thread" in done.stderr:
        pytest.skip("ThreadSanitizer is not available with this compiler")
    if done.returncode != 0 and "-luring" in libs and "-luring" in done.stderr + done.stdout:
        pytest.skip("liburing is not installed (apt-get install liburing-dev)")
    assert done.returncode == 0, done.stderr
    return done


def run(exe: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run a sanitizer-built test binary; sanitizer errors are fatal."""
    # Our own sanitizer runtime is linked in: drop the ASan preload the suite may run under.
    env = dict(
        {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
        ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        TSAN_OPTIONS="halt_on_error=1",
    )
    env.update(extra_env)
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=env, check=False)
    if done.returncode != 0 and "unexpected memory mapping" in done.stderr:
        pytest.skip("ThreadSanitizer cannot run in this environment")
    return done


def device_test(tmp_path: Path, name: str, sources: list[str], sanitizer: str, libs: list[str],
                skip_rc: int | None = None, **extra_env: str) -> None:  # fmt: skip
    """Build sources into tmp_path/test_<name> under sanitizer and run it: it must print "all <name> tests passed".

    An exit status of skip_rc (if given) skips the test with what it printed.
    """
    exe = tmp_path / f"test_{name}"
    build(exe, sources, sanitizer, libs)
    done = run(exe, **extra_env)
    if skip_rc is not None and done.returncode == skip_rc:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"all {name} tests passed" in done.stdout

"""Build tests/c/test_virtio.c with csrc/virtio/*.c under sanitizers and run it (no KVM needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    "tests/c/test_virtio.c",
    "csrc/virtio/queue.c",
    "csrc/virtio/mmio.c",
    "csrc/virtio/vsock.c",
    "csrc/snapshot.c",
]
CFLAGS = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-g", "-O1", "-fno-omit-frame-pointer"]


def _compiler() -> str:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler {cc!r}; install gcc or set CC")
    return cc


def _build(tmp_path: Path, sanitizer: str) -> subprocess.CompletedProcess[str]:
    exe = tmp_path / "test_virtio"
    cmd = [
        _compiler(),
        *CFLAGS,
        f"-fsanitize={sanitizer}",
        *(["-fno-sanitize-recover=undefined"] if "undefined" in sanitizer else []),
        "-I",
        str(ROOT / "csrc"),
        "-o",
        str(exe),
        *(str(ROOT / s) for s in SOURCES),
        "-lpthread",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _run(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # Our own sanitizer runtime is linked in: drop the ASan preload the suite may run under.
    env = dict(
        {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
        ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        TSAN_OPTIONS="halt_on_error=1",
    )
    return subprocess.run(
        [str(tmp_path / "test_virtio")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def test_virtio_asan_ubsan(tmp_path: Path) -> None:
    build = _build(tmp_path, "address,undefined")
    assert build.returncode == 0, build.stderr
    run = _run(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all virtio tests passed" in run.stdout


def test_virtio_tsan(tmp_path: Path) -> None:
    build = _build(tmp_path, "thread")
    if build.returncode != 0 and "fsanitize=thread" in build.stderr:
        pytest.skip("ThreadSanitizer is not available with this compiler")
    assert build.returncode == 0, build.stderr
    run = _run(tmp_path)
    if run.returncode != 0 and "unexpected memory mapping" in run.stderr:
        pytest.skip("ThreadSanitizer cannot run in this environment")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all virtio tests passed" in run.stdout

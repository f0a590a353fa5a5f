"""Build tests/c/test_blk.c with csrc/vmm/virtio/blk.c and the real evloop under sanitizers and run it (no KVM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctest import build, run

SOURCES = [
    "tests/c/test_blk.c",
    "csrc/vmm/virtio/blk.c",
    "csrc/vmm/virtio/queue.c",
    "csrc/vmm/virtio/mmio.c",
    "csrc/vmm/evloop.c",
]
SKIP_RC = 77  # the test found no usable io_uring


@pytest.mark.parametrize("sanitizer", ["address,undefined", "thread"])
def test_blk(tmp_path: Path, sanitizer: str) -> None:
    exe = tmp_path / "test_blk"
    build(exe, SOURCES, sanitizer, ["-luring", "-lpthread"])
    done = run(exe, TMPDIR=str(tmp_path))  # the sparse disk images go in TMPDIR
    if done.returncode == SKIP_RC:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all blk tests passed" in done.stdout

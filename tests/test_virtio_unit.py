"""Build tests/c/test_virtio.c with csrc/vmm/virtio/*.c under sanitizers and run it (no KVM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctest import build, run

SOURCES = [
    "tests/c/test_virtio.c",
    "csrc/vmm/virtio/queue.c",
    "csrc/vmm/virtio/mmio.c",
    "csrc/vmm/virtio/vsock.c",
    "csrc/vmm/snapshot.c",
]


@pytest.mark.parametrize("sanitizer", ["address,undefined", "thread"])
def test_virtio(tmp_path: Path, sanitizer: str) -> None:
    exe = tmp_path / "test_virtio"
    build(exe, SOURCES, sanitizer, ["-lpthread"])
    done = run(exe)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all virtio tests passed" in done.stdout

"""Build tests/c/test_blk.c with csrc/vmm/virtio/blk.c and the real evloop under sanitizers and run it (no KVM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctest import DEVICE_FAKES, SANITIZERS, device_test

SOURCES = ["tests/c/test_blk.c", *DEVICE_FAKES, "tests/c/fake_snap.c", "csrc/vmm/virtio/blk.c", "csrc/vmm/virtio/queue.c",
           "csrc/vmm/virtio/mmio.c", "csrc/vmm/evloop.c"]  # fmt: skip
SKIP_RC = 77  # the test found no usable io_uring


@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_blk(tmp_path: Path, sanitizer: str) -> None:
    device_test(tmp_path, "blk", SOURCES, sanitizer, ["-luring", "-lpthread"], SKIP_RC, TMPDIR=str(tmp_path))  # disk images in TMPDIR

"""Build tests/c/test_virtio.c with csrc/vmm/virtio/*.c under sanitizers and run it (no KVM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctest import DEVICE_FAKES, SANITIZERS, device_test

SOURCES = ["tests/c/test_virtio.c", *DEVICE_FAKES, "tests/c/fake_loop.c", "csrc/vmm/virtio/queue.c",
           "csrc/vmm/virtio/mmio.c", "csrc/vmm/virtio/vsock.c", "csrc/vmm/snapshot.c"]  # fmt: skip


@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_virtio(tmp_path: Path, sanitizer: str) -> None:
    device_test(tmp_path, "virtio", SOURCES, sanitizer, ["-lpthread"])

"""Build tests/c/test_net.c with csrc/vmm/virtio/net.c and the real evloop under sanitizers and run it (no KVM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctest import DEVICE_FAKES, SANITIZERS, device_test

SOURCES = ["tests/c/test_net.c", *DEVICE_FAKES, "tests/c/fake_snap.c", "csrc/vmm/virtio/net.c", "csrc/vmm/virtio/queue.c",
           "csrc/vmm/virtio/mmio.c", "csrc/vmm/evloop.c", "csrc/vmm/net_filter.c", "csrc/vmm/dns.c", "csrc/vmm/resolver.c"]  # fmt: skip


@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_net(tmp_path: Path, sanitizer: str) -> None:
    device_test(tmp_path, "net", SOURCES, sanitizer, ["-luring", "-lpthread"])

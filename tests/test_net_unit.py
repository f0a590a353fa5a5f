"""Build tests/c/test_net.c with csrc/vmm/virtio/net.c and the real evloop under sanitizers and run it (no KVM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctest import build, run

SOURCES = [
    "tests/c/test_net.c",
    "csrc/vmm/virtio/net.c",
    "csrc/vmm/virtio/queue.c",
    "csrc/vmm/virtio/mmio.c",
    "csrc/vmm/evloop.c",
]


@pytest.mark.parametrize("sanitizer", ["address,undefined", "thread"])
def test_net(tmp_path: Path, sanitizer: str) -> None:
    exe = tmp_path / "test_net"
    build(exe, SOURCES, sanitizer, ["-luring", "-lpthread"])
    done = run(exe)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all net tests passed" in done.stdout

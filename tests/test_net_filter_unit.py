"""Build tests/c/test_net_filter.c with csrc/vmm/net_filter.c, dns.c and resolver.c under sanitizers and run it (no KVM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctest import SANITIZERS, device_test

SOURCES = ["tests/c/test_net_filter.c", "tests/c/fake_test.c", "csrc/vmm/net_filter.c", "csrc/vmm/dns.c",
           "csrc/vmm/resolver.c"]  # fmt: skip


@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_net_filter(tmp_path: Path, sanitizer: str) -> None:
    device_test(tmp_path, "net_filter", SOURCES, sanitizer, ["-lpthread"])

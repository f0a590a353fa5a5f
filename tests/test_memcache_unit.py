"""Build tests/c/test_memcache.c with csrc/vmm/memcache.c under ASan+UBSan and run it (no KVM needed).

The nested profile copies a base snapshot's memory into the host VM's RAM by the data ranges
the host lists, and maps it copy-on-write over anonymous guest RAM: contents, holes, merging
of ranges, refusal of bad extents files, eviction of older versions, private guest writes.
"""

from __future__ import annotations

from pathlib import Path

from ctest import build, run

SOURCES = ["tests/c/test_memcache.c", "csrc/vmm/memcache.c", "csrc/vmm/procfs.c"]


def test_memcache(tmp_path: Path) -> None:
    exe = tmp_path / "test_memcache"
    build(exe, SOURCES, "address,undefined", [])
    done = run(exe, MEMCACHE_TEST_DIR=str(tmp_path / "work"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all memcache tests passed" in done.stdout

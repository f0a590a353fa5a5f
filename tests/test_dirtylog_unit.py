"""Build tests/c/test_dirtylog.c with csrc/vmm/kvm.c under ASan+UBSan and run it on this host's real KVM.

vm.fork() writes only the pages a restored VM changed: KVM's dirty log (kvm.c) for vCPU writes,
vm_gpa()'s marks for the VMM's. This checks both against a real-mode guest on whatever KVM the
host has (kvm_pvm on the development machines: the compat profile's KVM); the nested profile's
KVM is checked by tests/test_fork.py against the kernel's page map.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ctest import build, run

SOURCES = ["tests/c/test_dirtylog.c", "csrc/vmm/kvm.c"]
SKIP_RC = 77


@pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="needs /dev/kvm for a real vCPU")
def test_dirty_log_names_exactly_the_written_pages(tmp_path: Path) -> None:
    exe = tmp_path / "test_dirtylog"
    build(exe, SOURCES, "address,undefined", ["-lpthread"])
    done = run(exe)
    if done.returncode == SKIP_RC:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all dirty log tests passed" in done.stdout

"""Build tests/c/test_xstate.c with csrc/vmm/xstate.c under ASan+UBSan and run it on a real KVM vCPU.

The compat guest kernel asks the VMM to XSAVE/XRSTOR for it; the area comes from guest
memory, so hostile images (compacted form, reserved bits, unknown features, out-of-range
addresses, random bytes) must give the guest an error and leave the VMM and vCPU intact.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ctest import build, run

SOURCES = ["tests/c/test_xstate.c", "csrc/vmm/xstate.c"]
SKIP_RC = 77


@pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="needs /dev/kvm for a real vCPU")
def test_xstate_handler(tmp_path: Path) -> None:
    exe = tmp_path / "test_xstate"
    build(exe, SOURCES, "address,undefined", [])
    done = run(exe)
    if done.returncode == SKIP_RC:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all xstate tests passed" in done.stdout

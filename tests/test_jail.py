"""The VMM's jail (csrc/vmm/jail.c), as the VMM reports it (STATUS; the host cannot see its /proc in the nested profile)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smolvm import SmolVM
from smolvm._native import vmm_path

NO_CAPS = "0" * 16
LEAKED_FD = 200  # an fd the VMM's spawner leaves open; far above what a small VM opens, below RLIMIT_NOFILE
SANITIZED = "libasan" in os.environ.get("LD_PRELOAD", "")


def fds(st: dict[str, str]) -> set[int]:
    return {int(f) for f in st["Fds"].split(",")}


@pytest.mark.vm
def test_vmm_has_no_privileges_left(vm: SmolVM) -> None:
    st = vm.vmm_status()
    done = st["Jail"].split(",")
    assert {"fds", "caps", "nnp", "nodump", "nofile", "core"} <= set(done), st
    for cap in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert st[cap] == NO_CAPS, (cap, st)
    if st["Uid"].startswith("0,"):  # root (our machines): the bounding set is emptied too
        assert st["CapBnd"] == NO_CAPS and "bset" in done, st
    assert st["NoNewPrivs"] == "1", st
    assert st["Uid"].split(",")[0] == st["Uid"].split(",")[1], st  # the caller's uid, not switched


@pytest.mark.vm
def test_vmm_has_its_own_ipc_and_uts_namespaces(vm: SmolVM) -> None:
    st = vm.vmm_status()
    if "ns" not in st["Jail"].split(","):
        pytest.skip(f"new namespaces not permitted here: {st['JailSkipped']}")
    for ns, key in (("ipc", "NsIpc"), ("uts", "NsUts")):
        assert st[key] != st[key + "Caller"], st  # not the namespace it was started in
        assert int(st[key]) != os.stat(f"/proc/self/ns/{ns}").st_ino, st  # nor this test's


@pytest.mark.vm
def test_vmm_rlimits_are_set(vm: SmolVM) -> None:
    st = vm.vmm_status()
    soft, hard = st["RlimitNofile"].split(",")
    assert soft == hard and 64 < int(soft) < 1024, st  # sized from what the VMM may open, not the default
    assert max(fds(st)) < int(soft), st
    assert st["RlimitCore"] == "0,0", st
    soft, hard = st["RlimitAs"].split(",")
    if SANITIZED:
        assert soft == hard == "unlimited" and "as" not in st["Jail"], st  # ASan's shadow needs terabytes
    else:
        assert soft == hard and int(soft) > vm.memory << 20 and "as" in st["Jail"], st


def leaky_vmm(tmp_path: Path, *extra: str) -> Path:
    """A smolvm-vmm wrapper that leaves fd LEAKED_FD open for the VMM (argv: the real VMM's, then extra)."""
    real = vmm_path()
    marker = "# __asan_init (the base snapshot key's build marker, smolvm/snapshots.py)\n" if (
        b"__asan_init" in real.read_bytes()) else ""  # fmt: skip
    wrapper = tmp_path / f"smolvm-vmm-leaky{''.join(extra)}"
    wrapper.write_text(f'#!/bin/bash\n{marker}exec {LEAKED_FD}</dev/null\nexec {real} "$@" {" ".join(extra)}\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.own_vm
def test_inherited_fds_are_closed(vm: SmolVM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_VMM", str(leaky_vmm(tmp_path)))
    with SmolVM() as own:
        st = own.vmm_status()
        assert LEAKED_FD not in fds(st) and {0, 1, 2, 3} <= fds(st), st  # stdio and the control socket stay
        assert own.run("echo ok").stdout == "ok\n"
    # The same wrapper with --no-jail (debugging only): the fd is there, so the check above can fail.
    monkeypatch.setenv("SMOLVM_VMM", str(leaky_vmm(tmp_path, "--no-jail")))
    with SmolVM() as own:
        st = own.vmm_status()
        assert st["Jail"] == "off" and LEAKED_FD in fds(st), st
        if st["Uid"].startswith("0,"):
            assert st["CapEff"] != NO_CAPS, st
        assert st["Seccomp"] == "2", st  # the filters do not depend on the jail

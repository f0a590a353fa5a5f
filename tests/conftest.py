"""Shared fixtures: one real VM per test session, and fresh ones restored from its base snapshot."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from smolvm import SmolVM

KVM = Path("/dev/kvm")
NO_KVM_REASON = "/dev/kvm is absent: this host offers no KVM, so no VM can boot here"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that take a VM of their own run last (stable sort keeps the rest in order).
    items.sort(key=lambda item: item.get_closest_marker("own_vm") is not None)
    if not KVM.exists():
        skip = pytest.mark.skip(reason=NO_KVM_REASON)
        for item in items:
            if item.get_closest_marker("vm") or item.get_closest_marker("own_vm"):
                item.add_marker(skip)


def ensure_artifacts() -> None:
    """Build (or find cached) kernel, initramfs and root image before any VM boots, one at a time."""
    from smolvm.build.image import ensure_image
    from smolvm.build.initramfs import ensure_initramfs
    from smolvm.build.kernel import ensure_kernel

    ensure_kernel()
    ensure_initramfs(with_busybox=False)
    ensure_image()


@pytest.fixture(scope="session")
def vm() -> Iterator[SmolVM]:
    """The VM shared by the session's tests.

    The first VM of a configuration boots (minutes on emulating hosts) and saves the base
    snapshot; every later one, in this run or the next, restores it in milliseconds.
    """
    ensure_artifacts()
    shared = SmolVM()
    shared.start()
    print(f"\nshared VM {shared.vm_id} ready in {shared.boot_time:.1f} s")
    yield shared
    shared.delete()


@pytest.fixture
def own_vm(vm: SmolVM) -> Iterator[SmolVM]:
    """An ephemeral VM of the test's own (`with SmolVM()`), restored from the base snapshot."""
    with SmolVM() as own:
        yield own


@pytest.fixture
def smolvm_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a `python -m smolvm` subprocess that imports the same smolvm as the tests."""
    import smolvm

    env = dict(os.environ)
    pkg_parent = str(Path(smolvm.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    return env

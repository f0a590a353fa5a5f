"""Shared fixtures: one real VM per test session, a second one booted alongside for the test that kills it."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from smolvm import SmolVM

KVM = Path("/dev/kvm")
NO_KVM_REASON = "/dev/kvm is absent: this host offers no KVM, so no VM can boot here"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that boot their own VM run last (stable sort keeps the rest in order).
    items.sort(key=lambda item: item.get_closest_marker("own_vm") is not None)
    config.stash[_SPARE_NEEDED] = any(item.get_closest_marker("own_vm") for item in items)
    if not KVM.exists():
        skip = pytest.mark.skip(reason=NO_KVM_REASON)
        for item in items:
            if item.get_closest_marker("vm") or item.get_closest_marker("own_vm"):
                item.add_marker(skip)


_SPARE_NEEDED = pytest.StashKey[bool]()


def ensure_artifacts() -> None:
    """Build (or find cached) kernel and initramfs before any VM boots, one at a time."""
    from smolvm.build.initramfs import ensure_initramfs
    from smolvm.build.kernel import ensure_kernel

    ensure_kernel()
    ensure_initramfs()


class SpareVM:
    """A VM booted in a background thread while the shared one boots (boots take minutes here)."""

    def __init__(self) -> None:
        self.vm: SmolVM | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is not None:
            return
        vm = self.vm = SmolVM()

        def boot() -> None:
            try:
                vm.start()
            except BaseException as e:  # handed to the test that takes the VM
                self.error = e

        self.thread = threading.Thread(target=boot, name="spare-vm-boot", daemon=True)
        self.thread.start()

    def take(self) -> SmolVM:
        if self.thread is None:
            ensure_artifacts()
            self.start()
        assert self.thread is not None and self.vm is not None
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.vm

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.vm is not None:
            self.vm.close()


@pytest.fixture(scope="session")
def spare_vm() -> Iterator[SpareVM]:
    spare = SpareVM()
    yield spare
    spare.close()


@pytest.fixture(scope="session")
def vm(request: pytest.FixtureRequest, spare_vm: SpareVM) -> Iterator[SmolVM]:
    """The VM shared by the session's tests (booted once: a boot takes minutes on some hosts)."""
    ensure_artifacts()
    if request.config.stash.get(_SPARE_NEEDED, False):
        spare_vm.start()
    shared = SmolVM()
    shared.start()
    print(f"\nshared VM {shared.vm_id} booted in {shared.boot_time:.1f} s")
    yield shared
    shared.close()


@pytest.fixture
def own_vm(spare_vm: SpareVM) -> Iterator[SmolVM]:
    """A VM of the test's own (the spare booted at session start), closed afterwards."""
    vm = spare_vm.take()
    yield vm
    vm.close()


@pytest.fixture
def smolvm_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a `python -m smolvm` subprocess that imports the same smolvm as the tests."""
    import smolvm

    env = dict(os.environ)
    pkg_parent = str(Path(smolvm.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    return env

"""VMState and VMInfo: a VM's lifecycle state and a typed snapshot of what it is (SmolVM.status, SmolVM.info)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from enum import Enum


class VMState(str, Enum):
    """A VM's lifecycle state. A str: `vm.status == "running"` works, and so does VMState.RUNNING."""

    CREATED = "created"  # not started yet
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"  # deleted, closed or gone

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class VMInfo:
    """What a VM is, at the moment SmolVM.info was read."""

    vm_id: str
    status: VMState
    memory: int  # MiB
    vcpus: int
    image: str | None  # None: the busybox guest from RAM, without a disk
    disk_size: int | None  # MiB of the VM's writable disk; None without an image
    pid: int | None  # the VMM process while the VM runs
    created: float | None  # time.time() when it started; None before
    network: object | None = None  # the network policy, once VMs have networking

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in (
                ("vm_id", self.vm_id), ("status", self.status), ("memory", f"{self.memory} MiB"),
                ("vcpus", self.vcpus), ("image", self.image or "none (busybox in RAM)"),
                ("disk_size", f"{self.disk_size} MiB" if self.disk_size else "n/a"),
                ("pid", self.pid or "n/a"), ("network", self.network or "n/a"),
            )
        )  # fmt: skip
        return f"<table><caption>SmolVM</caption>{rows}</table>"

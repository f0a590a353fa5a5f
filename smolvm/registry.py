"""The on-disk VM registry behind SmolVM.from_id(): one folder per VM under $SMOLVM_HOME/vms/."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._paths import home
from .errors import VMNotFoundError

VM_ID_RE = re.compile(r"^vm-[0-9a-f]{12}$")
RECORD = "record.json"


DISK_FILE = "disk.img"  # the VM's writable disk, in its state folder and in a snapshot of it


@dataclass(frozen=True)
class StateDir:
    """The state folder of one VM ($SMOLVM_HOME/vms/<vm_id>): the one place naming its files."""

    path: Path

    @property
    def vsock(self) -> Path:
        """The VMM's vsock Unix socket: the guest agent's connections."""
        return self.path / "vsock.sock"

    @property
    def ctl(self) -> Path:
        """The VMM's control socket (PAUSE, SNAPSHOT, FWD, STOP...; smolvm/_ctl.py)."""
        return self.path / "ctl.sock"

    @property
    def console(self) -> Path:
        """The guest's serial console, written by the VMM."""
        return self.path / "console.log"

    @property
    def vmm_stderr(self) -> Path:
        return self.path / "vmm.stderr"

    @property
    def disk(self) -> Path:
        return self.path / DISK_FILE

    @property
    def record(self) -> Path:
        return self.path / RECORD


@dataclass
class VMRecord:
    """What any process needs to reach a running VM."""

    vm_id: str
    pid: int  # the smolvm-vmm process
    pid_start: int  # its start time in clock ticks (/proc/PID/stat), guards against PID reuse
    memory: int
    vcpus: int
    persistent: bool  # outlives its creator until delete()
    owner_pid: int
    created: float
    source: str = ""  # snapshot it was restored from, if any
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return vm_dir(self.vm_id)

    @property
    def files(self) -> StateDir:
        """The VM's state folder and the files in it."""
        return state_dir(self.vm_id)

    @property
    def vsock_path(self) -> Path:
        return self.files.vsock

    @property
    def ctl_path(self) -> Path:
        return self.files.ctl

    @property
    def console_path(self) -> Path:
        return self.files.console


def vms_root() -> Path:
    root = home() / "vms"
    root.mkdir(parents=True, exist_ok=True)
    return root


def check_id(vm_id: object) -> str:
    if not isinstance(vm_id, str) or not VM_ID_RE.match(vm_id):
        raise VMNotFoundError(
            f"{vm_id!r} is not a smolvm VM id (they look like 'vm-0123456789ab'); "
            "`smolvm ls` lists the VMs on this machine"
        )
    return vm_id


def vm_dir(vm_id: str) -> Path:
    return vms_root() / check_id(vm_id)


def state_dir(vm_id: str) -> StateDir:
    """The state folder of vm_id (also before the VM has a record)."""
    return StateDir(vm_dir(vm_id))


def process_start(pid: int) -> int | None:
    """Start time of pid in clock ticks, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields restart after the last ')'
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        if fields[0] in (b"Z", b"X") and len(_tasks(pid)) <= 1:
            return None  # a zombie whose threads are all gone: ended, only not reaped yet
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _tasks(pid: int) -> list[str]:
    """The thread ids of pid (a zombie leader keeps its live threads until they exit)."""
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def alive(rec: VMRecord) -> bool:
    """Is the record's VMM process still the one that was recorded?"""
    return rec.pid > 0 and process_start(rec.pid) == rec.pid_start


def save(rec: VMRecord) -> None:
    files = rec.files
    files.path.mkdir(parents=True, exist_ok=True)
    tmp = files.path / f".{RECORD}.{os.getpid()}"
    tmp.write_text(json.dumps(asdict(rec), indent=1))
    os.replace(tmp, files.record)


def load(vm_id: str) -> VMRecord:
    path = state_dir(vm_id).record
    try:
        data = json.loads(path.read_text())
        return VMRecord(**data)
    except FileNotFoundError:
        raise VMNotFoundError(
            f"no VM {vm_id} on this machine (it was deleted, or never existed); "
            "`smolvm ls` lists the VMs here"
        ) from None
    except (ValueError, TypeError) as e:
        raise VMNotFoundError(f"the registry record of {vm_id} at {path} is unreadable: {e}") from None


def remove(vm_id: str) -> None:
    shutil.rmtree(vm_dir(vm_id), ignore_errors=True)


def scan() -> tuple[list[VMRecord], list[str]]:
    """(records of live VMs, ids of records whose VMM is gone: those are removed)."""
    live: list[VMRecord] = []
    gone: list[str] = []
    for d in sorted(vms_root().iterdir()):
        if not VM_ID_RE.match(d.name):
            continue
        try:
            rec = load(d.name)
        except VMNotFoundError:
            # a folder without a readable record: a VM still starting, or debris
            if StateDir(d).record.exists() or not any(d.glob("*.sock")):
                continue
            continue
        if alive(rec):
            live.append(rec)
        else:
            gone.append(rec.vm_id)
            remove(rec.vm_id)
    return live, gone

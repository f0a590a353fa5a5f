"""SmolVM: one microVM in its own smolvm-vmm process, running shell commands through the guest agent.

The facade: the VMM process is smolvm/_vmm.py, how a VM boots (artifacts, base snapshots)
smolvm/_boot.py, the guest agent's requests and their errors smolvm/_agent.py.
"""

from __future__ import annotations

import atexit
import builtins
import concurrent.futures
import dataclasses
import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from . import _agent, _boot, _ctl, _pty, _stream, _validate, _vmm, disk, forks, network, ports, registry, snapshots
from ._agent import HOST_GRACE_MS, SETUP_ENTROPY_BYTES, SETUP_TIMEOUT_MS, TRANSFER_TIMEOUT_S
from ._aio import AsyncMixin
from ._boot import DEFAULT_DISK_MIB, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, IMAGE_ARG, base_key, boot_cmdline
from ._native import vmm_path
from ._vmm import CLOSE_GRACE_S, CTL_TIMEOUT_S, GONE_PROBE_S, KEEP_FAILED_LOGS, UDS_MAX
from .build._cache import progress
from .build.image import DEFAULT_IMAGE
from .errors import (
    AgentError,
    SmolVMError,
    VMGoneError,
    VMNotFoundError,
    VMNotRunningError,
    VMStartError,
)
from .info import VMInfo, VMState
from .kvm import check_kvm
from .profile import Profile, detect
from .registry import DISK_FILE
from .result import RunResult

__all__ = [  # also importable from here, as before the split
    "CLOSE_GRACE_S", "CTL_TIMEOUT_S", "DEFAULT_DISK_MIB", "DEFAULT_MEMORY_MIB", "DEFAULT_VCPUS",
    "DEFAULT_IMAGE", "DISK_FILE",
    "GONE_PROBE_S", "HOST_GRACE_MS", "IMAGE_ARG", "KEEP_FAILED_LOGS", "SETUP_ENTROPY_BYTES",
    "SETUP_TIMEOUT_MS", "TRANSFER_TIMEOUT_S", "UDS_MAX", "SmolVM", "base_key", "boot_cmdline",
]  # fmt: skip

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:
    from typing_extensions import Unpack

_live: weakref.WeakSet[SmolVM] = weakref.WeakSet()
FORK_START_THREADS = 4  # fork(n) starts this many children at once
_T = TypeVar("_T")

class SmolVM(AsyncMixin):
    """A microVM that runs shell commands.

    >>> with SmolVM() as vm:
    ...     print(vm.run("uname -a && python3 --version").output)

    The guest's root is the image (Debian with python3 unless `image` names another one
    built with `smolvm image build`), read-only and shared, under a writable overlay on the
    VM's own sparse disk of `disk_size` MiB. image=None runs a minimal busybox guest from
    RAM instead, without a disk.

    The VM boots on start() (or the first run(), or entering `with`), lives in its own
    smolvm-vmm process and dies with close(), garbage collection, interpreter exit,
    SIGTERM (unless the program set its own handler), or the death of this process (the
    VMM exits when its control socket closes).
    run() may be called from several threads at once.
    """

    def __init__(
        self,
        memory: int = DEFAULT_MEMORY_MIB,
        vcpus: int = DEFAULT_VCPUS,
        *,
        image: str | None = DEFAULT_IMAGE,
        disk_size: int | None = None,
        kernel: str | os.PathLike[str] | None = None,
        initrd: str | os.PathLike[str] | None = None,
        boot_timeout: float | None = None,
        cold_boot: bool = False,
        internet: bool = True,
        internet_settings: Mapping[str, object] | None = None,
        extra_hosts: Mapping[str, str] | None = None,
    ) -> None:
        self._status = "created"
        self._cold_boot = bool(cold_boot)  # boot the kernel even if a base snapshot exists
        self._source: Path | None = None  # restore from this snapshot instead of booting
        self._persistent = False  # start() outside `with`: outlives this process until delete()
        self._attached = False  # a handle from from_id(): the VM belongs to another process
        self._record: registry.VMRecord | None = None
        self._memory = _validate.memory_mib(memory)
        self._vcpus = _validate.vcpus(vcpus)
        self._kernel = _validate.optional_file("kernel", kernel)
        self._initrd = _validate.optional_file("initrd", initrd)
        self._boot_timeout = _validate.boot_timeout(boot_timeout)
        self._image, self._disk_size = _boot.image_and_disk(image, disk_size)
        self._net = network.policy(internet, internet_settings, extra_hosts)  # smolvm/network.py
        self._env: dict[str, str] = {}
        self._vm_id = "vm-" + secrets.token_hex(6)
        self._lock = threading.RLock()
        self._owner_pid = os.getpid()
        self._vmm = _vmm.VMMProcess(self._vm_id, registry.state_dir(self._vm_id))
        self._gone: VMGoneError | None = None
        self._profile: Profile | None = None
        self._boot_time: float | None = None
        self.last_fork: forks.Capture | None = None  # what this VM's last fork() captured

    # ---- properties -------------------------------------------------------------

    @property
    def vm_id(self) -> str:
        return self._vm_id

    @property
    def status(self) -> VMState:
        """"created" (not started), "running", "paused", or "stopped" (deleted, closed or gone),
        as a VMState (a str).

        For a persistent VM this is the VM's own state, also after this handle was closed.
        """
        return VMState(self._state())

    @property
    def info(self) -> VMInfo:
        """A typed record of the VM: id, status, memory, vCPUs, image, disk, pid, created."""
        rec = self._record
        return VMInfo(
            vm_id=self._vm_id, status=self.status, memory=self._memory, vcpus=self._vcpus,
            image=self._image, disk_size=self._disk_size,
            pid=self.pid if self.pid is not None else (rec.pid if rec and self._attached else None),
            created=rec.created if rec is not None else None, network=self._net.to_dict(),
        )  # fmt: skip

    def _state(self) -> str:
        rec = self._record
        if rec is not None and (self._persistent or self._attached) and self._status != "created":
            try:
                rec = registry.load(self._vm_id)
            except VMNotFoundError:
                return "stopped"
            if not registry.alive(rec):
                return "stopped"
            return "paused" if rec.extra.get("paused") else "running"
        if self._status == "running" and rec is not None and rec.extra.get("paused"):
            return "paused"  # an ephemeral VM: pause() recorded it in self._record
        return self._status

    @property
    def memory(self) -> int:
        return self._memory

    @property
    def vcpus(self) -> int:
        return self._vcpus

    @property
    def image(self) -> str | None:
        """The root image's name, or None for the busybox guest without a disk."""
        return self._image

    @property
    def disk_size(self) -> int | None:
        """Size in MiB of the VM's writable disk (None without an image)."""
        return self._disk_size

    @property
    def internet_settings(self) -> dict[str, object]:
        """The network policy fixed at creation: {"mode": "open" | "off" | "restricted", "extra_hosts": {...}},
        with "allowed_domains" and "allowed_cidrs" lists for "restricted"."""
        return self._net.to_dict()

    @property
    def env(self) -> dict[str, str]:
        """Variables set with set_env(), given to every later run()."""
        return dict(self._current_env())

    @property
    def pid(self) -> int | None:
        """The VMM process id while the VM runs."""
        return self._vmm.pid if self._status == "running" else None

    @property
    def state_dir(self) -> Path:
        """$SMOLVM_HOME/vms/<vm_id>: vsock socket, console log; removed when the VM stops."""
        return self._vmm.files.path

    @property
    def console_log(self) -> Path:
        """The guest's serial console, written by the VMM while the VM runs."""
        return self._vmm.files.console

    @property
    def profile(self) -> Profile | None:
        """The boot profile (native or compat) once started."""
        return self._profile

    @property
    def _nested(self) -> bool:
        """Does this VM's VMM run in the nested profile's host VM (smolvm/hostvm.py)?"""
        return self._profile is not None and self._profile.nested

    @property
    def boot_time(self) -> float | None:
        """Seconds from starting the VMM to a ready guest agent."""
        return self._boot_time

    def _repr_html_(self) -> str:
        """Jupyter: the VM's info as a table."""
        return self.info._repr_html_()

    def __repr__(self) -> str:
        return (
            f"SmolVM(vm_id={self._vm_id!r}, status={self._status!r}, "
            f"memory={self._memory}, vcpus={self._vcpus}, image={self._image!r}, "
            f"disk_size={self._disk_size})"
        )


    # ---- lifecycle ----------------------------------------------------------------

    def __enter__(self) -> SmolVM:
        if self._status == "created":
            self._start(persistent=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._persistent or self._attached:
            self.close()  # a persistent VM used in `with` keeps running: delete() ends it
        else:
            self.delete()

    def start(self) -> SmolVM:
        """Start the VM and wait until its guest agent is ready. No-op if running.

        A VM started with start() outside a `with` block is persistent: it keeps running
        after this process exits, other processes reach it with SmolVM.from_id(vm_id), and
        only delete() (or `smolvm rm`) ends it. close() just lets go of this handle.
        """
        return self._start(persistent=True)

    def _start(self, persistent: bool) -> SmolVM:
        with self._lock:
            if self._status == "running":
                return self
            self._raise_if_stopped()
            self._profile = detect()
            if not self._nested:  # nested: the host VM's KVM, checked when it starts
                check_kvm()
            vmm = vmm_path()
            if self._profile.compat and self._vcpus > 1 and self._source is None:
                self._status = "stopped"
                raise VMStartError(
                    f"vcpus={self._vcpus}: on this host (compat profile: {self._profile.reason}) "
                    "secondary vCPUs never come up during boot; use vcpus=1 here. "
                    "Hosts with VT-x/AMD-V run several vCPUs.",
                    vm_id=self._vm_id,
                )
            self._persistent = persistent
            if self._net.enabled:
                network.passt_path()  # missing passt: say so before anything starts
            m = self._machine(self._profile)
            argv = self._plan(m, vmm)
            t0 = time.monotonic()
            failure = self._spawn(argv, persistent)
            try:
                if failure is None:
                    _agent.setup(self._vmm.files.vsock, self._vm_id, self._image is not None, self._net)
                    if persistent:
                        self._command("DETACH")
            except BaseException:  # Ctrl-C during boot, or a failed setup: leave nothing behind
                self._teardown(grace=0.0)
                raise
            if failure is not None:
                raise self._start_failed(failure)
            self._boot_time = time.monotonic() - t0
            self._status = "running"
            pid = self._vmm.pid or 0
            self._record = registry.VMRecord(
                vm_id=self._vm_id, pid=pid, pid_start=registry.process_start(pid) or 0,
                memory=self._memory, vcpus=self._vcpus, persistent=persistent,
                owner_pid=os.getpid(), created=time.time(),
                source=str(self._source or ""),
                extra={"image": self._image, "disk_size": self._disk_size, "env": self._env,
                       "network": self._net.to_dict()},
            )  # fmt: skip
            registry.save(self._record)
            _live.add(self)
            if not persistent:
                _watch_sigterm()
            return self

    def _machine(self, profile: Profile) -> _boot.Machine:
        return _boot.Machine(
            vm_id=self._vm_id, files=self._vmm.files, memory=self._memory, vcpus=self._vcpus,
            image=self._image, disk_size=self._disk_size, net=self._net, profile=profile,
            persistent=self._persistent, kernel=self._kernel, initrd=self._initrd,
        )  # fmt: skip

    def _plan(self, m: _boot.Machine, vmm: Path) -> builtins.list[str]:
        """The VMM's argv: a cold boot (cold_boot=True), else a restore of the source snapshot
        or of the configuration's base snapshot (booted and saved first if there is none)."""
        if self._source is None:
            kernel, initrd, image_file = _boot.artifacts(m)
            if self._cold_boot:
                return _boot.cold_argv(m, vmm, kernel, initrd, image_file, fresh_disk=True)
            base = _boot.base_dir(m, vmm, kernel, initrd, image_file)
            if not _boot.base_usable(base):
                self._make_base(m, vmm, base, kernel, initrd, image_file)
            self._source = base
        self._status = "stopped"  # a damaged snapshot ends this VM before it starts
        snapshots.check(
            self._source, f"snapshot {self._source.name!r}",
            f"delete it (`smolvm snapshot rm {self._source.name}`) and take it again",
        )  # fmt: skip
        self._status = "created"
        return _boot.restore_argv(m, vmm, self._source)

    def _spawn(self, argv: builtins.list[str], persistent: bool) -> str | None:
        """Start the VMM and wait for its guest agent: None, or why it failed (VMM still to reap)."""
        try:
            return self._vmm.spawn(argv, self._nested, persistent, self._boot_timeout)
        except BaseException:
            self._status = "stopped"
            _live.discard(self)
            raise

    def _make_base(
        self, m: _boot.Machine, vmm: Path, base: Path, kernel: Path, initrd: Path,
        image_file: Path | None,
    ) -> None:  # fmt: skip
        """Boot the guest once, snapshot it idle as the base of its configuration, stop it.

        A VM with an image boots with an empty placeholder disk: the snapshot then restores
        with a fresh disk of any size (the VMM tells the guest the new size).
        """
        progress(
            f"booting a new {self._memory} MiB guest to make its base snapshot "
            "(once per configuration; minutes on emulating hosts)"
        )
        argv = _boot.cold_argv(m, vmm, kernel, initrd, image_file, fresh_disk=False)
        failure = self._spawn(argv, persistent=False)
        if failure is not None:
            raise self._start_failed(failure)
        tmp = snapshots.staging_dir(base)
        try:
            self._command(f"SNAPSHOT {tmp}")
            snapshots.publish(tmp, base, self._meta())
            progress(f"saved the base snapshot {base}; later VMs of this configuration restore it")
        except SmolVMError as e:
            self._teardown(grace=CLOSE_GRACE_S)
            raise VMStartError(
                f"could not save the base snapshot {base}: {e}. Free some disk space, or "
                "pass cold_boot=True to boot without one", vm_id=self._vm_id,
            ) from None  # fmt: skip
        except BaseException:
            self._teardown(grace=0.0)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._teardown(grace=CLOSE_GRACE_S)
        self._status = "created"

    def close(self) -> None:
        """Let go of this handle. An ephemeral VM (a `with` block, or started by run())
        stops; a persistent one (start() outside `with`, or from_id()) keeps running
        until delete(). Idempotent."""
        with self._lock:
            if self._status != "running":
                if self._status == "created":
                    self._status = "stopped"
                return
            self._status = "stopped"
            _live.discard(self)
            if os.getpid() != self._owner_pid:  # a forked child: the VM is not ours
                self._vmm.close_ctl()
                return
            if self._persistent or self._attached:
                self._vmm.close_ctl()  # detached: the VMM does not notice
                return
            self._teardown(grace=CLOSE_GRACE_S)

    def delete(self) -> None:
        """Stop the VM for good and remove everything it left on disk. Idempotent."""
        with self._lock:
            if self._status == "created":
                self._status = "stopped"
                return
            rec = self._record
            if rec is None:
                try:
                    rec = registry.load(self._vm_id)
                except VMNotFoundError:
                    self._status = "stopped"
                    return
            self._status = "stopped"
            _live.discard(self)
            _vmm.stop(rec, self._vmm.pid)
            self._vmm.close_ctl()
            self._vmm.pid = None
            registry.remove(self._vm_id)
            if forks.of(rec.source) is not None:
                forks.collect()  # this VM may have been the last child of its capture

    def stop(self) -> None:
        """Shut the VM down (same as delete(): a stopped microVM keeps nothing worth keeping)."""
        self.delete()

    def pause(self) -> None:
        """Freeze the guest's vCPUs; background processes resume where they were on resume()."""
        self._command("PAUSE")
        self._set_paused(True)

    def resume(self) -> None:
        """Let a paused guest run again."""
        self._command("RESUME")
        self._set_paused(False)

    def vmm_status(self) -> dict[str, str]:
        """How this VM's VMM is confined, as the VMM itself reads its /proc (the host cannot
        see it in the nested profile): Seccomp ("2": filtered), NoNewPrivs, CapEff, CapPrm,
        CapInh, CapBnd, CapAmb, Uid, Gid, Threads of its loop thread; vcpuN.Seccomp of each
        vCPU thread; resolver.Seccomp, .NoNewPrivs and .Cap* of the egress policy's resolver
        thread (only with an allow-list); then its jail: Jail (what it did, comma-separated,
        or "off"), JailSkipped ("-" or what it could not do, e.g. "ns:EPERM"), NsIpc and NsUts
        (namespace inodes) beside NsIpcCaller and NsUtsCaller (those it was started in), Fds
        (its open fds) and RlimitNofile, RlimitCore, RlimitAs ("soft,hard")."""
        self._require_running()
        return dict(kv.split("=", 1) for kv in self._command("STATUS").split())

    def snapshot(self, name: str) -> snapshots.SnapshotInfo:
        """Save this running VM (memory, CPUs, devices) as a named snapshot.

        SmolVM.from_snapshot(name) then gives new sandboxes that start from exactly this
        state in milliseconds, each with its own copy-on-write memory. An existing snapshot
        of that name is replaced.
        """
        self.snapshot_to(snapshots.user_dir(name))
        return snapshots.info(name)

    def snapshot_to(self, final: Path) -> None:
        """snapshot() into the folder final (replaced if present), for callers that keep their
        own snapshots (BrowserSession's browser base snapshots); restore with from_snapshot_dir()."""
        self._require_running()
        tmp = snapshots.staging_dir(final)
        was_paused = self.status == "paused"
        try:
            if self._image is not None and not was_paused:
                self._command("PAUSE")  # the disk copy must match the memory image
            self._command(f"SNAPSHOT {tmp}")
            if self._image is not None:
                disk.copy_sparse(self._vmm.files.disk, tmp / DISK_FILE)
            snapshots.publish(tmp, final, self._meta(), replace=True)
        finally:
            if self._image is not None and not was_paused:
                self._command("RESUME")
            shutil.rmtree(tmp, ignore_errors=True)

    def fork(self, n: int = 1, *, persistent: bool = False) -> builtins.list[SmolVM]:
        """n new sandboxes that start from this instant of this one: same memory, same running
        processes, same files. The VM is paused while its state is captured, then goes on
        (a paused VM stays paused; its children run).

        Each child is a restore of that capture: its own copy-on-write memory, its own sparse
        copy of the disk, fresh entropy, its own vm_id and hostname, a fresh network (passt)
        and no port forwards (expose_local() again in a child). persistent=False children end
        with this process or their `with` block like SmolVM(); persistent=True ones last until
        delete(). A VM restored from a snapshot (any SmolVM(), a child) writes only the pages
        it changed since its restore (self.last_fork says how many); a cold-booted one writes
        its whole memory. The capture's files go when the last child is deleted.
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
            raise ValueError(f"fork(n): n must be a whole number from 1 to 64, got {n!r}")
        with self._lock:
            if self._status != "running":
                self._raise_if_stopped()
                raise VMNotRunningError(f"VM {self._vm_id} is not running: start() it before fork()")
            forks.collect()
            capture = self._capture_for_fork()
        children: builtins.list[SmolVM] = []
        try:
            for _ in range(n):
                child = SmolVM.from_snapshot_dir(capture.path, boot_timeout=self._boot_timeout)
                child._net = self._net
                child._env = self._current_env()
                children.append(child)
            # restores wait mostly on their VMM and agent: start a few at once
            with concurrent.futures.ThreadPoolExecutor(min(n, FORK_START_THREADS)) as pool:
                for done in [pool.submit(c._start, persistent) for c in children]:
                    done.result()
        except BaseException:
            for child in children:
                child.delete()
            raise
        finally:
            forks.done_creating(capture.path)
            if not children or all(c._status != "running" for c in children):
                forks.collect()
        return children

    def _capture_for_fork(self) -> forks.Capture:
        """PAUSE, FORK into a new capture folder, copy the disk, RESUME (lock held)."""
        was_paused = self.status == "paused"
        path = forks.new()
        t0 = time.monotonic()
        try:
            if not was_paused:
                try:
                    self._command("PAUSE")  # the disk copy must match the memory image
                except SmolVMError:
                    self._raise_if_gone()  # a dead VM: VMGoneError naming it
                    raise
            try:
                reply = self._command(f"FORK {path}")
                if self._image is not None:
                    disk.copy_sparse(self._vmm.files.disk, path / DISK_FILE)
            finally:
                if not was_paused:
                    self._command("RESUME")
            wall = time.monotonic() - t0
            (path / snapshots.META).write_text(json.dumps(self._meta(), indent=1))
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        self.last_fork = dataclasses.replace(forks.Capture.parse(path, reply), wall_s=wall)
        return self.last_fork

    @classmethod
    def from_snapshot(cls, name: str, *, boot_timeout: float | None = None) -> SmolVM:
        """A new (not yet started) VM that will start from snapshot `name`."""
        snap = snapshots.info(name)
        vm = cls(memory=snap.memory, vcpus=snap.vcpus, boot_timeout=boot_timeout, image=None)
        vm._image, vm._disk_size = snap.image, snap.disk_size
        vm._net = network.NetworkPolicy.from_dict(snapshots.read_meta(snap.path).get("network"))
        vm._source = snap.path
        return vm

    @classmethod
    def from_snapshot_dir(cls, path: Path, *, boot_timeout: float | None = None) -> SmolVM:
        """A new (not yet started) VM that will start from the snapshot folder written by snapshot_to()."""
        meta = snapshots.read_meta(path)
        image = meta.get("image")
        size = meta.get("disk_size")
        vm = cls(memory=int(str(meta.get("memory", 0))), vcpus=int(str(meta.get("vcpus", 1))),
                 boot_timeout=boot_timeout, image=None)  # fmt: skip
        vm._image = str(image["name"]) if isinstance(image, dict) and "name" in image else None
        vm._disk_size = int(str(size)) if size else None
        vm._source = path
        return vm

    @classmethod
    def from_id(cls, vm_id: str) -> SmolVM:
        """A handle on a running VM, from any process on this machine.

        Raises VMNotFoundError for unknown ids, and for VMs whose VMM has gone
        (their record is cleaned up). close() on the handle leaves the VM running.
        """
        rec = registry.load(vm_id)
        if not registry.alive(rec):
            registry.remove(vm_id)
            raise VMNotFoundError(
                f"VM {vm_id} is gone: its VMM process (pid {rec.pid}) is no longer running; "
                "its record was cleaned up. Start a new SmolVM."
            )
        vm = cls(memory=rec.memory, vcpus=rec.vcpus, image=None)
        image, size = rec.extra.get("image"), rec.extra.get("disk_size")
        vm._image = image if isinstance(image, str) else None
        vm._disk_size = size if isinstance(size, int) else None
        vm._net = network.NetworkPolicy.from_dict(rec.extra.get("network"))
        vm._vm_id = vm_id
        vm._vmm = _vmm.VMMProcess(vm_id, rec.files)
        vm._record = rec
        vm._attached = True
        vm._persistent = rec.persistent
        vm._status = "running"
        return vm

    @staticmethod
    def list() -> list[registry.VMRecord]:
        """The VMs running on this machine (records of VMs whose VMM is gone are removed)."""
        live, _gone = registry.scan()
        return live

    def __del__(self) -> None:
        if getattr(self, "_status", None) == "running":
            try:
                self.close()
            except Exception:
                pass


    # ---- running commands -------------------------------------------------------

    def run(
        self,
        command: str,
        timeout: float = 30,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        input: bytes | str | None = None,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
    ) -> RunResult:
        """Run `/bin/sh -c command` in the guest and return its exit code and output.

        The command sees the variables of set_env(), then `env` on top; it runs in `cwd`
        (an absolute guest path; default "/"; a missing one raises FileNotFoundError).
        `input` (bytes, or str as UTF-8) is its stdin, else stdin is /dev/null.
        on_stdout/on_stderr are called with each chunk of output (bytes) as it arrives, in
        this thread; an exception in one kills the command and propagates. When `timeout`
        (seconds) passes, the command's process group is killed and the result has
        timed_out=True, exit_code=124 and the output so far; the VM stays usable. Starts
        the VM first if needed. Raises VMGoneError if the VM died.
        """
        call = _stream.check(command, timeout, env, cwd, input, on_stdout, on_stderr)
        req = self._request(call)
        if call.streams:
            return _stream.run(self, req, call.data, call.on_stdout, call.on_stderr)
        return _agent.run(req, self._vm_id, self._raise_if_gone)

    def stream(
        self, command: str, timeout: float = 30, **options: Unpack[_stream.StreamOptions]
    ) -> Iterator[_stream.StreamItem]:
        """Run a command like run() (with its env, cwd and input), yielding its output as it arrives.

        >>> for item in vm.stream("pip install rich"):
        ...     if isinstance(item, RunResult): print(item.exit_code)
        ...     else: kind, chunk = item   # kind is "stdout" or "stderr", chunk is bytes

        Yields ("stdout" | "stderr", bytes) tuples in arrival order, then the RunResult
        (with the whole output). Leaving the loop early kills the command.
        """
        for name in ("on_stdout", "on_stderr"):
            if name in options:
                raise TypeError(f"stream() got an unexpected keyword argument {name!r}")
        call = _stream.check(command, timeout, **options)
        return _stream.chunks(self, self._request(call), call.data)

    def pty(
        self,
        cmd: str = "bash",
        rows: int = 24,
        cols: int = 80,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        *,
        timeout: float | None = None,
    ) -> _pty.PtySession:
        """Start `/bin/sh -c cmd` on a new guest terminal of rows x cols and return the session.

        >>> with vm.pty("bash") as t:
        ...     t.write("tty; exit 7\n"); print(t.wait(), t.read())

        The command leads a new session whose controlling terminal, stdin, stdout and stderr
        is the pty (TERM=xterm-256color unless env sets it; env and cwd as in run()).
        write() types, read() returns output as it comes (stdout and stderr are one
        stream), resize() changes the size, wait() gives the exit code, close() (or leaving
        `with`) kills every process of the session. timeout (seconds, default none) kills
        it like run()'s. Starts the VM first if needed.
        """
        return _pty.open_sync(self, cmd, rows, cols, env, cwd, timeout)

    def _request(self, call: _stream.Call) -> _stream.ExecRequest:
        """Start the VM if needed, and give the request to send for a checked command."""
        self._running()
        env = _validate.env({**self._current_env(), **call.env})
        return _agent.exec_request(self._vmm.files.vsock, call.command, call.timeout_ms, call.cwd, env)

    def _exec_failed(self, e: BaseException, req: _stream.ExecRequest) -> BaseException:
        """The exception a failed exec means (smolvm/_agent.py maps it)."""
        return _agent.agent_error(e, self._vm_id, self._raise_if_gone, req=req)

    def set_env(self, env: Mapping[str, str | None]) -> None:
        """Set variables for every later run() of this VM (None removes one).

        They are kept with the VM: handles from SmolVM.from_id() in other processes see them.
        """
        if not isinstance(env, Mapping):
            raise TypeError(f"env must be a mapping of str to str, not {type(env).__name__}")
        _validate.env({k: v for k, v in env.items() if v is not None})

        def update(current: dict[str, str]) -> None:
            for key, val in env.items():
                if val is None:
                    current.pop(key, None)
                else:
                    current[key] = val

        self._update_env(update)

    def set_env_vars(self, env_vars: Mapping[str, str], *, merge: bool = True) -> builtins.list[str]:
        """Set variables for every later run() (the original smolvm's name for set_env).

        merge=False replaces all variables set before. Returns the sorted names now set.
        """
        if not isinstance(env_vars, Mapping):
            raise TypeError(f"env_vars must be a mapping of str to str, not {type(env_vars).__name__}")
        _validate.env(env_vars)

        def update(current: dict[str, str]) -> None:
            if not merge:
                current.clear()
            current.update(env_vars)

        return sorted(self._update_env(update))

    def unset_env_vars(self, keys: Iterable[str]) -> dict[str, str]:
        """Remove variables set with set_env()/set_env_vars(); returns the removed ones with
        the values they had (names that were not set are skipped)."""
        if isinstance(keys, str):
            keys = [keys]
        names = builtins.list(keys)
        for key in names:
            if not isinstance(key, str):
                raise TypeError(f"keys must be str, got {key!r}")
        removed: dict[str, str] = {}

        def update(current: dict[str, str]) -> None:
            for key in names:
                if key in current:
                    removed[key] = current.pop(key)

        self._update_env(update)
        return removed

    def list_env_vars(self) -> dict[str, str]:
        """The variables set with set_env()/set_env_vars() (what every run() gets)."""
        return dict(self._current_env())

    def _update_env(self, update: Callable[[dict[str, str]], None]) -> dict[str, str]:
        """Apply update() to the VM's variables and keep the result (in the VM's record when
        other processes share it). Returns the new variables."""
        with self._lock:
            merged = dict(self._current_env())
            update(merged)
            self._env = merged
            if self._record is not None and self._status == "running":
                try:
                    rec = registry.load(self._vm_id)
                except VMNotFoundError:
                    return dict(merged)
                rec.extra["env"] = merged
                registry.save(rec)
                self._record = rec
            return dict(merged)


    def upload_file(
        self, local_path: str | os.PathLike[str], guest_path: str, *,
        mode: int | None = None, make_dirs: bool = True, timeout: float = TRANSFER_TIMEOUT_S,
    ) -> int:  # fmt: skip
        """Copy a host file into the guest at guest_path (absolute; ending in "/" it names
        a folder and the local file's name is added).

        The guest file appears whole or not at all, with `mode` (default: the local file's
        permission bits). Missing guest folders are made (`mkdir -p`) unless make_dirs=False,
        which raises FileNotFoundError naming the missing folder. Returns the bytes copied.
        Raises FileNotFoundError naming a missing local file, OSError for other guest
        errors (ENOSPC...).
        """
        local, gpath, mode, t_ms = _agent.checked_upload_args(local_path, guest_path, mode, timeout)
        self._running()

        def mkdir(command: str) -> RunResult:
            return self.run(command, timeout=t_ms / 1000)

        return _agent.upload(
            self._vmm.files.vsock, self._vm_id, self._raise_if_gone, local, gpath, mode, t_ms,
            mkdir if make_dirs else None,
        )  # fmt: skip

    def download_file(
        self, guest_path: str, local_path: str | os.PathLike[str], *,
        make_dirs: bool = True, timeout: float = TRANSFER_TIMEOUT_S,
    ) -> Path:  # fmt: skip
        """Copy the guest file guest_path (absolute) to local_path on the host (an existing
        folder, or a path ending in "/", gets the guest file's name added).

        The local file appears whole or not at all. Missing local folders are made unless
        make_dirs=False. Returns the local path. Raises FileNotFoundError naming the guest
        path (or, with make_dirs=False, the missing local folder).
        """
        gpath, local, t_ms = _agent.checked_download_args(guest_path, local_path, make_dirs, timeout)
        self._running()
        _agent.download(self._vmm.files.vsock, self._vm_id, self._raise_if_gone, gpath, local, t_ms)
        return local

    # ---- ports into the guest (smolvm/ports.py) ------------------------------------

    def expose_local(self, guest_port: int, host_port: int | None = None, **_compat: object) -> int:
        """Forward 127.0.0.1:host_port on the host to the guest's 127.0.0.1:guest_port.

        host_port=None picks a free port. Returns the host port. The VMM owns the
        listener: it lasts as long as the VM (also after this process exits, for a
        persistent VM) and other handles see it; it is not part of snapshots.
        Raises PortInUseError if host_port is taken. Works without guest networking.
        """
        return self._ports(lambda ctl: ports.expose(ctl, self._vm_id, guest_port, host_port))

    def unexpose_local(self, port: int, guest_port: int | None = None) -> SmolVM:
        """Close a forward: unexpose_local(host_port, guest_port), or one port number (the
        forward on that host port, else every forward of that guest port). Connections
        already open go on until they end. Raises PortNotExposedError if none matches."""
        self._ports(lambda ctl: ports.unexpose(ctl, self._vm_id, port, guest_port))
        return self

    def exposed_ports(self) -> builtins.list[ports.ExposedPort]:
        """The VM's forwards as (host_port, guest_port) pairs."""
        return self._ports(ports.exposed)

    def _ports(self, fn: Callable[[Path], _T]) -> _T:
        self._running()
        try:
            return fn(self._vmm.files.ctl)
        except OSError as e:
            if isinstance(e, SmolVMError):
                raise
            self._raise_if_gone()
            raise SmolVMError(f"VM {self._vm_id}: control socket failed: {e}") from e

    def wait_for_ready(self, timeout: float = 60.0) -> SmolVM:
        """Wait until the guest agent runs commands (a no-op command answers); returns self.

        start() already waits for the agent, so this returns at once for a VM this process
        started; it helps with a handle from from_id() on a VM that is still busy. Like
        run(), it starts a never-started VM. Raises AgentError after `timeout` seconds.
        """
        deadline = time.monotonic() + _validate.seconds("timeout", timeout, _validate.TIMEOUT_MAX_S)
        while True:
            left = deadline - time.monotonic()
            try:
                self.run("true", timeout=max(left, 0.001))
                return self
            except AgentError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    # ---- internals ------------------------------------------------------------------

    def _current_env(self) -> dict[str, str]:
        """set_env()'s variables; a VM shared between processes keeps them in its record."""
        if (self._attached or self._persistent) and self._status == "running":
            try:
                env = registry.load(self._vm_id).extra.get("env")
            except VMNotFoundError:
                env = None
            if isinstance(env, dict):
                return {str(k): str(v) for k, v in env.items()}
        return dict(self._env)

    def _running(self) -> None:
        """Start a never-started VM (ephemeral, as run() does); raise if it is not running."""
        if self._status == "created":
            self._start(persistent=False)
        self._require_running()

    def _raise_if_stopped(self) -> None:
        if self._gone is not None:
            raise VMGoneError(
                str(self._gone),
                exit_reason=self._gone.exit_reason,
                console_tail=self._gone.console_tail,
                vm_id=self._vm_id,
            )
        if self._status == "stopped":
            raise VMNotRunningError(f"VM {self._vm_id} was closed; create a new SmolVM")

    def _meta(self) -> dict[str, object]:
        return _boot.meta(
            self._vm_id, self._memory, self._vcpus, self._profile, self._net, self._image,
            self._disk_size,
        )  # fmt: skip

    def _command(self, line: str) -> str:
        """A control command to this VM's VMM (PAUSE, RESUME, SNAPSHOT dir, DETACH, STOP)."""
        try:
            return self._vmm.command(line)
        except _ctl.ControlError as e:
            raise SmolVMError(f"VM {self._vm_id}: {line.split()[0]} failed: {e}") from None
        except OSError as e:
            if self._attached or self._persistent:
                raise VMGoneError(
                    f"VM {self._vm_id} is gone (its control socket: {e}); start a new SmolVM",
                    vm_id=self._vm_id,
                ) from None
            self._raise_if_gone()
            raise SmolVMError(f"VM {self._vm_id}: control socket failed: {e}") from e

    def _require_running(self) -> None:
        if self._status != "running":
            self._raise_if_stopped()
            raise VMNotRunningError(f"VM {self._vm_id} is not running; call start() first")

    def _set_paused(self, paused: bool) -> None:
        if self._record is None:
            return
        try:
            rec = registry.load(self._vm_id)
        except VMNotFoundError:
            return
        rec.extra["paused"] = paused
        registry.save(rec)
        self._record = rec

    def _start_failed(self, why: str) -> VMStartError:
        return self._vmm.start_failed(why, self._teardown(grace=CLOSE_GRACE_S, keep_logs=True))

    def _raise_if_gone(self) -> None:
        """After a transport failure (never after an agent's ERROR frame, which proves the VM
        alive): if the VMM has ended, clean up and raise VMGoneError."""
        with self._lock:
            if self._gone is None and self._status == "running":
                self._probe_gone()
            if self._gone is not None or self._status == "stopped":
                self._raise_if_stopped()

    def _probe_gone(self) -> None:
        if self._attached or self._persistent:
            rec = self._record  # not this process's VMM: alive is what the registry's pid check says
            if rec is not None and registry.alive(rec):
                return
            self._status = "stopped"
            _live.discard(self)
            self._gone = self._vmm.gone_detached_error()
            registry.remove(self._vm_id)
            return
        exit_line = self._vmm.ended()
        if exit_line is None:
            return  # the VMM is alive: the failure was the agent's
        status = self._teardown(grace=CLOSE_GRACE_S, keep_logs=True)
        self._gone = self._vmm.gone_error(exit_line, status)

    def _teardown(self, grace: float, keep_logs: bool = False) -> int | None:
        """Close ctl, reap (SIGKILL after grace), read tails, remove the state dir."""
        self._status = "stopped"
        _live.discard(self)
        status = self._vmm.teardown(grace, keep_logs)
        if forks.of(self._source) is not None and os.getpid() == self._owner_pid:
            forks.collect()  # this VM may have been the last child of its capture
        return status


def _close_all() -> None:
    for vm in list(_live):
        try:
            vm.close()
        except Exception:
            pass


_sigterm_watched = False


def _on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM (a Jupyter kernel restart that timed out, `kill`, a supervisor): close this
    process's ephemeral VMs (their VMMs would end anyway, but leave their state folders),
    then die of the signal as if no handler had been there."""
    _close_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _watch_sigterm() -> None:
    """Once, when this process starts its first ephemeral VM from the main thread: take
    SIGTERM if nobody else did (its disposition is still the default)."""
    global _sigterm_watched
    if _sigterm_watched or threading.current_thread() is not threading.main_thread():
        return
    _sigterm_watched = True
    try:
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # an embedded interpreter without signal handling
        pass


def _forget_in_child() -> None:
    """After fork(): the child must not keep the parent's VMs alive or tear them down."""
    for vm in list(_live):
        vm._lock = threading.RLock()  # another thread may have held it at fork time
        vm._vmm.close_ctl()
        vm._status = "stopped"
        vm._vmm.pid = None
        _live.discard(vm)


atexit.register(_close_all)
os.register_at_fork(after_in_child=_forget_in_child)

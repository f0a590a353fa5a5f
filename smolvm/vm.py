"""SmolVM: one microVM in its own smolvm-vmm process, running shell commands through the guest agent."""

from __future__ import annotations

import atexit
import builtins
import errno
import os
import secrets
import shlex
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from . import _ctl, _process, _stream, _validate, disk, hostvm, network, ports, registry, snapshots
from ._aio import AsyncMixin
from ._native import native, vmm_path
from ._paths import home
from .build._cache import progress
from .build.image import DEFAULT_IMAGE
from .errors import (
    AgentError,
    SmolVMError,
    SnapshotError,
    VMGoneError,
    VMNotFoundError,
    VMNotRunningError,
    VMStartError,
)
from .info import VMInfo, VMState
from .kvm import check_kvm
from .profile import Profile, detect, kernel_cmdline
from .result import RunResult

HOST_GRACE_MS = 30_000  # the host gives the agent this long past the command's own timeout
CLOSE_GRACE_S = 5.0  # after closing the ctl socket, wait this long before SIGKILL
GONE_PROBE_S = 2.0  # how long a failed run waits to learn whether the VMM has ended
UDS_MAX = 107 - 8  # sun_path holds 107 bytes; leave room for the VMM's "_<port>" listeners
KEEP_FAILED_LOGS = 10
SETUP_ENTROPY_BYTES = 64
SETUP_TIMEOUT_MS = 120_000  # the first setup of a disk VM mounts its root: guest kernel work
DEFAULT_DISK_MIB = 1024
DISK_FILE = "disk.img"  # in the VM's state folder, and in a snapshot taken of a VM with a disk
IMAGE_ARG = "smolvm.image=vda"  # kernel command line: the agent mounts /dev/vda as the image
TRANSFER_TIMEOUT_S = 600.0
CTL_TIMEOUT_S = 120.0  # a snapshot writes guest memory: allow for slow disks

_live: weakref.WeakSet[SmolVM] = weakref.WeakSet()
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
    smolvm-vmm process and dies with close(), garbage collection, interpreter exit, or
    the death of this process (the VMM exits when its control socket closes).
    run() may be called from several threads at once.
    """

    def __init__(
        self,
        memory: int = 512,
        vcpus: int = 1,
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
        self._image, self._disk_size = _image_and_disk(image, disk_size)
        self._net = network.policy(internet, internet_settings, extra_hosts)  # smolvm/network.py
        self._env: dict[str, str] = {}
        self._vm_id = "vm-" + secrets.token_hex(6)
        self._lock = threading.RLock()
        self._owner_pid = os.getpid()
        self._pid: int | None = None
        self._ctl_fd = -1
        self._state_dir = registry.vms_root() / self._vm_id
        self._gone: VMGoneError | None = None
        self._profile: Profile | None = None
        self._boot_time: float | None = None

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
            created=rec.created if rec is not None else None,
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
        """The network policy fixed at creation: {"mode": "open" | "off", "extra_hosts": {...}}."""
        return self._net.to_dict()

    @property
    def env(self) -> dict[str, str]:
        """Variables set with set_env(), given to every later run()."""
        return dict(self._current_env())

    @property
    def pid(self) -> int | None:
        """The VMM process id while the VM runs."""
        return self._pid if self._status == "running" else None

    @property
    def state_dir(self) -> Path:
        """$SMOLVM_HOME/vms/<vm_id>: vsock socket, console log; removed when the VM stops."""
        return self._state_dir

    @property
    def console_log(self) -> Path:
        """The guest's serial console, written by the VMM while the VM runs."""
        return self._state_dir / "console.log"

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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
            if self._source is None:
                kernel, initrd, image_file = self._artifacts()
                cmdline = boot_cmdline(self._profile, image_file)
                if self._cold_boot:
                    argv = self._argv(vmm, kernel, initrd, cmdline, image_file, fresh_disk=True)
                else:
                    key = base_key(
                        kernel, initrd, image_file, self._memory, self._vcpus, vmm, self._profile,
                        self._net.enabled,
                    )
                    base = snapshots.base_dir(key)
                    if not snapshots.complete(base) or self._damaged_base(base):
                        self._make_base(vmm, base, kernel, initrd, cmdline, image_file)
                    self._source = base
            if self._source is not None:
                self._status = "stopped"  # a damaged snapshot ends this VM before it starts
                snapshots.check(
                    self._source, f"snapshot {self._source.name!r}",
                    f"delete it (`smolvm snapshot rm {self._source.name}`) and take it again",
                )  # fmt: skip
                self._status = "created"
                argv = self._restore_argv(vmm, self._source)
            t0 = time.monotonic()
            failure = self._spawn(vmm, argv, persistent)
            try:
                if failure is None:
                    self._setup_guest()
                    if persistent:
                        self._command("DETACH")
            except BaseException:  # Ctrl-C during boot, or a failed setup: leave nothing behind
                self._teardown(grace=0.0)
                raise
            if failure is not None:
                raise self._start_failed(failure)
            self._boot_time = time.monotonic() - t0
            self._status = "running"
            self._record = registry.VMRecord(
                vm_id=self._vm_id, pid=self._pid or 0,
                pid_start=registry.process_start(self._pid or 0) or 0,
                memory=self._memory, vcpus=self._vcpus, persistent=persistent,
                owner_pid=os.getpid(), created=time.time(),
                source=str(self._source or ""),
                extra={"image": self._image, "disk_size": self._disk_size, "env": self._env,
                       "network": self._net.to_dict()},
            )  # fmt: skip
            registry.save(self._record)
            _live.add(self)
            return self

    def _spawn(self, vmm: Path, argv: list[str], persistent: bool) -> str | None:
        """Start the VMM and wait for its guest agent: None, or why it failed (VMM still to reap)."""
        t0 = time.monotonic()
        try:
            argv = hostvm.vmm_command(argv, self._nested)
            pid, self._ctl_fd = native().spawn_vmm(
                argv, stderr_path=str(self._state_dir / "vmm.stderr")
            )
        except SmolVMError as e:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            self._status = "stopped"
            raise VMStartError(str(e), vm_id=self._vm_id) from e
        except OSError as e:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            self._status = "stopped"
            raise VMStartError(f"could not start {vmm}: {e}", vm_id=self._vm_id) from e
        self._pid = pid
        try:
            if persistent:
                _process.reap(pid, CLOSE_GRACE_S)  # the daemonizing parent exits at once
                self._pid = None
            return self._wait_ready(t0 + self._boot_timeout)
        except BaseException:
            self._teardown(grace=0.0)
            raise

    def _make_base(
        self, vmm: Path, base: Path, kernel: Path, initrd: Path, cmdline: str,
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
        argv = self._argv(vmm, kernel, initrd, cmdline, image_file, fresh_disk=False)
        failure = self._spawn(vmm, argv, persistent=False)
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
                self._close_ctl()
                return
            if self._persistent or self._attached:
                self._close_ctl()  # detached: the VMM does not notice
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
            _stop_vmm(rec, self._ctl_fd, self._pid)
            self._close_ctl()
            self._pid = None
            registry.remove(self._vm_id)

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
                disk.copy_sparse(self._state_dir / DISK_FILE, tmp / DISK_FILE)
            snapshots.publish(tmp, final, self._meta(), replace=True)
        finally:
            if self._image is not None and not was_paused:
                self._command("RESUME")
            shutil.rmtree(tmp, ignore_errors=True)

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
        vm._state_dir = rec.dir
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
        data = _stream.input_bytes(input)
        out_cb = _stream.callback("on_stdout", on_stdout)
        err_cb = _stream.callback("on_stderr", on_stderr)
        req = self._exec_request(command, timeout, env, cwd)
        if data is not None or out_cb is not None or err_cb is not None:
            return _stream.run(self, req, data, out_cb, err_cb)
        nat = native()
        try:
            code, sig, out, err, timed_out = nat.exec(
                req.uds, nat.AGENT_PORT, req.command, req.cwd, req.env, req.timeout_ms,
                req.host_timeout_ms,
            )  # fmt: skip
        except (OSError, nat.ProtocolError) as e:
            raise self._exec_failed(e, req) from None
        return RunResult.from_bytes(
            code, out, err, req.elapsed(), timed_out=bool(timed_out), signal=sig
        )

    def stream(
        self,
        command: str,
        timeout: float = 30,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        input: bytes | str | None = None,
    ) -> Iterator[_stream.StreamItem]:
        """Run a command like run(), yielding its output as it arrives.

        >>> for item in vm.stream("pip install rich"):
        ...     if isinstance(item, RunResult): print(item.exit_code)
        ...     else: kind, chunk = item   # kind is "stdout" or "stderr", chunk is bytes

        Yields ("stdout" | "stderr", bytes) tuples in arrival order, then the RunResult
        (with the whole output). Leaving the loop early kills the command.
        """
        data = _stream.input_bytes(input)
        req = self._exec_request(command, timeout, env, cwd)
        return _stream.chunks(self, req, data)

    def _exec_request(
        self, command: str, timeout: float, env: Mapping[str, str] | None, cwd: str | None
    ) -> _stream.ExecRequest:
        """Check a command's arguments, start the VM if needed, and give the request to send."""
        cmd = _validate.command(command)
        t_ms = _validate.timeout_ms(timeout)
        _validate.env(env)
        cwd_s = _validate.cwd(cwd)
        if self._status == "created":
            self._start(persistent=False)
        self._require_running()
        env_list = _validate.env({**self._current_env(), **(env or {})})
        return _stream.ExecRequest(
            str(self._state_dir / "vsock.sock"), cmd, cwd_s, env_list, t_ms, t_ms + HOST_GRACE_MS
        )

    def _exec_failed(self, e: BaseException, req: _stream.ExecRequest) -> BaseException:
        """The exception a failed exec means. An ERROR frame proves the VM alive; only a
        transport failure asks whether the VMM has ended (and raises VMGoneError if so)."""
        nat = native()
        if isinstance(e, nat.ProtocolError):
            err = getattr(e, "guest_errno", 0)
            if getattr(e, "guest_code", 0) == nat.ERRC_CWD and err:
                kind = {errno.ENOENT: FileNotFoundError, errno.ENOTDIR: NotADirectoryError}.get(err, OSError)
                return kind(err, f"cwd is not a folder in the guest of {self._vm_id}", req.cwd)
            return AgentError(f"the guest agent of {self._vm_id} failed the request: {e}")
        self._raise_if_gone()
        if isinstance(e, TimeoutError):
            return AgentError(
                f"the guest agent of {self._vm_id} did not answer within "
                f"{req.host_timeout_ms / 1000:.0f} s (timeout + {HOST_GRACE_MS // 1000} s grace)"
            )
        return AgentError(f"lost the connection to the guest agent of {self._vm_id}: {e}")

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
        local = _validate.local_path(local_path)
        if isinstance(guest_path, str) and guest_path.endswith("/") and guest_path.strip("/"):
            guest_path = guest_path + local.name
        gpath = _validate.guest_path(guest_path)
        t_ms = _validate.timeout_ms(timeout)
        if not local.exists():
            raise FileNotFoundError(2, "No such file on the host", str(local))
        if not local.is_file():
            raise IsADirectoryError(21, "Not a regular file on the host", str(local))
        if mode is None:
            mode = local.stat().st_mode & 0o7777
        elif isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise ValueError(f"mode must be permission bits between 0 and 0o7777, got {mode!r}")
        uds = self._transfer_uds()
        nat = native()
        try:
            try:
                return int(nat.put_file(uds, nat.AGENT_PORT, str(local), gpath, mode, t_ms))
            except FileNotFoundError as e:
                folder = gpath.rstrip("/").rsplit("/", 1)[0] or "/"
                if not make_dirs or e.filename != gpath:
                    raise
                made = self.run(f"mkdir -p -- {shlex.quote(folder)}", timeout=t_ms / 1000)
                if not made.ok:
                    raise FileNotFoundError(
                        2, f"cannot make the guest folder: {made.stderr.strip()}", folder
                    ) from None
                return int(nat.put_file(uds, nat.AGENT_PORT, str(local), gpath, mode, t_ms))
        except nat.ProtocolError as e:
            raise AgentError(f"upload of {local} to {self._vm_id}:{gpath} failed: {e}") from None
        except (TimeoutError, ConnectionError) as e:
            self._raise_if_gone()
            raise AgentError(f"upload of {local} to {self._vm_id}:{gpath} failed: {e}") from None

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
        gpath = _validate.guest_path(guest_path)
        raw = os.fspath(local_path) if isinstance(local_path, (str, os.PathLike)) else local_path
        local = _validate.local_path(local_path)
        t_ms = _validate.timeout_ms(timeout)
        if local.is_dir() or (isinstance(raw, str) and raw.endswith("/")):
            local = local / gpath.rstrip("/").rsplit("/", 1)[-1]
        if make_dirs:
            local.parent.mkdir(parents=True, exist_ok=True)
        if not local.parent.is_dir():
            raise FileNotFoundError(2, "No such folder on the host", str(local.parent))
        uds = self._transfer_uds()
        nat = native()
        tmp = local.parent / f".{local.name}.smolvm-{secrets.token_hex(4)}"
        try:
            _size, mode = nat.get_file(uds, nat.AGENT_PORT, gpath, str(tmp), t_ms)
            os.chmod(tmp, mode & 0o777)
            os.replace(tmp, local)
        except nat.ProtocolError as e:
            raise AgentError(f"download of {self._vm_id}:{gpath} failed: {e}") from None
        except (TimeoutError, ConnectionError) as e:
            self._raise_if_gone()
            raise AgentError(f"download of {self._vm_id}:{gpath} failed: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)
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
        if self._status == "created":
            self._start(persistent=False)
        self._require_running()
        try:
            return fn(self._state_dir / "ctl.sock")
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

    def _transfer_uds(self) -> str:
        if self._status == "created":
            self._start(persistent=False)
        self._require_running()
        return str(self._state_dir / "vsock.sock")

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

    def _artifacts(self) -> tuple[Path, Path, Path | None]:
        """Kernel, initramfs and root image (None without one), built on first use."""
        try:
            if self._kernel is not None:
                kernel = self._kernel
            else:
                from .build.kernel import ensure_kernel

                kernel = ensure_kernel() / "vmlinux"
            image_file = None
            if self._image is not None:
                from .build.image import ensure_image

                image_file = ensure_image(self._image)
            if self._initrd is not None:
                initrd = self._initrd
            else:
                from .build.initramfs import ensure_initramfs

                initrd = ensure_initramfs(with_busybox=self._image is None)
        except SmolVMError:
            raise
        except LookupError as e:
            raise VMStartError(str(e), vm_id=self._vm_id) from None
        except Exception as e:
            raise VMStartError(f"could not build the guest kernel, initramfs or image: {e}") from e
        return kernel, initrd, image_file

    def _argv(
        self, vmm: Path, kernel: Path, initrd: Path, cmdline: str, image_file: Path | None,
        fresh_disk: bool,
    ) -> builtins.list[str]:  # fmt: skip
        """A cold boot. fresh_disk: the VM's real disk; else an empty placeholder (base boots)."""
        self._check_uds()
        self._state_dir.mkdir(parents=True, exist_ok=False)
        argv = [
            str(vmm),
            "--kernel", str(kernel),
            "--initrd", str(initrd),
            "--cmdline", cmdline,
            "--mem-mib", str(self._memory),
            "--vcpus", str(self._vcpus),
            *self._common_argv(),
        ]  # fmt: skip
        if image_file is not None:
            target = self._make_disk(None, fresh=fresh_disk)
            argv += ["--disk", f"{image_file},ro", "--disk", str(target)]
        return argv

    def _restore_argv(self, vmm: Path, snap: Path) -> builtins.list[str]:
        self._check_uds()
        meta = snapshots.read_meta(snap)
        image = meta.get("image")
        argv = [str(vmm), "--restore", str(snap), *self._common_argv()]
        if not isinstance(image, dict):
            self._state_dir.mkdir(parents=True, exist_ok=False)
            return argv
        image_file = self._snapshot_image(image)
        if image_file is None:
            image_file = Path(str(image.get("path", "")))
            raise SnapshotError(
                f"snapshot {snap.name!r} was taken with the image {image.get('name')!r} at "
                f"{image_file}, which has since been rebuilt or removed; take the snapshot again"
            )
        self._state_dir.mkdir(parents=True, exist_ok=False)
        saved = snap / DISK_FILE  # a user snapshot's disk; a base snapshot has none
        target = self._make_disk(saved if saved.exists() else None, fresh=True)
        return argv + ["--disk", f"{image_file},ro", "--disk", str(target)]

    @staticmethod
    def _snapshot_image(image: dict[object, object]) -> Path | None:
        """The image file a snapshot was taken with, if it is still there unchanged: at the
        path recorded, or where the image of that name lives now (the same file reached
        through another $SMOLVM_HOME path, e.g. a symlinked cache)."""
        from .build.image import image_path

        candidates = [Path(str(image.get("path", "")))]
        name = image.get("name")
        if isinstance(name, str):
            try:
                candidates.insert(0, image_path(name))
            except (SmolVMError, ValueError, OSError):
                pass  # no image of that name now: only the recorded path can still match
        for cand in candidates:
            try:
                if snapshots.file_ident(cand).decode() == str(image.get("ident", "")):
                    return cand
            except OSError:
                continue
        return None

    def _make_disk(self, saved: Path | None, fresh: bool) -> Path:
        """The VM's disk in its state folder: a copy of a snapshot's, a new one of disk_size
        MiB (fresh), or an empty placeholder. On failure the state folder goes too."""
        target = self._state_dir / DISK_FILE
        try:
            if saved is not None:
                disk.copy_sparse(saved, target)
            elif fresh:
                assert self._disk_size is not None
                disk.create(target, self._disk_size)
            else:
                disk.placeholder(target)
        except BaseException:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            raise
        return target

    def _check_uds(self) -> None:
        uds = self._state_dir / "vsock.sock"
        if len(os.fsencode(uds)) > UDS_MAX:
            raise VMStartError(
                f"the VM socket path {uds} is too long for a Unix socket "
                f"({len(os.fsencode(uds))} > {UDS_MAX} bytes): set SMOLVM_HOME to a shorter folder"
            )

    def _common_argv(self) -> builtins.list[str]:
        argv = [
            "--vsock-uds", str(self._state_dir / "vsock.sock"),
            "--console", str(self.console_log),
            "--ctl-fd", "3",
            "--ctl-listen", str(self._state_dir / "ctl.sock"),
            *network.vmm_args(self._net, nested=self._nested),
        ]  # fmt: skip
        if self._persistent:
            argv.append("--daemonize")
        if self._profile is not None:
            argv += self._profile.vmm_args
        return argv

    @staticmethod
    def _damaged_base(base: Path) -> bool:
        """A base snapshot that fails its checks is removed (and the guest booted anew)."""
        why = snapshots.problem(base)
        if why is None:
            return False
        progress(f"the base snapshot {base} is damaged ({why}); removing it and booting")
        shutil.rmtree(base, ignore_errors=True)
        return True

    def _meta(self) -> dict[str, object]:
        meta: dict[str, object] = {
            "memory": self._memory, "vcpus": self._vcpus, "created": time.time(),
            "source_vm": self._vm_id,
            "profile": self._profile.name if self._profile else "",
            "network": self._net.to_dict(),
        }  # fmt: skip
        if self._image is not None:
            from .build.image import image_path

            path = image_path(self._image)
            meta["image"] = {"name": self._image, "path": str(path.resolve()), "ident": snapshots.file_ident(path).decode()}
            meta["disk_size"] = self._disk_size
        return meta

    def _setup_guest(self) -> None:
        """Give the guest its own entropy, the host's clock and its vm_id as hostname."""
        nat = native()
        flags = nat.SETUP_ROOT if self._image is not None else 0
        extra = network.setup_data(self._net) if self._net.enabled else b""
        try:
            nat.setup(
                str(self._state_dir / "vsock.sock"), nat.AGENT_PORT, time.time_ns(),
                secrets.token_bytes(SETUP_ENTROPY_BYTES), self._vm_id, SETUP_TIMEOUT_MS,
                flags | (network.SETUP_NET if extra else 0), extra,
            )  # fmt: skip
        except (OSError, nat.ProtocolError) as e:
            raise VMStartError(
                f"VM {self._vm_id}: the guest agent refused its setup: {e}", vm_id=self._vm_id
            ) from e

    def _command(self, line: str) -> str:
        """A control command to this VM's VMM (PAUSE, RESUME, SNAPSHOT dir, DETACH, STOP)."""
        try:
            return _ctl.command(self._state_dir / "ctl.sock", line, CTL_TIMEOUT_S)
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

    def _wait_ready(self, deadline: float) -> str | None:
        """Read ctl lines until READY; return None, or why the boot failed."""
        nat = native()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return f"the guest agent was not ready within {self._boot_timeout:.0f} s (SMOLVM_BOOT_TIMEOUT)"
            line = nat.wait_line(self._ctl_fd, left)
            if line is None:
                continue
            if line == b"":
                return "the VMM process ended during boot"
            if line.strip() == b"READY":
                return None
            if line.startswith(b"PID "):
                self._pid = int(line.split()[1])  # the daemonized VMM's own pid
                continue
            parsed = _process.parse_exit_line(line)
            if parsed is not None:
                reason, message = parsed
                return f"the VM stopped during boot ({reason}{': ' + message if message else ''})"
            # Other lines are informational; ignore them.

    def _start_failed(self, why: str) -> VMStartError:
        status = self._teardown(grace=CLOSE_GRACE_S, keep_logs=True)
        console, stderr = self._last_tails
        how = _process.describe_status(status)
        msg = (
            f"VM {self._vm_id} failed to start: {why}; the VMM {how}.{self._kept_note()}\n"
            + _process.format_tails(console, stderr)
        )
        return VMStartError(msg, console_tail=console, vm_id=self._vm_id)

    def _raise_if_gone(self) -> None:
        """After a failed exec: if the VMM has ended, clean up and raise VMGoneError."""
        with self._lock:
            if self._gone is None and self._status == "running":
                self._probe_gone()
            if self._gone is not None or self._status == "stopped":
                self._raise_if_stopped()

    def _probe_gone(self) -> None:
        if self._attached or self._persistent:
            self._probe_gone_detached()
            return
        nat = native()
        reason, message, eof = "", "", False
        deadline = time.monotonic() + GONE_PROBE_S
        while time.monotonic() < deadline:
            line = nat.wait_line(self._ctl_fd, 0.1)
            if line == b"":
                eof = True
                break
            if line:
                parsed = _process.parse_exit_line(line)
                if parsed is not None:
                    reason, message = parsed
        if not eof:
            assert self._pid is not None
            exited, _ = _process.poll_exit(self._pid)
            if not exited:
                return  # the VMM is alive: the failure was the agent's
        status = self._teardown(grace=CLOSE_GRACE_S, keep_logs=True)
        console, stderr = self._last_tails
        how = _process.describe_status(status)
        if reason:
            exit_reason = f"{reason}: {message}" if message else reason
            why = f"the VM stopped ({exit_reason}) and its VMM process {how}"
        else:
            exit_reason = how
            why = f"its VMM process (pid {self._pid}) {how}"
        msg = (
            f"VM {self._vm_id} is gone: {why}. Create a new SmolVM to continue.{self._kept_note()}\n"
            + _process.format_tails(console, stderr)
        )
        self._gone = VMGoneError(
            msg, exit_reason=exit_reason, console_tail=console, vm_id=self._vm_id
        )

    def _probe_gone_detached(self) -> None:
        """A VM this process does not own: alive is what the registry's pid check says."""
        rec = self._record
        if rec is not None and registry.alive(rec):
            return
        console = _process.tail(self.console_log)
        self._kept_log = _keep_log(self.console_log, self._vm_id)
        self._close_ctl()
        self._status = "stopped"
        _live.discard(self)
        registry.remove(self._vm_id)
        self._gone = VMGoneError(
            f"VM {self._vm_id} is gone: its VMM process ended. Create a new SmolVM to continue."
            f"{self._kept_note()}\n" + _process.format_tails(console, ""),
            exit_reason="vmm ended", console_tail=console, vm_id=self._vm_id,
        )

    def _kept_note(self) -> str:
        return f" Console log kept in {self._kept_log}" if self._kept_log else ""

    def _close_ctl(self) -> None:
        if self._ctl_fd >= 0:
            try:
                os.close(self._ctl_fd)
            except OSError:
                pass
            self._ctl_fd = -1

    _last_tails: tuple[str, str] = ("", "")
    _kept_log: Path | None = None

    def _teardown(self, grace: float, keep_logs: bool = False) -> int | None:
        """Close ctl, reap (SIGKILL after grace), read tails, remove the state dir."""
        self._status = "stopped"
        _live.discard(self)
        self._close_ctl()
        status = None
        if self._pid is not None:
            if _process.is_child(self._pid):
                status = _process.reap(self._pid, grace)
            else:
                _process.wait_gone(self._pid, registry.process_start(self._pid), grace)
        if keep_logs:
            self._last_tails = (
                _process.tail(self.console_log),
                _process.tail(self._state_dir / "vmm.stderr", lines=20),
            )
            self._kept_log = _keep_log(self.console_log, self._vm_id)
        shutil.rmtree(self._state_dir, ignore_errors=True)
        return status


def _image_and_disk(image: object, disk_size: object) -> tuple[str | None, int | None]:
    if image is None:
        if disk_size is not None:
            raise ValueError(
                "disk_size needs an image: image=None runs the minimal busybox guest from RAM, "
                "without a disk"
            )
        return None, None
    if not isinstance(image, str):
        raise TypeError(f"image must be an image name (str) or None, not {type(image).__name__}")
    from .build.image import check_image_name, image_path

    check_image_name(image)
    if image != DEFAULT_IMAGE:
        image_path(image)  # an unknown image fails now, listing the built ones
    size = DEFAULT_DISK_MIB if disk_size is None else _validate.disk_size_mib(disk_size)
    return image, size


def boot_cmdline(profile: Profile, image_file: Path | None) -> str:
    """The kernel command line of a VM booted with (or without) a root image."""
    cmdline = kernel_cmdline(profile)
    return cmdline + " " + IMAGE_ARG if image_file is not None else cmdline


def base_key(
    kernel: Path, initrd: Path, image_file: Path | None, memory: int, vcpus: int, vmm: Path,
    profile: Profile, net: bool = True,
) -> str:  # fmt: skip
    """The key of the base snapshot of a configuration (the disk size is not part of it;
    with a network device or without is: a NIC is part of the booted machine)."""
    extra = [b"image:" + snapshots.file_ident(image_file)] if image_file is not None else []
    if profile.vmm_args:  # e.g. the compat guest kernel switches XSAVE state only with --xstate-port
        extra.append(b"vmm-args:" + " ".join(profile.vmm_args).encode())
    extra += [b"net:on"] if net else []
    return snapshots.base_key(
        kernel, initrd, boot_cmdline(profile, image_file), memory, vcpus, vmm, extra
    )


def _stop_vmm(rec: registry.VMRecord, ctl_fd: int, pid: int | None) -> None:
    """Ask the VMM to stop, wait for it to go (SIGKILL after a grace period)."""
    if registry.alive(rec):
        try:
            _ctl.command(rec.ctl_path, "STOP", timeout=CLOSE_GRACE_S)
        except (OSError, SmolVMError):
            pass  # wedged or already going: the kill below takes care of it
    if pid is not None and _process.is_child(pid):
        _process.reap(pid, CLOSE_GRACE_S)
    elif rec.pid:
        _process.wait_gone(rec.pid, rec.pid_start, CLOSE_GRACE_S)


def _keep_log(console: Path, vm_id: str) -> Path | None:
    """Copy a failed VM's console log to $SMOLVM_HOME/logs (the newest few are kept)."""
    try:
        logs = home() / "logs"
        logs.mkdir(exist_ok=True)
        dest = logs / f"{vm_id}.console.log"
        shutil.copyfile(console, dest)
        old = sorted(logs.glob("*.console.log"), key=lambda p: p.stat().st_mtime)
        for path in old[:-KEEP_FAILED_LOGS]:
            path.unlink(missing_ok=True)
        return dest
    except OSError:
        return None


def _close_all() -> None:
    for vm in list(_live):
        try:
            vm.close()
        except Exception:
            pass


def _forget_in_child() -> None:
    """After fork(): the child must not keep the parent's VMs alive or tear them down."""
    for vm in list(_live):
        vm._lock = threading.RLock()  # another thread may have held it at fork time
        vm._close_ctl()
        vm._status = "stopped"
        vm._pid = None
        _live.discard(vm)


atexit.register(_close_all)
os.register_at_fork(after_in_child=_forget_in_child)

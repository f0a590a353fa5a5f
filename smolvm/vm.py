"""SmolVM: one microVM in its own smolvm-vmm process, running shell commands through the guest agent."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from . import _process, _validate
from ._native import native, vmm_path
from ._paths import home
from .errors import AgentError, SmolVMError, VMGoneError, VMNotRunningError, VMStartError
from .kvm import check_kvm
from .profile import Profile, detect, kernel_cmdline
from .result import RunResult

HOST_GRACE_MS = 30_000  # the host gives the agent this long past the command's own timeout
CLOSE_GRACE_S = 5.0  # after closing the ctl socket, wait this long before SIGKILL
GONE_PROBE_S = 2.0  # how long a failed run waits to learn whether the VMM has ended
UDS_MAX = 107 - 8  # sun_path holds 107 bytes; leave room for the VMM's "_<port>" listeners
KEEP_FAILED_LOGS = 10

_live: weakref.WeakSet[SmolVM] = weakref.WeakSet()


class SmolVM:
    """A microVM that runs shell commands.

    >>> with SmolVM() as vm:
    ...     print(vm.run("uname -a").output)

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
        kernel: str | os.PathLike[str] | None = None,
        initrd: str | os.PathLike[str] | None = None,
        boot_timeout: float | None = None,
    ) -> None:
        self._status = "created"
        self._memory = _validate.memory_mib(memory)
        self._vcpus = _validate.vcpus(vcpus)
        self._kernel = _validate.optional_file("kernel", kernel)
        self._initrd = _validate.optional_file("initrd", initrd)
        self._boot_timeout = _validate.boot_timeout(boot_timeout)
        self._vm_id = "vm-" + secrets.token_hex(6)
        self._lock = threading.RLock()
        self._owner_pid = os.getpid()
        self._pid: int | None = None
        self._ctl_fd = -1
        self._state_dir = home() / "vms" / self._vm_id
        self._gone: VMGoneError | None = None
        self._profile: Profile | None = None
        self._boot_time: float | None = None

    # ---- properties -------------------------------------------------------------

    @property
    def vm_id(self) -> str:
        return self._vm_id

    @property
    def status(self) -> str:
        """"created" (not booted yet), "running", or "stopped" (closed or gone)."""
        return self._status

    @property
    def memory(self) -> int:
        return self._memory

    @property
    def vcpus(self) -> int:
        return self._vcpus

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
    def boot_time(self) -> float | None:
        """Seconds from starting the VMM to a ready guest agent."""
        return self._boot_time

    def __repr__(self) -> str:
        return (
            f"SmolVM(vm_id={self._vm_id!r}, status={self._status!r}, "
            f"memory={self._memory}, vcpus={self._vcpus})"
        )

    # ---- lifecycle ----------------------------------------------------------------

    def __enter__(self) -> SmolVM:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> SmolVM:
        """Boot the VM and wait until its guest agent is ready. No-op if running."""
        with self._lock:
            if self._status == "running":
                return self
            self._raise_if_stopped()
            check_kvm()
            nat = native()
            vmm = vmm_path()
            kernel, initrd = self._artifacts()
            self._profile = detect()
            argv = self._argv(vmm, kernel, initrd, kernel_cmdline(self._profile))
            t0 = time.monotonic()
            try:
                self._pid, self._ctl_fd = nat.spawn_vmm(
                    argv, stderr_path=str(self._state_dir / "vmm.stderr")
                )
            except OSError as e:
                shutil.rmtree(self._state_dir, ignore_errors=True)
                self._status = "stopped"
                raise VMStartError(f"could not start {vmm}: {e}", vm_id=self._vm_id) from e
            try:
                failure = self._wait_ready(t0 + self._boot_timeout)
            except BaseException:  # Ctrl-C during boot: leave nothing behind
                self._teardown(grace=0.0)
                raise
            if failure is not None:
                raise self._start_failed(failure)
            self._boot_time = time.monotonic() - t0
            self._status = "running"
            _live.add(self)
            return self

    def close(self) -> None:
        """Stop the VM: the VMM exits when its control socket closes. Idempotent."""
        with self._lock:
            if self._status != "running":
                self._status = "stopped"
                return
            self._status = "stopped"
            if os.getpid() != self._owner_pid:  # a forked child: the VM is not ours
                self._close_ctl()
                return
            self._teardown(grace=CLOSE_GRACE_S)

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
    ) -> RunResult:
        """Run `/bin/sh -c command` in the guest and return its exit code and output.

        When `timeout` (seconds) passes, the command's process group is killed and the
        result has timed_out=True, exit_code=124 and the output so far; the VM stays usable.
        Starts the VM first if needed. Raises VMGoneError if the VM died.
        """
        cmd = _validate.command(command)
        t_ms = _validate.timeout_ms(timeout)
        env_list = _validate.env(env)
        cwd_s = _validate.cwd(cwd)
        if self._status != "running":
            self.start()
        nat = native()
        uds = str(self._state_dir / "vsock.sock")
        t0 = time.monotonic()
        try:
            code, sig, out, err, timed_out = nat.exec(
                uds, nat.AGENT_PORT, cmd, cwd_s, env_list, t_ms, t_ms + HOST_GRACE_MS
            )
        except nat.ProtocolError as e:
            self._raise_if_gone()
            raise AgentError(f"the guest agent of {self._vm_id} failed the request: {e}") from None
        except TimeoutError:
            self._raise_if_gone()
            raise AgentError(
                f"the guest agent of {self._vm_id} did not answer within "
                f"{(t_ms + HOST_GRACE_MS) / 1000:.0f} s (timeout + {HOST_GRACE_MS // 1000} s grace)"
            ) from None
        except OSError as e:
            self._raise_if_gone()
            raise AgentError(f"lost the connection to the guest agent of {self._vm_id}: {e}") from e
        return RunResult.from_bytes(
            code, out, err, time.monotonic() - t0, timed_out=bool(timed_out), signal=sig
        )

    # ---- internals ------------------------------------------------------------------

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

    def _artifacts(self) -> tuple[Path, Path]:
        try:
            if self._kernel is not None:
                kernel = self._kernel
            else:
                from .build.kernel import ensure_kernel

                kernel = ensure_kernel() / "vmlinux"
            if self._initrd is not None:
                initrd = self._initrd
            else:
                from .build.initramfs import ensure_initramfs

                initrd = ensure_initramfs()
        except SmolVMError:
            raise
        except Exception as e:
            raise VMStartError(f"could not build the guest kernel or initramfs: {e}") from e
        return kernel, initrd

    def _argv(self, vmm: Path, kernel: Path, initrd: Path, cmdline: str) -> list[str]:
        uds = self._state_dir / "vsock.sock"
        if len(os.fsencode(uds)) > UDS_MAX:
            raise VMStartError(
                f"the VM socket path {uds} is too long for a Unix socket "
                f"({len(os.fsencode(uds))} > {UDS_MAX} bytes): set SMOLVM_HOME to a shorter folder"
            )
        self._state_dir.mkdir(parents=True, exist_ok=False)
        return [
            str(vmm),
            "--kernel", str(kernel),
            "--initrd", str(initrd),
            "--cmdline", cmdline,
            "--mem-mib", str(self._memory),
            "--vcpus", str(self._vcpus),
            "--vsock-uds", str(uds),
            "--console", str(self.console_log),
            "--ctl-fd", "3",
        ]  # fmt: skip

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
        status = _process.reap(self._pid, grace) if self._pid is not None else None
        if keep_logs:
            self._last_tails = (
                _process.tail(self.console_log),
                _process.tail(self._state_dir / "vmm.stderr", lines=20),
            )
            self._kept_log = _keep_log(self.console_log, self._vm_id)
        shutil.rmtree(self._state_dir, ignore_errors=True)
        return status


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

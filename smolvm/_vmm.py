"""The smolvm-vmm process of one VM: argv, spawn, wait for READY, teardown, learning that it ended, kept logs."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from . import _ctl, _process, hostvm, network, registry
from ._native import native
from ._paths import home
from .errors import SmolVMError, VMGoneError, VMStartError
from .profile import Profile

CLOSE_GRACE_S = 5.0  # after closing the ctl socket, wait this long before SIGKILL
GONE_PROBE_S = 2.0  # how long a failed run waits to learn whether the VMM has ended
UDS_MAX = 107 - 8  # sun_path holds 107 bytes; leave room for the VMM's "_<port>" listeners
KEEP_FAILED_LOGS = 10
CTL_TIMEOUT_S = 120.0  # a snapshot writes guest memory: allow for slow disks


def check_uds(files: registry.StateDir) -> None:
    uds = files.vsock
    if len(os.fsencode(uds)) > UDS_MAX:
        raise VMStartError(
            f"the VM socket path {uds} is too long for a Unix socket "
            f"({len(os.fsencode(uds))} > {UDS_MAX} bytes): set SMOLVM_HOME to a shorter folder"
        )


def boot_argv(
    vmm: Path, kernel: Path, initrd: Path, cmdline: str, memory: int, vcpus: int
) -> list[str]:
    """The start of a cold boot's argv (common_argv() and the disks follow)."""
    return [
        str(vmm),
        "--kernel", str(kernel),
        "--initrd", str(initrd),
        "--cmdline", cmdline,
        "--mem-mib", str(memory),
        "--vcpus", str(vcpus),
    ]  # fmt: skip


def restore_argv(vmm: Path, snap: Path) -> list[str]:
    """The start of a restore's argv (common_argv() and the disks follow). SMOLVM_FORK_VERIFY=1
    makes fork() check the VMM's dirty-page log against the kernel's page map (tests);
    SMOLVM_DIRTY_LOG=0 turns write tracking off (benchmarks: its cost)."""
    argv = [str(vmm), "--restore", str(snap)]
    if os.environ.get("SMOLVM_FORK_VERIFY") == "1":
        argv.append("--fork-verify")
    if os.environ.get("SMOLVM_DIRTY_LOG") == "0":  # no write tracking: fork() captures everything
        argv.append("--no-dirty-log")
    return argv


def disk_args(image_file: Path, disk: Path) -> list[str]:
    """The read-only root image, then the VM's own writable disk."""
    return ["--disk", f"{image_file},ro", "--disk", str(disk)]


def common_argv(
    files: registry.StateDir, net: network.NetworkPolicy, profile: Profile | None,
    persistent: bool,
) -> list[str]:  # fmt: skip
    """The arguments every VMM of a VM gets, booted or restored."""
    argv = [
        "--vsock-uds", str(files.vsock),
        "--console", str(files.console),
        "--ctl-fd", "3",
        "--ctl-listen", str(files.ctl),
        *network.vmm_args(net, nested=profile is not None and profile.nested),
    ]  # fmt: skip
    if persistent:
        argv.append("--daemonize")
    if profile is not None:
        argv += profile.vmm_args
    return argv


class VMMProcess:
    """The VMM of one VM as this process sees it: pid, the ctl pipe (fd 3), its logs."""

    def __init__(self, vm_id: str, files: registry.StateDir) -> None:
        self.vm_id = vm_id
        self.files = files
        self.pid: int | None = None
        self.ctl_fd = -1
        self.last_tails: tuple[str, str] = ("", "")  # console and stderr of the last failure
        self.kept_log: Path | None = None

    def spawn(self, argv: list[str], nested: bool, persistent: bool, boot_timeout: float) -> str | None:
        """Start the VMM and wait for its guest agent: None, or why it failed (VMM still to
        reap). A VMM that cannot be started raises VMStartError (its state folder removed)."""
        t0 = time.monotonic()
        vmm = argv[0]
        try:
            argv = hostvm.vmm_command(argv, nested)
            pid, self.ctl_fd = native().spawn_vmm(argv, stderr_path=str(self.files.vmm_stderr))
        except SmolVMError as e:
            shutil.rmtree(self.files.path, ignore_errors=True)
            raise VMStartError(str(e), vm_id=self.vm_id) from e
        except OSError as e:
            shutil.rmtree(self.files.path, ignore_errors=True)
            raise VMStartError(f"could not start {vmm}: {e}", vm_id=self.vm_id) from e
        self.pid = pid
        try:
            if persistent:
                _process.reap(pid, CLOSE_GRACE_S)  # the daemonizing parent exits at once
                self.pid = None
            return self._wait_ready(t0 + boot_timeout, boot_timeout)
        except BaseException:
            self.teardown(grace=0.0)
            raise

    def _wait_ready(self, deadline: float, boot_timeout: float) -> str | None:
        """Read ctl lines until READY; return None, or why the boot failed."""
        nat = native()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return f"the guest agent was not ready within {boot_timeout:.0f} s (SMOLVM_BOOT_TIMEOUT)"
            line = nat.wait_line(self.ctl_fd, left)
            if line is None:
                continue
            if line == b"":
                return "the VMM process ended during boot"
            if line.strip() == b"READY":
                return None
            if line.startswith(b"PID "):
                self.pid = int(line.split()[1])  # the daemonized VMM's own pid
                continue
            parsed = _process.parse_exit_line(line)
            if parsed is not None:
                reason, message = parsed
                return f"the VM stopped during boot ({reason}{': ' + message if message else ''})"
            # Other lines are informational; ignore them.

    def command(self, line: str) -> str:
        """A control command (PAUSE, RESUME, SNAPSHOT dir, DETACH, STOP); _ctl's errors."""
        return _ctl.command(self.files.ctl, line, CTL_TIMEOUT_S)

    def close_ctl(self) -> None:
        if self.ctl_fd >= 0:
            try:
                os.close(self.ctl_fd)
            except OSError:
                pass
            self.ctl_fd = -1

    def teardown(self, grace: float, keep_logs: bool = False) -> int | None:
        """Close ctl, reap (SIGKILL after grace), read tails, remove the state dir."""
        self.close_ctl()
        status = None
        if self.pid is not None:
            if _process.is_child(self.pid):
                status = _process.reap(self.pid, grace)
            else:
                _process.wait_gone(self.pid, registry.process_start(self.pid), grace)
        if keep_logs:
            self.last_tails = (
                _process.tail(self.files.console),
                _process.tail(self.files.vmm_stderr, lines=20),
            )
            self.kept_log = keep_log(self.files.console, self.vm_id)
        shutil.rmtree(self.files.path, ignore_errors=True)
        return status

    def start_failed(self, why: str, status: int | None) -> VMStartError:
        """The error of a boot that failed for `why`, after teardown(keep_logs=True) gave status."""
        console, stderr = self.last_tails
        how = _process.describe_status(status)
        msg = (
            f"VM {self.vm_id} failed to start: {why}; the VMM {how}.{self.kept_note()}\n"
            + _process.format_tails(console, stderr)
        )
        return VMStartError(msg, console_tail=console, vm_id=self.vm_id)

    def ended(self) -> tuple[str, str] | None:
        """Has this process's own VMM ended? Reads ctl for up to GONE_PROBE_S: None if it is
        alive, else the (reason, message) of its EXIT line ("" if it sent none)."""
        nat = native()
        reason, message, eof = "", "", False
        deadline = time.monotonic() + GONE_PROBE_S
        while time.monotonic() < deadline:
            line = nat.wait_line(self.ctl_fd, 0.1)
            if line == b"":
                eof = True
                break
            if line:
                parsed = _process.parse_exit_line(line)
                if parsed is not None:
                    reason, message = parsed
        if not eof:
            assert self.pid is not None
            exited, _ = _process.poll_exit(self.pid)
            if not exited:
                return None  # the VMM is alive: the failure was the agent's
        return reason, message

    def gone_error(self, exit_line: tuple[str, str], status: int | None) -> VMGoneError:
        """The error of a VM whose VMM ended (ended()'s EXIT line, teardown(keep_logs=True)'s status)."""
        reason, message = exit_line
        console, stderr = self.last_tails
        how = _process.describe_status(status)
        if reason:
            exit_reason = f"{reason}: {message}" if message else reason
            why = f"the VM stopped ({exit_reason}) and its VMM process {how}"
        else:
            exit_reason = how
            why = f"its VMM process (pid {self.pid}) {how}"
        msg = (
            f"VM {self.vm_id} is gone: {why}. Create a new SmolVM to continue.{self.kept_note()}\n"
            + _process.format_tails(console, stderr)
        )
        return VMGoneError(msg, exit_reason=exit_reason, console_tail=console, vm_id=self.vm_id)

    def gone_detached_error(self) -> VMGoneError:
        """The error of a VM this process does not own whose VMM ended (keeps its console log)."""
        console = _process.tail(self.files.console)
        self.kept_log = keep_log(self.files.console, self.vm_id)
        self.close_ctl()
        return VMGoneError(
            f"VM {self.vm_id} is gone: its VMM process ended. Create a new SmolVM to continue."
            f"{self.kept_note()}\n" + _process.format_tails(console, ""),
            exit_reason="vmm ended", console_tail=console, vm_id=self.vm_id,
        )  # fmt: skip

    def kept_note(self) -> str:
        return f" Console log kept in {self.kept_log}" if self.kept_log else ""


def stop(rec: registry.VMRecord, pid: int | None) -> None:
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


def keep_log(console: Path, vm_id: str) -> Path | None:
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

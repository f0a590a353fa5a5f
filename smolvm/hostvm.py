"""The nested profile's host VM: one QEMU (TCG, AMD-V with nested paging) per $SMOLVM_HOME whose KVM runs our VMMs.

On a host whose own /dev/kvm emulates guest ring 0 (or is missing), QEMU's TCG still offers its
guest SVM with nested paging, and Debian's stock kernel there gets a real KVM from kvm_amd. One
such host VM is started on first use and shared by every Python process of this $SMOLVM_HOME.
It mounts the host's `/` over 9p and runs smolvm-hostd; each VM's smolvm-vmm runs inside it,
started through smolvm-vmm-relay, which stands in for the VMM on the host (its pid, its
control socket, its Unix sockets at the usual paths). The host VM powers itself off after
SMOLVM_HOST_IDLE seconds (default 900) without VMs, or with `smolvm host stop`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ._paths import PACKAGE_DIR, home
from ._process import tail, tool_env
from .errors import SmolVMError

QEMU = "qemu-system-x86_64"
QEMU_MIN = (8, 2)  # older QEMU does not pass the guest's XSETBV to the host VM's KVM (no AVX in guests)
NAME = "smolvm-host"
HOSTD = "smolvm-hostd"
RELAY = "smolvm-vmm-relay"
# The host VM's user-mode network: QEMU's default 10.0.2.0/24, the host VM at .15 and the
# host's loopback at .2, the same addresses the guests use (see network.passt_argv).
NET = "10.0.2"
HOSTD_PORT = 7000
START_TIMEOUT_S = 300.0
IDLE_DEFAULT_S = 900
MEMORY_MAX_MIB = 16 * 1024


class HostVMError(SmolVMError):
    """The nested profile's host VM could not be started or reached."""


@dataclass(frozen=True)
class HostVM:
    pid: int
    endpoint: str  # 127.0.0.1:PORT, forwarded by QEMU to smolvm-hostd
    token_file: Path
    cpus: int
    memory_mib: int
    started: float


def host_dir() -> Path:
    path = home() / "host"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def qemu_path() -> str | None:
    return shutil.which(QEMU)


def qemu_version(path: str | None = None) -> tuple[int, int] | None:
    path = path or qemu_path()
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _qemu_version(path, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=4)
def _qemu_version(path: str, _mtime: int, _ino: int) -> tuple[int, int] | None:
    """`qemu --version`, asked once per binary (profile detection runs at every VM start)."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, env=tool_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


def unavailable_reason() -> str | None:
    """Why the nested profile cannot run here, or None if it can."""
    path = qemu_path()
    if path is None:
        return f"{QEMU} is not installed (`apt-get install qemu-system-x86`)"
    version = qemu_version(path)
    if version is None or version < QEMU_MIN:
        have = ".".join(map(str, version)) if version else "unknown"
        return (
            f"QEMU {have} is older than {QEMU_MIN[0]}.{QEMU_MIN[1]}, which the nested profile needs "
            "(`apt-get install -t bookworm-backports qemu-system-x86`; scripts/setup.sh does it)"
        )
    for prog in (HOSTD, RELAY):
        if not os.access(PACKAGE_DIR / prog, os.X_OK):
            return f"{PACKAGE_DIR / prog} is missing: reinstall smolvm (`pip install .` builds it)"
    return None


def _sizes() -> tuple[int, int]:
    cpus = int(os.environ.get("SMOLVM_HOST_CPUS") or os.cpu_count() or 1)
    mem = os.environ.get("SMOLVM_HOST_MEMORY")
    if mem:
        return cpus, int(mem)
    total = 4096
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) // 1024
    return cpus, max(1024, min(total // 2, MEMORY_MAX_MIB))


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with open(host_dir() / "lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_pid() -> int | None:
    try:
        pid = int((host_dir() / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if f"{NAME},".encode() in cmdline or NAME.encode() + b"\0" in cmdline else None


def ping(endpoint: str, token_file: Path, timeout: float = 2.0) -> bool:
    """Does smolvm-hostd answer at endpoint?"""
    host, _, port = endpoint.rpartition(":")
    try:
        token = token_file.read_text().strip()
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(f"{token} PING\n".encode())
            return s.recv(16) == b"PONG\n"
    except (OSError, ValueError):
        return False


def current() -> HostVM | None:
    """The running host VM of this $SMOLVM_HOME, or None (nothing is started)."""
    pid = _read_pid()
    if pid is None:
        return None
    d = host_dir()
    try:
        fields = dict(line.split("=", 1) for line in (d / "state").read_text().splitlines() if "=" in line)
        return HostVM(
            pid=pid, endpoint=fields["endpoint"], token_file=d / "token", cpus=int(fields["cpus"]),
            memory_mib=int(fields["memory_mib"]), started=float(fields["started"]),
        )  # fmt: skip
    except (OSError, KeyError, ValueError):
        return None


def ensure() -> HostVM:
    """The running host VM, started (and waited for) if there is none. HostVMError if it cannot be."""
    vm = current()
    if vm is not None and ping(vm.endpoint, vm.token_file):
        return vm
    with _locked():
        vm = current()
        if vm is not None:
            if _wait_ping(vm, time.monotonic() + START_TIMEOUT_S):
                return vm
            _kill(vm.pid)
        return _start()


def _wait_ping(vm: HostVM, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if ping(vm.endpoint, vm.token_file):
            return True
        if _read_pid() is None:
            return False
        time.sleep(0.2)
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start() -> HostVM:
    why = unavailable_reason()
    if why is not None:
        raise HostVMError(f"cannot start the nested profile's host VM: {why}")
    from .build._cache import progress
    from .build.hostvm import ensure_hostvm

    try:
        assets = ensure_hostvm()
    except Exception as e:
        raise HostVMError(f"cannot build the nested profile's host VM: {e}") from e
    d = host_dir()
    for stale in ("qemu.pid", "state"):
        (d / stale).unlink(missing_ok=True)
    token_file = d / "token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    cpus, mem = _sizes()
    port = _free_port()
    idle = int(os.environ.get("SMOLVM_HOST_IDLE") or IDLE_DEFAULT_S)
    append = (
        f"console=ttyS0 panic=-1 quiet smolvm.hostd={PACKAGE_DIR / HOSTD} smolvm.token={token_file} "
        f"smolvm.idle={idle} smolvm.ip={NET}.15 smolvm.gw={NET}.2"
    )
    model = "passthrough" if os.geteuid() == 0 else "none"
    images = (home() / "images").resolve()
    images.mkdir(parents=True, exist_ok=True)
    append += f" smolvm.images={images}"
    argv = [
        qemu_path() or QEMU, "-name", f"{NAME},process={NAME}",
        "-accel", "tcg,thread=multi,tb-size=1024", "-cpu", "max", "-smp", str(cpus), "-m", str(mem),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", f"file:{d / 'console.log'}",
        "-kernel", str(assets / "vmlinuz"), "-initrd", str(assets / "hostvm.cpio"), "-append", append,
        "-netdev", f"user,id=n0,net={NET}.0/24,host={NET}.2,hostfwd=tcp:127.0.0.1:{port}-{NET}.15:{HOSTD_PORT}",
        "-device", "virtio-net-pci,netdev=n0",
        "-virtfs", f"local,path=/,mount_tag=hostroot,security_model={model},id=fs0,multidevs=remap",
        "-virtfs", f"local,path={images},mount_tag=images,security_model={model},id=fs1,readonly=on",
        "-daemonize", "-pidfile", str(d / "qemu.pid"),
    ]  # fmt: skip
    progress(f"starting the nested profile's host VM (QEMU TCG, {cpus} vCPUs, {mem} MiB); about a minute")
    t0 = time.monotonic()
    with open(d / "qemu.log", "ab") as log:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=tool_env())
    if res.returncode != 0:
        raise HostVMError(f"QEMU failed to start the host VM (exit {res.returncode}):\n{tail(d / 'qemu.log')}")
    pid = _read_pid()
    if pid is None:
        raise HostVMError(f"QEMU started but left no running process:\n{tail(d / 'qemu.log')}")
    (d / "state").write_text(
        f"endpoint=127.0.0.1:{port}\ncpus={cpus}\nmemory_mib={mem}\nstarted={time.time()}\n"
    )
    vm = current()
    assert vm is not None
    if not _wait_ping(vm, time.monotonic() + START_TIMEOUT_S):
        _kill(pid)
        raise HostVMError(
            f"the host VM did not answer within {START_TIMEOUT_S:.0f} s; its console:\n"
            f"{tail(d / 'console.log')}"
        )
    progress(f"host VM ready in {time.monotonic() - t0:.1f} s")
    return vm


def _kill(pid: int, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` s, through a pidfd taken once: if QEMU ends and its
    pid is reused meanwhile, the signals cannot reach the newcomer."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, PermissionError):
        return
    try:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            signal.pidfd_send_signal(fd, signal.SIGTERM)
        poller = select.poll()
        poller.register(fd, select.POLLIN)  # readable once the process has ended
        if not poller.poll(int(grace * 1000)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            poller.poll(int(grace * 1000))
    finally:
        os.close(fd)


def stop() -> bool:
    """Stop the host VM (and so every VM in it). False if none was running."""
    with _locked():
        pid = _read_pid()
        if pid is None:
            return False
        _kill(pid)
        for f in ("qemu.pid", "state"):
            (host_dir() / f).unlink(missing_ok=True)
        return True


def relay_argv(argv: list[str]) -> list[str]:
    """The command that starts VMM argv inside the host VM (starting the host VM first if needed)."""
    vm = ensure()
    return [str(PACKAGE_DIR / RELAY), "--endpoint", vm.endpoint, "--token-file", str(vm.token_file), "--", *argv]


def logs(lines: int = 60) -> str:
    return tail(host_dir() / "console.log", lines)


def vmm_command(argv: list[str], nested: bool) -> list[str]:
    """argv that starts the VMM argv: as it is, or through the host VM when nested."""
    return relay_argv(argv) if nested else argv

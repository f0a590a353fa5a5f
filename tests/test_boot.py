"""Direct kernel boot through smolvm-vmm: both loaders (vmlinux ELF, bzImage) reach the kernel.

These run the VMM on its own with `earlyprintk` and stop at the first kernel lines, so they
exercise the loader, zero page, e820 map, MP table and 64-bit entry in seconds, whether or
not a base snapshot lets the other tests skip booting.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from smolvm._native import vmm_path
from smolvm.build.kernel import ensure_kernel
from smolvm.hostvm import vmm_command
from smolvm.profile import detect, kernel_cmdline

pytestmark = pytest.mark.vm

BANNER_TIMEOUT_S = 600.0  # bzImage decompression runs in emulated ring 0 on some hosts


def boot_until(
    tmp_path: Path, kernel: Path, vcpus: int, want: list[str], extra: list[str] | None = None
) -> str:
    """Start smolvm-vmm on kernel with earlyprintk; return the console once all `want` appear."""
    console = tmp_path / "console.log"
    profile = detect()
    cmdline = kernel_cmdline(profile) + " earlyprintk=serial,ttyS0"
    owner, child = socket.socketpair()
    argv = [
        str(vmm_path()), "--kernel", str(kernel), "--cmdline", cmdline, "--mem-mib", "256",
        "--vcpus", str(vcpus), "--vsock-uds", str(tmp_path / "v.sock"),
        "--console", str(console), "--ctl-fd", str(child.fileno()), *profile.vmm_args,
        *(extra or []),
    ]  # fmt: skip
    proc = subprocess.Popen(
        vmm_command(argv, profile.nested), pass_fds=[child.fileno()], stderr=subprocess.PIPE
    )
    child.close()
    text = ""
    try:
        deadline = time.monotonic() + BANNER_TIMEOUT_S
        while time.monotonic() < deadline:
            text = console.read_text(errors="replace") if console.exists() else ""
            if all(w in text for w in want):
                return text
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(
            f"kernel lines {want} not seen (vmm exit {proc.poll()}); console tail:\n{text[-2000:]}"
        )
    finally:
        owner.close()  # the VMM exits when its owner goes away
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_mp_table_describes_every_vcpu(tmp_path: Path) -> None:
    kernel = ensure_kernel() / "vmlinux"
    text = boot_until(tmp_path, kernel, 2, ["Linux version", "Processor #1"])
    assert "found SMP MP-table" in text and "Processor #0" in text


def test_vmlinux_elf_boot_with_a_disk(tmp_path: Path) -> None:
    kernel = ensure_kernel() / "vmlinux"
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(3 << 20)  # 3 MiB = 6144 sectors
    text = boot_until(
        tmp_path, kernel, 1, ["Linux version", "[vda] 6144 512-byte"], ["--disk", f"{disk},ro"]
    )
    assert "found SMP MP-table" in text
    assert re.search(r"BIOS-e820: \[mem 0x0*100000-0x0*fffffff\] usable", text), text[-3000:]
    assert "virtio_mmio.device=512@0xd0000000:5" in text  # the VMM declared its vsock device
    assert "virtio_mmio.device=512@0xd0001000:6" in text  # and the disk


def test_bzimage_boot(tmp_path: Path) -> None:
    kernel = ensure_kernel() / "bzImage"
    text = boot_until(tmp_path, kernel, 1, ["Linux version", "Command line:"])
    assert "Processor #0" in text or "found SMP MP-table" in text or "Linux version" in text


def test_vmm_rejects_a_file_that_is_no_kernel(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"MZ" + b"\0" * 8190)
    owner, child = socket.socketpair()
    proc = subprocess.run(
        [str(vmm_path()), "--kernel", str(junk), "--cmdline", "x", "--mem-mib", "64",
         "--vsock-uds", str(tmp_path / "v.sock"), "--console", str(tmp_path / "c.log"),
         "--ctl-fd", str(child.fileno())],
        pass_fds=[child.fileno()], capture_output=True, timeout=60,
    )  # fmt: skip
    child.close()
    owner.settimeout(5)
    lines = owner.recv(4096).decode()
    owner.close()
    assert proc.returncode == 1
    assert "EXIT error" in lines and "bzImage" in lines, lines

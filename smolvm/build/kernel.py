"""Build the guest kernel from Debian's linux-source-6.1 plus kernel-config/, once per machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from .._paths import data_dir
from ._cache import cached, digest, progress

SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
SOURCE_PACKAGE = "linux-source-6.1"


class KernelBuildError(RuntimeError):
    pass


def _source_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
            capture_output=True, text=True, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        st = SOURCE_TARBALL.stat()
        return f"{st.st_size}-{int(st.st_mtime)}"


def _inputs() -> tuple[Path, list[Path]]:
    cfg = data_dir("kernel-config")
    fragment = cfg / "smolvm.config"
    patches = sorted((cfg / "patches").glob("*.patch"))
    return fragment, patches


def kernel_key() -> str:
    if not SOURCE_TARBALL.exists():
        raise KernelBuildError(
            f"{SOURCE_TARBALL} is missing: install it with `apt-get install {SOURCE_PACKAGE}`"
        )
    fragment, patches = _inputs()
    parts = [b"kernel-v1", _source_version().encode(), fragment.read_bytes()]
    parts += [p.name.encode() + b"\0" + p.read_bytes() for p in patches]
    return digest(parts)


def _run(cmd: list[str], cwd: Path, log: Path) -> None:
    with open(log, "ab") as out:
        out.write(("\n$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        rc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        lines = log.read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if "error:" in ln or "Error " in ln][:20]
        raise KernelBuildError(
            f"`{' '.join(cmd)}` failed (exit {rc}):\n" + "\n".join(errors or lines[-30:])
        )


def _check_config(config: Path, fragment: Path) -> None:
    have = {}
    for line in config.read_text().splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            have[k] = v
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            have[line[2:-11]] = "n"
    missing = []
    for line in fragment.read_text().splitlines():
        if not line.startswith("CONFIG_"):
            continue
        k, v = line.split("=", 1)
        if have.get(k, "n") != v:
            missing.append(f"{k}={v} (got {have.get(k, 'unset')})")
    if missing:
        raise KernelBuildError("kernel config did not take: " + ", ".join(missing))


def _build(out: Path) -> None:
    fragment, patches = _inputs()
    work = out / "src"
    log = out / "build.log"
    progress(f"building the guest kernel in {out} (about 5-10 minutes; log: {log})")
    with tarfile.open(SOURCE_TARBALL) as tar:
        tar.extractall(out, filter="fully_trusted")
    (out / "linux-source-6.1").rename(work)
    for patch in patches:
        _run(["patch", "-p1", "--forward", "-i", str(patch)], work, log)
    make = ["make", "ARCH=x86_64", f"-j{os.cpu_count() or 2}"]
    _run(make + ["tinyconfig"], work, log)
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)], work, log)
    _run(make + ["olddefconfig"], work, log)
    _check_config(work / ".config", fragment)
    _run(make + ["vmlinux", "bzImage"], work, log)
    shutil.copy(work / "vmlinux", out / "vmlinux")
    shutil.copy(work / "arch/x86/boot/bzImage", out / "bzImage")
    shutil.copy(work / "System.map", out / "System.map")
    shutil.copy(work / ".config", out / "config")
    shutil.rmtree(work)
    progress("guest kernel built")


def ensure_kernel() -> Path:
    """Folder holding vmlinux, bzImage, System.map and config of the guest kernel."""
    return cached("kernel", kernel_key(), _build)

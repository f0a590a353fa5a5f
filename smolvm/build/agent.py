"""Build the static guest agent (guest/agent/, csrc/proto.h) with the host's gcc, cached by input hash."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .. import _binaries
from .._paths import data_dir
from ._cache import cached, digest, progress

CC = "gcc"
CFLAGS = ["-static", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-s"]
AGENT_NAME = "agent"
AGENT_BINARY = "smolvm-agent"
INSTALL_HINT = "apt-get install gcc libc6-dev"


class AgentBuildError(RuntimeError):
    pass


def agent_sources() -> tuple[list[Path], list[Path], list[Path]]:
    """The agent's C files, the headers it may include, and its include folders (smolvm/_binaries.py)."""
    root = data_dir("csrc").parent
    try:
        files = _binaries.sources(AGENT_BINARY, root)
    except FileNotFoundError:
        files = []
    if not files or not files[0].is_file():
        raise AgentBuildError(f"no agent sources in {root / _binaries.BINARIES[AGENT_BINARY].folder}; reinstall smolvm")
    return files, _binaries.headers(AGENT_BINARY, root), _binaries.include_dirs(AGENT_BINARY, root)


def _compiler_version() -> str:
    if shutil.which(CC) is None:
        raise AgentBuildError(f"{CC} not found: building the guest agent needs `{INSTALL_HINT}`")
    out = subprocess.run([CC, "--version"], capture_output=True, text=True)
    if out.returncode != 0:
        raise AgentBuildError(f"`{CC} --version` failed: {out.stderr.strip()}")
    return out.stdout.splitlines()[0] if out.stdout else ""


def agent_key() -> str:
    files, hdrs, _ = agent_sources()
    parts = [b"agent-v1", _compiler_version().encode(), " ".join(CFLAGS).encode()]
    parts += [p.name.encode() + b"\0" + p.read_bytes() for p in (*files, *hdrs)]
    return digest(parts)


def compile_agent(dest: Path, extra_flags: list[str] | None = None) -> None:
    """Compile the agent to dest; extra_flags replace -static/-s (tests build sanitized variants)."""
    files, _, incs = agent_sources()
    flags = CFLAGS if extra_flags is None else [f for f in CFLAGS if f not in ("-static", "-s")] + extra_flags
    cmd = [CC, *flags, *(f"-I{d}" for d in incs), "-o", str(dest), *map(str, files)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise AgentBuildError(f"{CC} not found: building the guest agent needs `{INSTALL_HINT}`") from None
    if res.returncode != 0:
        err = res.stderr.strip()
        hint = ""
        if "cannot find -lc" in err or "stdio.h" in err or "No such file" in err:
            hint = f"\nthe static C library or headers are missing: `{INSTALL_HINT}`"
        raise AgentBuildError(f"`{' '.join(cmd)}` failed (exit {res.returncode}):\n{err}{hint}")


def _build(out: Path) -> None:
    progress("building the guest agent")
    compile_agent(out / AGENT_NAME)


def ensure_agent() -> Path:
    """Path of the static guest agent binary (the initramfs's /init), built on first use."""
    return cached("agent", agent_key(), _build) / AGENT_NAME

"""Fork captures ($SMOLVM_HOME/forks/<id>/): the state one vm.fork() took, kept while a child of it lives.

A capture is a snapshot folder (state.bin, memory.bin, meta.json, disk.img) written by the
VMM's FORK command (csrc/vmm/fork.h): for a VM restored from a snapshot, memory.bin is a hard
link to the memory file it was restored from and overlay.bin holds only the pages it wrote
since; for a booted VM memory.bin is the whole memory. Children restore it like any snapshot.
The refcount is the registry itself: a capture is needed while a live VM record names it as
its source, or while the process making its children (the `creating` file) is still at it.
collect() removes the others, so a crash leaves nothing that a later `smolvm rm`, `smolvm
doctor` or fork() does not clean.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import registry
from ._paths import home

CAPTURE_RE = re.compile(r"^fork-[0-9a-f]{12}$")
CREATING = "creating"  # "<pid> <start ticks>" of the process starting this capture's children


@dataclass(frozen=True)
class Capture:
    """What one FORK took (the VMM's answer): csrc/vmm/main.c, vmm_on_command."""

    path: Path
    layered: bool  # base memory file + overlay of the pages written since restore
    pages: int  # 4 KiB pages in the overlay (layered), or the guest's pages (full)
    vmm_us: int  # the VMM's time for the capture, in microseconds
    missed: int | None  # SMOLVM_FORK_VERIFY=1: written pages the dirty log missed
    why_full: str  # why it is a full capture, if it is
    parts_us: dict[str, int]  # the VMM's time by step: log (dirty log), link, overlay, state
    wall_s: float = 0.0  # the parent's pause: PAUSE to RESUME, disk copy included

    @staticmethod
    def parse(path: Path, reply: str) -> Capture:
        """"layered|full pages=N missed=N|- us=N log=N ... [why]" into a Capture."""
        words = reply.split()
        kind = words[0] if words else ""
        fields: dict[str, str] = {}
        rest: list[str] = []
        for w in words[1:]:
            key, eq, value = w.partition("=")
            if eq and key.isalpha() and not rest:
                fields[key] = value
            else:
                rest.append(w)
        missed = fields.pop("missed", "-")
        return Capture(
            path=path, layered=kind == "layered", pages=int(fields.pop("pages", 0)),
            vmm_us=int(fields.pop("us", 0)), missed=None if missed == "-" else int(missed),
            why_full=" ".join(rest), parts_us={k: int(v) for k, v in fields.items() if v.isdigit()},
        )  # fmt: skip


def root() -> Path:
    r = home() / "forks"
    r.mkdir(parents=True, exist_ok=True)
    return r


def new() -> Path:
    """A new capture folder, marked as being filled by this process."""
    path = root() / f"fork-{secrets.token_hex(6)}"
    path.mkdir(mode=0o700)
    (path / CREATING).write_text(f"{os.getpid()} {registry.process_start(os.getpid()) or 0}")
    return path


def done_creating(path: Path) -> None:
    """Every child has its record: from now on the records alone keep the capture."""
    (path / CREATING).unlink(missing_ok=True)


def of(source: str | os.PathLike[str] | None) -> Path | None:
    """The capture folder a VM record's source names, or None if it is not a capture."""
    if not source:
        return None
    p = Path(source)
    return p if CAPTURE_RE.match(p.name) and p.parent == root() else None


def _creator_alive(path: Path) -> bool:
    try:
        pid, start = (int(x) for x in (path / CREATING).read_text().split())
    except FileNotFoundError:
        return False
    except ValueError:
        return True  # being written right now
    return registry.process_start(pid) == start


def captures() -> list[Path]:
    return sorted(p for p in root().iterdir() if p.is_dir() and CAPTURE_RE.match(p.name))


def used_bytes(path: Path) -> int:
    """Disk the capture takes beyond what it shares (memory.bin is a link when layered)."""
    total = 0
    for f in path.iterdir():
        try:
            st = f.stat()
        except OSError:
            continue
        if f.is_file() and not (f.name == "memory.bin" and st.st_nlink > 1):
            total += st.st_blocks * 512
    return total


def collect() -> list[str]:
    """Remove every capture no live VM and no running fork() needs; their names."""
    live, _gone = registry.scan()
    needed = {str(p) for p in (of(r.source) for r in live) if p is not None}
    removed = []
    for path in captures():
        if str(path) in needed or _creator_alive(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def report() -> dict[str, object]:
    """For `smolvm doctor`: the captures kept and the disk they use (orphans removed first)."""
    removed = collect()
    kept = captures()
    return {
        "count": len(kept), "bytes": sum(used_bytes(p) for p in kept),
        "removed_orphans": removed,
    }  # fmt: skip

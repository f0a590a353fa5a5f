"""Where BrowserSessions keep their state on the host: session records, kept profiles, artifacts, browser snapshots."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._paths import home
from .errors import BrowserSessionNotFoundError

STATUSES = ("created", "starting", "ready", "stopping", "stopped", "error")


@dataclass
class BrowserSessionInfo:
    """What any process needs to reach a browser session (kept in $SMOLVM_HOME/browser/sessions)."""

    session_id: str
    vm_id: str | None
    status: str
    mode: str
    cdp_url: str | None = None
    live_url: str | None = None
    debug_port: int | None = None
    live_port: int | None = None
    profile_id: str | None = None
    created: float = 0.0
    expires_at: float = 0.0  # time.time() after which the session stops itself
    artifacts_dir: str = ""
    persistent: bool = False  # outlives its creating process (start() outside `with`)
    owner_pid: int = 0
    reaper_pid: int = 0  # the host process that ends the session at expires_at
    config: dict[str, Any] = field(default_factory=dict)


def root() -> Path:
    r = home() / "browser"
    r.mkdir(parents=True, exist_ok=True)
    return r


def sessions_dir() -> Path:
    d = root() / "sessions"
    d.mkdir(parents=True, exist_ok=True)
    return d


def artifacts_dir(session_id: str) -> Path:
    return root() / "artifacts" / session_id


def profile_archive(profile_id: str) -> Path:
    d = root() / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{profile_id}.tar.gz"


def _path(session_id: str) -> Path:
    return sessions_dir() / f"{session_id}.json"


def save(info: BrowserSessionInfo) -> None:
    path = _path(info.session_id)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(info), indent=1))
    os.replace(tmp, path)


def load(session_id: str) -> BrowserSessionInfo:
    try:
        data = json.loads(_path(session_id).read_text())
    except FileNotFoundError:
        known = ", ".join(i.session_id for i in scan()) or "none"
        raise BrowserSessionNotFoundError(
            f"no browser session {session_id!r} here (sessions: {known}); `smolvm browser ls` lists them"
        ) from None
    except ValueError as e:
        raise BrowserSessionNotFoundError(f"the record of browser session {session_id!r} is corrupt: {e}") from None
    known_fields = BrowserSessionInfo.__dataclass_fields__
    return BrowserSessionInfo(**{k: v for k, v in data.items() if k in known_fields})


def exists(session_id: str) -> bool:
    return _path(session_id).exists()


def remove(session_id: str) -> None:
    _path(session_id).unlink(missing_ok=True)


def scan() -> list[BrowserSessionInfo]:
    out = []
    for p in sorted(sessions_dir().glob("*.json")):
        try:
            data = json.loads(p.read_text())
            out.append(BrowserSessionInfo(**{k: v for k, v in data.items() if k in BrowserSessionInfo.__dataclass_fields__}))
        except (OSError, ValueError, TypeError):
            continue
    return out

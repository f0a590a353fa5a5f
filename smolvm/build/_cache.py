"""Content-addressed cache folders: built in a temporary folder, renamed into place when complete."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from .._paths import home


def digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def progress(msg: str) -> None:
    print(f"smolvm: {msg}", file=sys.stderr, flush=True)


def cached(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """Return $SMOLVM_HOME/<kind>/<key>, calling build(tmpdir) first if it is not there.

    A folder only appears under its final name once build() returned, so an
    interrupted build is never mistaken for a finished one.
    """
    final = home() / kind / key
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        (tmp / ".complete").write_text(key + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

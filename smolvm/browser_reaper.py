"""`python -m smolvm.browser_reaper SESSION_ID`: stops a browser session when its timeout_minutes are over."""

from __future__ import annotations

import sys
import time

from . import browser_store as store
from .errors import SmolVMError

POLL_S = 30.0


def main(session_id: str) -> int:
    while True:
        try:
            info = store.load(session_id)
        except SmolVMError:
            return 0  # stopped by someone else
        left = info.expires_at - time.time()
        if left <= 0:
            break
        time.sleep(min(POLL_S, left))
    from .browser import BrowserSession

    try:
        session = BrowserSession.from_id(session_id)
    except SmolVMError:
        store.remove(session_id)
        return 0
    session._info.reaper_pid = 0  # do not signal ourselves
    session.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""`smolvm browser start|ls|stop|logs`: browser sessions (Chromium in a microVM, reached over CDP)."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any

from ._common import add_command, fail, listed, print_json, table


def _fail(msg: str) -> int:
    return fail(msg, 1, "smolvm browser")


def cmd_start(args: argparse.Namespace) -> int:
    from ..browser import BrowserSession
    from ..browser_config import BrowserSessionConfig, parse_viewport
    from ..errors import SmolVMError

    try:
        kw: dict[str, Any] = {"mode": "live" if args.live else "headless", "record_video": args.record_video,
                              "timeout_minutes": args.timeout_minutes, "mem_size_mib": args.memory}  # fmt: skip
        if args.viewport:
            kw["viewport"] = parse_viewport(args.viewport)
        if args.session_id:
            kw["session_id"] = args.session_id
        if args.profile_id:
            kw["profile_mode"], kw["profile_id"] = "persistent", args.profile_id
        session = BrowserSession(BrowserSessionConfig(**kw)).start()
    except (SmolVMError, ValueError, TypeError) as e:
        return _fail(str(e))
    info = session.info
    session.close()
    if args.json:
        print_json(asdict(info))
    else:
        print(f"session {info.session_id} ready (VM {info.vm_id})")
        print(f"  cdp_url:  {info.cdp_url}")
        if info.live_url:
            print(f"  live_url: {info.live_url}")
        print(f"  stops itself in {round((info.expires_at - time.time()) / 60)} minutes; "
              f"`smolvm browser stop {info.session_id}` stops it now")  # fmt: skip
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from ..browser import BrowserSession

    sessions = BrowserSession.list()
    if listed(args.json, "sessions", [asdict(s) for s in sessions],
              "no browser sessions: `smolvm browser start` starts one"):  # fmt: skip
        return 0
    rows = [["SESSION", "STATUS", "MODE", "VM", "CDP", "LIVE", "LEFT"]]
    for s in sessions:
        left = max(0, int(s.expires_at - time.time()))
        rows.append([s.session_id, s.status, s.mode, s.vm_id or "-", s.cdp_url or "-", s.live_url or "-",
                     f"{left // 60}m"])  # fmt: skip
    table(rows)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from ..browser import BrowserSession
    from ..errors import SmolVMError

    rc = 0
    for sid in args.session_ids:
        try:
            s = BrowserSession.from_id(sid)
            s.stop()
            print(f"stopped {sid}; artifacts in {s.artifacts_dir}")
        except SmolVMError as e:
            rc = _fail(str(e))
    return rc


def cmd_logs(args: argparse.Namespace) -> int:
    from ..browser import BrowserSession
    from ..errors import SmolVMError

    try:
        s = BrowserSession.from_id(args.session_id)
        print(s.logs(tail=args.tail))
        s.close()
    except SmolVMError as e:
        return _fail(str(e))
    return 0


def add_parser(sub: Any) -> None:
    br = sub.add_parser("browser", help="browser sessions: start, ls, stop, logs")
    bsub = br.add_subparsers(dest="browser_cmd", required=True)
    st = add_command(bsub, "start", cmd_start, "start a browser session that lasts until `stop` or its timeout",
                     description="Prints the session's id, its CDP URL (Playwright's connect_over_cdp) "
                     "and, with --live, the noVNC page that shows its display.")  # fmt: skip
    st.add_argument("--live", action="store_true", help="Chromium on a virtual display, shown at live_url")
    st.add_argument("--record-video", action="store_true", help="record the live display (needs --live)")
    st.add_argument("--viewport", metavar="WxH", help="page size, e.g. 1440x900 (default 1280x720)")
    st.add_argument("--session-id", help="the session's id (default: browser-<random>)")
    st.add_argument("--profile-id", help="keep the browser profile under this name (persistent profile)")
    st.add_argument("--timeout-minutes", type=int, default=30, help="stop after this long (1-240, default 30)")
    st.add_argument("--memory", type=int, default=2048, help="VM memory in MiB (default 2048)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    add_command(bsub, "ls", cmd_ls, "list browser sessions", json_help='machine-readable: {"sessions": [...]}')
    sp = add_command(bsub, "stop", cmd_stop, "stop browser sessions (their artifacts are kept on the host)")
    sp.add_argument("session_ids", nargs="+", metavar="ID")
    lg = add_command(bsub, "logs", cmd_logs, "the browser's logs in the guest and the VM console")
    lg.add_argument("session_id", metavar="ID")
    lg.add_argument("--tail", type=int, default=100, help="lines per log (default 100)")

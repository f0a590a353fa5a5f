"""`smolvm mcp`: serve sandboxes to an MCP client over stdio (smolvm/integrations/mcp_server.py)."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import EXIT_USAGE, add_command, fail


def cmd_mcp(args: argparse.Namespace) -> int:
    try:
        from ..integrations import mcp_server

        mcp_server.build_server()  # the mcp package is there (else: say what to install)
    except ImportError as e:
        return fail(str(e), EXIT_USAGE, "smolvm mcp")
    mcp_server.serve()
    return 0


def add_parser(sub: Any) -> None:
    add_command(sub, "mcp", cmd_mcp,
                "serve smolvm sandboxes over MCP on stdin/stdout (for Claude Desktop-style clients)")

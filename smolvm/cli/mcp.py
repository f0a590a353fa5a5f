"""`smolvm mcp`: serve sandboxes to an MCP client over stdio (smolvm/integrations/mcp_server.py)."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import EXIT_USAGE, add_command, fail


def cmd_mcp(args: argparse.Namespace) -> int:
    try:
        from ..integrations import mcp_server

        server = mcp_server.build_server()
    except ImportError as e:  # no mcp package: say what to install
        return fail(str(e), EXIT_USAGE, "smolvm mcp")
    mcp_server.serve(server)
    return 0


def add_parser(sub: Any) -> None:
    add_command(sub, "mcp", cmd_mcp,
                "serve smolvm sandboxes over MCP on stdin/stdout (for Claude Desktop-style clients)")

"""`smolvm mcp` driven by the official `mcp` package's own stdio client, against real VMs."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

mcp = pytest.importorskip("mcp", reason="the MCP tests need the mcp package (pip install 'smolvm[mcp]')")

from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402

pytestmark = pytest.mark.vm

TOOLS = {"create_sandbox", "list_sandboxes", "delete_sandbox", "run", "write_file", "read_file", "upload", "download"}


def _error(res: Any) -> bool:
    return bool(getattr(res, "is_error", getattr(res, "isError", False)))


def _data(res: Any) -> Any:
    """A tool's return value: its structured content (`{"result": ...}` wraps non-objects)."""
    data = getattr(res, "structured_content", getattr(res, "structuredContent", None))
    assert data is not None, res
    return data.get("result", data) if set(data) == {"result"} else data


def _text(res: Any) -> str:
    return " ".join(getattr(c, "text", "") for c in res.content)


async def _session(env: dict[str, str], tmp: str) -> dict[str, Any]:
    params = StdioServerParameters(command=sys.executable, args=["-m", "smolvm", "mcp"], env=env)
    seen: dict[str, Any] = {}
    async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
        await s.initialize()
        seen["tools"] = {t.name for t in (await s.list_tools()).tools}
        created = _data(await s.call_tool("create_sandbox", {"memory": 512}))
        sid = created["sandbox_id"]
        try:
            seen["listed"] = [v["sandbox_id"] for v in _data(await s.call_tool("list_sandboxes", {}))]
            command = "echo hi; echo err >&2; exit 3"
            seen["run"] = _data(await s.call_tool("run", {"sandbox_id": sid, "command": command}))
            path = "/root/new/dir/f.txt"
            wrote = await s.call_tool("write_file", {"sandbox_id": sid, "path": path, "content": "héllo\n"})
            assert not _error(wrote), _text(wrote)
            seen["read"] = _data(await s.call_tool("read_file", {"sandbox_id": sid, "path": path}))
            seen["download"] = _data(await s.call_tool(
                "download", {"sandbox_id": sid, "guest_path": path, "local_path": f"{tmp}/got.txt"}))
            seen["missing"] = await s.call_tool("read_file", {"sandbox_id": sid, "path": "/no/such/file"})
        finally:
            seen["deleted"] = _data(await s.call_tool("delete_sandbox", {"sandbox_id": sid}))
        seen["after"] = [v["sandbox_id"] for v in _data(await s.call_tool("list_sandboxes", {}))]
        seen["gone"] = await s.call_tool("run", {"sandbox_id": sid, "command": "true"})
        seen["sid"] = sid
    return seen


def test_mcp_client_creates_runs_moves_files_and_deletes(smolvm_env: dict[str, str], tmp_path: Any) -> None:
    seen = asyncio.run(asyncio.wait_for(_session(smolvm_env, str(tmp_path)), timeout=900))
    sid = seen["sid"]
    assert seen["tools"] == TOOLS
    assert sid in seen["listed"]
    assert seen["run"]["exit_code"] == 3 and seen["run"]["stdout"] == "hi\n" and seen["run"]["stderr"] == "err\n"
    assert seen["read"] == "héllo\n"
    assert (tmp_path / "got.txt").read_text(encoding="utf-8") == "héllo\n"
    assert _error(seen["missing"]) and "/no/such/file" in _text(seen["missing"])
    assert sid in seen["deleted"] and sid not in seen["after"]
    assert _error(seen["gone"]) and f"no sandbox {sid!r}" in _text(seen["gone"])

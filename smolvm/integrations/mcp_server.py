"""`smolvm mcp`: smolvm sandboxes served over MCP (stdio), with the official `mcp` package.

Tools: create_sandbox, list_sandboxes, delete_sandbox, run, write_file, read_file, upload,
download. A sandbox is a persistent SmolVM: it outlives the server (and the MCP session) until
delete_sandbox, so a client can come back to it; every call reaches it by id as
`SmolVM.from_id` does.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._boot import DEFAULT_MEMORY_MIB, DEFAULT_VCPUS
from ..errors import SmolVMError, VMNotFoundError
from ..vm import SmolVM

READ_LIMIT = 1 << 20  # read_file returns at most this many bytes of text


def _mcp() -> tuple[Any, type[Exception]]:
    """The server class and the ToolError (whose message reaches the client) of the installed mcp."""
    try:
        from mcp.server.mcpserver import MCPServer  # mcp >= 2
        from mcp.server.mcpserver.exceptions import ToolError

        return MCPServer, ToolError
    except ImportError:
        pass
    try:
        from mcp.server.fastmcp import FastMCP  # type: ignore[attr-defined,unused-ignore]  # mcp 1.x
        from mcp.server.fastmcp.exceptions import ToolError as ToolError1  # type: ignore[import-not-found,unused-ignore]

        return FastMCP, ToolError1
    except ImportError:
        raise ImportError(
            "smolvm mcp needs the `mcp` package: pip install 'smolvm[mcp]' (or pip install mcp)"
        ) from None


def _attach(sandbox_id: str) -> SmolVM:
    try:
        return SmolVM.from_id(sandbox_id)
    except VMNotFoundError:
        raise ValueError(f"no sandbox {sandbox_id!r}: list_sandboxes shows the running ones") from None


def _on(sandbox_id: str, action: Any) -> Any:
    vm = _attach(sandbox_id)
    try:
        return action(vm)
    finally:
        vm.close()  # detaches: a persistent sandbox keeps running


def create_sandbox(
    memory: int = DEFAULT_MEMORY_MIB, vcpus: int = DEFAULT_VCPUS, disk_size: int | None = None, internet: bool = True
) -> dict[str, Any]:
    """Start a new sandbox (a KVM microVM with Debian and python3); returns its sandbox_id."""
    vm = SmolVM(memory=memory, vcpus=vcpus, disk_size=disk_size, internet=internet)
    vm.start()
    try:
        return {"sandbox_id": vm.vm_id, "memory_mib": vm.memory, "vcpus": vm.vcpus}
    finally:
        vm.close()


def list_sandboxes() -> list[dict[str, Any]]:
    """The sandboxes running on this machine."""
    return [{"sandbox_id": r.vm_id, "memory_mib": r.memory, "vcpus": r.vcpus, "persistent": r.persistent}
            for r in SmolVM.list()]  # fmt: skip


def delete_sandbox(sandbox_id: str) -> str:
    """Stop a sandbox and delete everything it had."""
    _attach(sandbox_id).delete()
    return f"deleted {sandbox_id}"


def run(sandbox_id: str, command: str, timeout: float = 60, cwd: str | None = None) -> dict[str, Any]:
    """Run a shell command in the sandbox; returns exit_code, stdout, stderr (timeout in seconds)."""
    def go(vm: SmolVM) -> dict[str, Any]:
        r = vm.run(command, timeout=timeout, cwd=cwd)
        return {"exit_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr, "timed_out": r.timed_out}

    return dict(_on(sandbox_id, go))


def write_file(sandbox_id: str, path: str, content: str) -> str:
    """Write text (UTF-8) to the absolute guest path, making missing folders."""
    def go(vm: SmolVM) -> str:
        with tempfile.TemporaryDirectory() as d:
            local = Path(d) / "content"
            local.write_text(content, encoding="utf-8")
            n = vm.upload_file(local, path, mode=0o644)
        return f"wrote {n} bytes to {path}"

    return str(_on(sandbox_id, go))


def read_file(sandbox_id: str, path: str) -> str:
    """The text of the guest file path (UTF-8, undecodable bytes replaced; at most 1 MiB)."""
    def go(vm: SmolVM) -> str:
        with tempfile.TemporaryDirectory() as d:
            local = vm.download_file(path, Path(d) / "content")
            with open(local, "rb") as f:
                return f.read(READ_LIMIT).decode("utf-8", errors="replace")

    return str(_on(sandbox_id, go))


def upload(sandbox_id: str, local_path: str, guest_path: str) -> str:
    """Copy a file of the machine the server runs on into the sandbox."""
    n = _on(sandbox_id, lambda vm: vm.upload_file(os.path.expanduser(local_path), guest_path))
    return f"uploaded {n} bytes to {guest_path}"


def download(sandbox_id: str, guest_path: str, local_path: str) -> str:
    """Copy a sandbox file to the machine the server runs on."""
    got = _on(sandbox_id, lambda vm: vm.download_file(guest_path, os.path.expanduser(local_path)))
    return f"downloaded {guest_path} to {got}"


TOOLS = (create_sandbox, list_sandboxes, delete_sandbox, run, write_file, read_file, upload, download)


def _reporting(tool: Callable[..., Any], tool_error: type[Exception]) -> Callable[..., Any]:
    """tool, with the errors a caller can fix (a bad id, a missing file, a dead VM) sent to the
    client as the tool's error message rather than as a crash."""

    @functools.wraps(tool)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return tool(*args, **kwargs)
        except (SmolVMError, OSError, ValueError, TypeError) as e:
            raise tool_error(f"{type(e).__name__}: {e}") from e

    return call


def build_server() -> Any:
    """The MCP server with smolvm's tools (not started)."""
    server_class, tool_error = _mcp()
    server = server_class(
        "smolvm",
        instructions="Disposable Linux sandboxes (KVM microVMs): create one, run shell commands "
        "and move files in it, delete it when done.",
    )
    for tool in TOOLS:
        server.tool()(_reporting(tool, tool_error))
    return server


def serve(server: Any = None) -> None:
    """Serve server (default: build_server()) over stdio until the client closes it. The
    protocol keeps the real stdout; fd 1 becomes stderr, so nothing a child process (a VMM, a
    build tool) prints can break it."""
    if server is None:
        server = build_server()
    protocol = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(protocol, "w", encoding="utf-8", closefd=True)  # noqa: SIM115 (lives as long as the server)
    server.run()


__all__ = ["TOOLS", "build_server", "serve"]

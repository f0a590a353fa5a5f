"""SmolVM as an OpenAI Agents SDK function tool.

    from agents import Agent
    from smolvm.integrations.openai_agents import smolvm_tool
    agent = Agent(name="assistant", tools=[smolvm_tool()])
"""

from __future__ import annotations

from typing import Any

from ..runtime import SmolVMRuntime
from . import TOOL_NAME, make_run_function, require, run_in_smolvm

__all__ = ["run_in_smolvm", "smolvm_tool"]


def smolvm_tool(runtime: SmolVMRuntime | None = None, *, name: str = TOOL_NAME) -> Any:
    """An `agents.FunctionTool` running commands in `runtime`'s VM, or an ephemeral VM per call.

    The SDK runs this synchronous tool in a worker thread (asyncio.to_thread), so a command
    does not block the event loop.
    """
    agents = require("agents", "openai-agents")
    return agents.function_tool(
        make_run_function(runtime), name_override=name, docstring_style="google"
    )

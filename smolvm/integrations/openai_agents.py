"""SmolVM for the OpenAI Agents SDK: a function tool, and a sandbox client for SandboxAgent.

    from agents import Agent
    from smolvm.integrations.openai_agents import smolvm_tool
    agent = Agent(name="assistant", tools=[smolvm_tool()])

    from agents.sandbox import SandboxAgent, SandboxRunConfig
    from smolvm.integrations.openai_agents import SmolVMSandboxClient
    run_config = RunConfig(sandbox=SandboxRunConfig(client=SmolVMSandboxClient()))

The sandbox classes (smolvm/integrations/openai_agents_sandbox.py) are imported on first
use, so this module imports without the SDK; a missing SDK raises ImportError naming the
extra (`pip install "smolvm[openai-agents]"`).
"""

from __future__ import annotations

from typing import Any

from ..runtime import SmolVMRuntime
from . import TOOL_NAME, make_run_function, require, run_in_smolvm

__all__ = [
    "SmolVMSandboxClient",
    "SmolVMSandboxClientOptions",
    "SmolVMSandboxSession",
    "SmolVMSandboxSessionState",
    "run_in_smolvm",
    "smolvm_tool",
]

_SANDBOX_NAMES = frozenset(__all__[:4])


def smolvm_tool(runtime: SmolVMRuntime | None = None, *, name: str = TOOL_NAME) -> Any:
    """An `agents.FunctionTool` running commands in `runtime`'s VM, or an ephemeral VM per call.

    The SDK runs this synchronous tool in a worker thread (asyncio.to_thread), so a command
    does not block the event loop.
    """
    agents = require("agents", "openai-agents", "openai-agents")
    return agents.function_tool(
        make_run_function(runtime), name_override=name, docstring_style="google"
    )


def __getattr__(name: str) -> Any:
    if name in _SANDBOX_NAMES:
        require("agents.sandbox", "openai-agents", "openai-agents")
        from . import openai_agents_sandbox

        return getattr(openai_agents_sandbox, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

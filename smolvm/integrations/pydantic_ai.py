"""SmolVM as a pydantic-ai tool.

    from pydantic_ai import Agent
    from smolvm.integrations.pydantic_ai import smolvm_tool
    agent = Agent("openai:gpt-4.1", tools=[smolvm_tool()])
"""

from __future__ import annotations

from typing import Any

from ..runtime import SmolVMRuntime
from . import TOOL_NAME, make_run_function, require, run_in_smolvm

__all__ = ["run_in_smolvm", "smolvm_tool"]


def smolvm_tool(runtime: SmolVMRuntime | None = None, *, name: str = TOOL_NAME) -> Any:
    """A `pydantic_ai.Tool` running commands in `runtime`'s VM, or an ephemeral VM per call.

    The tool's description and parameter descriptions come from the function's google-style
    docstring.
    """
    tools = require("pydantic_ai.tools", "pydantic-ai-slim", "pydantic-ai")
    return tools.Tool(
        make_run_function(runtime),
        takes_ctx=False,
        name=name,
        docstring_format="google",
        require_parameter_descriptions=True,
    )

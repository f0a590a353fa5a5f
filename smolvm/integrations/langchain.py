"""SmolVM as a LangChain tool.

    from smolvm.integrations.langchain import smolvm_tool
    agent = create_react_agent(llm, [smolvm_tool()])
"""

from __future__ import annotations

from typing import Any

from ..runtime import SmolVMRuntime
from . import TOOL_NAME, make_run_function, require, run_in_smolvm

__all__ = ["run_in_smolvm", "smolvm_tool"]


def smolvm_tool(runtime: SmolVMRuntime | None = None, *, name: str = TOOL_NAME) -> Any:
    """A LangChain `StructuredTool` running commands in `runtime`'s VM, or an ephemeral VM per call.

    Arguments (`command`, `timeout`) and their descriptions come from the google-style docstring.
    """
    tools = require("langchain_core.tools", "langchain-core", "langchain")
    return tools.StructuredTool.from_function(
        make_run_function(runtime), name=name, parse_docstring=True
    )

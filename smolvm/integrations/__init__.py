"""Ready-made SmolVM shell tools for agent frameworks.

    from smolvm.integrations.pydantic_ai import smolvm_tool      # pydantic_ai.Tool
    from smolvm.integrations.langchain import smolvm_tool        # langchain StructuredTool
    from smolvm.integrations.openai_agents import smolvm_tool    # agents.FunctionTool

Each `smolvm_tool(runtime=None)` runs the model's commands in `runtime`'s VM (one VM
reused across calls, see smolvm.runtime.SmolVMRuntime) or, with no runtime, in a fresh
ephemeral `with SmolVM()` per call. The frameworks are optional: they are imported only
when a tool is built, and a missing one raises ImportError naming the extra to install
(`smolvm[pydantic-ai]`, `smolvm[langchain]`, `smolvm[openai-agents]`; `smolvm[examples]` has
them all).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

from ..runtime import SmolVMRuntime, format_result
from ..vm import SmolVM

TOOL_NAME = "run_in_smolvm"
TOOL_DESCRIPTION = "Run a shell command inside an isolated SmolVM sandbox (a KVM microVM)."

__all__ = ["TOOL_DESCRIPTION", "TOOL_NAME", "make_run_function", "require", "run_in_smolvm"]


def run_in_smolvm(command: str, timeout: int = 30) -> str:
    """Run a shell command inside an ephemeral SmolVM sandbox.

    Args:
        command: Shell command to execute inside the sandbox guest.
        timeout: Maximum number of seconds to wait for the command.
    """
    with SmolVM() as vm:
        return format_result(vm.run(command, timeout=timeout), timeout)


def make_run_function(runtime: SmolVMRuntime | None = None) -> Callable[[str, int], str]:
    """`run_in_smolvm` itself (runtime None), or a function of the same name, signature and
    docstring that runs in `runtime`'s reused VM."""
    if runtime is None:
        return run_in_smolvm

    def run_in_smolvm_runtime(command: str, timeout: int = 30) -> str:
        """Run a shell command inside a persistent SmolVM sandbox (state is kept between calls).

        Args:
            command: Shell command to execute inside the sandbox guest.
            timeout: Maximum number of seconds to wait for the command.
        """
        return runtime.run(command, timeout=timeout)

    run_in_smolvm_runtime.__name__ = TOOL_NAME
    run_in_smolvm_runtime.__qualname__ = TOOL_NAME
    return run_in_smolvm_runtime


def require(module: str, package: str, extra: str) -> ModuleType:
    """Import `module` of an optional framework, or raise ImportError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is not installed: this SmolVM integration needs {package}. "
            f'Install it with `pip install "smolvm[{extra}]"` (or `pip install {package}`; '
            f'`pip install "smolvm[examples]"` installs every framework the examples use).'
        ) from e

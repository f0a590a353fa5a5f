"""The reference docs' examples (tests/_seed_examples.py) run against real VMs with each
framework's own offline model: pydantic-ai's FunctionModel, the Agents SDK's ScriptedModel,
LangChain's fake chat model under LangGraph's create_react_agent. The reusable-sandbox
pattern runs its first turn in another process and its second here, then deletes the VM.
Agentor's SmolVMRuntime is tests/test_api_compat.py's. Also: `smolvm[examples]` lists
every framework these examples import.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from smolvm import SmolVM
from smolvm.errors import VMNotFoundError

sys.path.insert(0, str(Path(__file__).parent))
import _seed_examples as seed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Run `uname -a && python3 --version` in the sandbox."
COMMAND = "uname -a && python3 --version"

# module -> the distribution `smolvm[examples]` must install for it
EXAMPLE_IMPORTS = {
    "pydantic_ai": "pydantic-ai",
    "agents": "openai-agents",
    "langchain_core": "langchain-core",
    "langchain_openai": "langchain-openai",
    "langgraph": "langgraph",
    "playwright": "playwright",
    "agentor": "agentor",
}


def _needs(*modules: str) -> pytest.MarkDecorator:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"{', '.join(missing)} not importable: pip install \"smolvm[examples]\""
    )


def _ran_uname(text: str) -> None:
    assert text.startswith("exit_code: 0\nstdout:\nLinux "), text
    assert "Python 3." in text, text


def test_examples_extra_lists_every_framework() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11's")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {req.split(";")[0].split(">")[0].split("=")[0].strip() for req in extras["examples"]}
    assert set(EXAMPLE_IMPORTS.values()) <= names, names


# ---- pydantic-ai ---------------------------------------------------------------------------


def _pydantic_returns(messages: list[Any], tool: str) -> list[str]:
    from pydantic_ai.messages import ToolReturnPart

    return [
        str(p.content)
        for m in messages
        for p in m.parts
        if isinstance(p, ToolReturnPart) and p.tool_name == tool
    ]


def _pydantic_model(tool: str, commands: list[str]) -> Any:
    """A FunctionModel that calls `tool` with commands[0], then answers with what it returned."""
    from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart
    from pydantic_ai.models.function import FunctionModel

    def model(messages: list[Any], info: Any) -> Any:
        done = _pydantic_returns(messages, tool)
        if not done:
            return ModelResponse(parts=[ToolCallPart(tool, {"command": commands.pop(0)})])
        return ModelResponse(parts=[TextPart(done[-1])])

    return FunctionModel(model)


@pytest.mark.vm
@_needs("pydantic_ai")
def test_pydantic_ai_ephemeral_tool(vm: SmolVM) -> None:
    from pydantic_ai import Agent

    agent = Agent(_pydantic_model("run_in_smolvm", [COMMAND]), instructions="Call run_in_smolvm exactly once.")
    agent.tool_plain(docstring_format="google", require_parameter_descriptions=True)(seed.run_in_smolvm)
    result = agent.run_sync(PROMPT)
    _ran_uname(result.output)


@pytest.mark.vm
@_needs("pydantic_ai")
def test_pydantic_ai_reusable_sandbox_across_processes(vm: SmolVM) -> None:
    """Turn one (in a child process) makes the VM and writes a note; turn two (here) reaches it
    through deps.vm_id and reads it; the docs' clean-up deletes it."""
    first = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import _seed_examples as seed\n"
        "from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart\n"
        "from pydantic_ai.models.function import FunctionModel\n"
        "def model(messages, info):\n"
        "    if len(messages) == 1:\n"
        "        call = ToolCallPart('run_in_reusable_smolvm', {'command': 'echo hello > /tmp/note.txt'})\n"
        "        return ModelResponse(parts=[call])\n"
        "    return ModelResponse(parts=[TextPart('written')])\n"
        "deps = seed.SandboxDeps()\n"
        "agent = seed.reusable_agent(FunctionModel(model))\n"
        "out = agent.run_sync(\"Write 'hello' to /tmp/note.txt\", deps=deps).output\n"
        "print(json.dumps({'vm_id': deps.vm_id, 'out': out}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", first, str(Path(__file__).parent)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    deps = seed.SandboxDeps(vm_id=got["vm_id"])
    assert got["out"] == "written" and deps.vm_id
    try:
        agent = seed.reusable_agent(_pydantic_model("run_in_reusable_smolvm", ["cat /tmp/note.txt"]))
        result = agent.run_sync("Read /tmp/note.txt and confirm the contents", deps=deps)
        assert result.output == "exit_code: 0\nstdout:\nhello\nstderr:\n<empty>"
        assert deps.vm_id == got["vm_id"]  # the same sandbox, not a new one
    finally:
        seed.cleanup_vm(deps.vm_id)
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id(got["vm_id"])


# ---- OpenAI Agents SDK -----------------------------------------------------------------


@pytest.mark.vm
@_needs("agents")
def test_openai_agents_function_tool(vm: SmolVM) -> None:
    from agents import Agent, RunConfig, Runner, function_tool
    from agents.testing import ScriptedModel, assistant_message, function_call

    model = ScriptedModel([
        [function_call("run_in_smolvm", {"command": COMMAND}, call_id="call-1")],
        [assistant_message("summarised")],
    ])  # fmt: skip
    agent = Agent(name="SmolVM Assistant", model=model, tools=[function_tool(seed.run_in_smolvm)],
                  instructions="Call run_in_smolvm exactly once and then summarize the result.")  # fmt: skip
    result = Runner.run_sync(agent, PROMPT, run_config=RunConfig(tracing_disabled=True))
    assert result.final_output == "summarised"
    items = model.calls[1].input
    outputs = [i["output"] for i in items if isinstance(i, dict) and i.get("type") == "function_call_output"]
    assert len(outputs) == 1
    _ran_uname(str(outputs[0]))


# ---- LangChain / LangGraph ---------------------------------------------------------------


@pytest.mark.vm
@_needs("langchain_core", "langgraph", "langchain_openai")
@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")  # the docs' spelling, LangGraph 1.x
def test_langgraph_react_agent(vm: SmolVM) -> None:
    import langchain_openai  # noqa: F401  (the docs' import: it must be installed)
    from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool
    from langgraph.prebuilt import create_react_agent

    class ToolCallingFake(FakeMessagesListChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:  # the agent binds its tools
            return self

    run_in_smolvm = tool(seed.run_in_smolvm)
    call = {"name": "run_in_smolvm", "args": {"command": "uname -a"}, "id": "call-1"}
    replies = [AIMessage(content="", tool_calls=[call]), AIMessage(content="it is Linux")]
    llm = ToolCallingFake(responses=replies)
    agent = create_react_agent(llm, [run_in_smolvm])
    result = agent.invoke({"messages": [{"role": "user", "content": "Run uname -a in the sandbox"}]})
    assert result["messages"][-1].content == "it is Linux"
    tool_msgs = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert len(tool_msgs) == 1 and tool_msgs[0].tool_call_id == "call-1"
    assert tool_msgs[0].content.startswith("exit_code: 0\nstdout:\nLinux "), tool_msgs[0].content

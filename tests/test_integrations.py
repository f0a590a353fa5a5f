"""SmolVMRuntime and the agent-framework tools, run against a real VM.

One SmolVMRuntime (one VM, restored from the base snapshot) serves the module and is deleted
at its end. Each framework's test drives the tool through that framework's own offline
machinery (pydantic-ai TestModel/FunctionModel, a LangChain fake chat model, the OpenAI
Agents SDK's FunctionTool.on_invoke_tool), so the command really runs inside the VM.
Frameworks that are not installed are skipped, saying which package to install.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from smolvm.runtime import RuntimeClosedError, SmolVMRuntime

# 512 MiB is SmolVM's default: the VM restores the base snapshot the other suites use
# instead of cold-booting a new configuration (guest memory is costly on this host).
TEST_MEMORY = 512


def _needs(module: str, package: str) -> pytest.MarkDecorator:
    present = importlib.util.find_spec(module) is not None
    return pytest.mark.skipif(
        not present, reason=f"{module} is not importable: pip install {package} to run this test"
    )


needs_pydantic_ai = _needs("pydantic_ai", "pydantic-ai-slim")
needs_langchain = _needs("langchain_core", "langchain-core")
needs_openai_agents = _needs("agents", "openai-agents")


@pytest.fixture(scope="module")
def runtime() -> Iterator[SmolVMRuntime]:
    if not Path("/dev/kvm").exists():
        pytest.skip("/dev/kvm is absent: this host offers no KVM, so no VM can boot here")
    rt = SmolVMRuntime(memory=TEST_MEMORY, disk_size=256)
    yield rt
    rt.close()


# ---- SmolVMRuntime ------------------------------------------------------------------


def test_runtime_arguments_checked_without_booting() -> None:
    rt = SmolVMRuntime()
    assert (rt.memory, rt.disk_size) == (1024, 2048)
    assert rt.vm_id is None  # lazily started: nothing booted yet
    rt.close()
    for bad in (0, -5):
        with pytest.raises(ValueError, match="disk_size"):
            SmolVMRuntime(disk_size=bad)
    with pytest.raises(TypeError, match="disk_size"):
        SmolVMRuntime(disk_size="2G")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory"):
        SmolVMRuntime(memory=1)


@pytest.mark.vm
def test_runtime_output_format(runtime: SmolVMRuntime) -> None:
    out = runtime.run("echo out-text; echo err-text >&2")
    assert out == "exit_code: 0\nstdout:\nout-text\nstderr:\nerr-text"
    assert runtime.execute("true") == "exit_code: 0\nstdout:\n<empty>\nstderr:\n<empty>"


@pytest.mark.vm
def test_runtime_nonzero_exit(runtime: SmolVMRuntime) -> None:
    out = runtime.run("echo before-fail; ls /no/such/path; exit 3")
    assert out.startswith("exit_code: 3\nstdout:\nbefore-fail\nstderr:\n")
    assert "/no/such/path" in out


@pytest.mark.vm
def test_runtime_timeout_text(runtime: SmolVMRuntime) -> None:
    # 8 s: on emulating hosts under load, starting the shell alone can take seconds.
    out = runtime.run("echo started; sleep 60", timeout=8)
    assert out.startswith("exit_code: 124\nstdout:\nstarted\n"), out
    assert out.endswith("timed_out: true (the command was killed after 8 s)"), out
    assert runtime.run("echo still-usable").startswith("exit_code: 0\nstdout:\nstill-usable")


@pytest.mark.vm
def test_runtime_reuses_one_vm(runtime: SmolVMRuntime) -> None:
    first = runtime.run("uname -n; echo state > /tmp/runtime-note")
    vm_id = runtime.vm_id
    second = runtime.run("uname -n; cat /tmp/runtime-note")
    assert runtime.vm_id == vm_id is not None
    host1 = first.split("stdout:\n")[1].splitlines()[0]
    assert second.split("stdout:\n")[1].splitlines()[:2] == [host1, "state"]


@pytest.mark.vm
def test_runtime_threads_share_the_vm(runtime: SmolVMRuntime) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: runtime.run(f"echo t{i}"), range(4)))
    assert [o.split("\n")[2] for o in outs] == ["t0", "t1", "t2", "t3"]


@pytest.mark.vm
def test_runtime_close_idempotent(runtime: SmolVMRuntime) -> None:
    with SmolVMRuntime(memory=TEST_MEMORY) as rt:
        assert rt.run("echo up").startswith("exit_code: 0\nstdout:\nup")
        vm = rt.vm
    assert vm.status == "stopped"
    assert rt.closed
    rt.close()
    rt.close()
    with pytest.raises(RuntimeClosedError):
        rt.run("echo again")


# ---- plain function --------------------------------------------------------------


@pytest.mark.vm
def test_run_in_smolvm_ephemeral(runtime: SmolVMRuntime) -> None:
    from smolvm.integrations import run_in_smolvm

    runtime.run("true")  # the module's VM exists: the base snapshot is there to restore
    out = run_in_smolvm("echo ephemeral-vm; exit 5", timeout=20)
    assert out == "exit_code: 5\nstdout:\nephemeral-vm\nstderr:\n<empty>"


# ---- pydantic-ai -------------------------------------------------------------------


def _pydantic_tool_returns(messages: list) -> list[str]:
    from pydantic_ai.messages import ToolReturnPart

    return [
        str(part.content)
        for msg in messages
        for part in msg.parts
        if isinstance(part, ToolReturnPart) and part.tool_name == "run_in_smolvm"
    ]


@pytest.mark.vm
@needs_pydantic_ai
def test_pydantic_ai_test_model(runtime: SmolVMRuntime) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    from smolvm.integrations.pydantic_ai import smolvm_tool

    agent = Agent(TestModel(), tools=[smolvm_tool(runtime)])
    result = agent.run_sync("Run a command in the sandbox.")
    returns = _pydantic_tool_returns(result.all_messages())
    # TestModel makes up a string argument ("a"): no such command, yet it ran in the VM.
    assert len(returns) == 1 and returns[0].startswith("exit_code: 127\n"), returns


@pytest.mark.vm
@needs_pydantic_ai
def test_pydantic_ai_function_model(runtime: SmolVMRuntime) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel

    from smolvm.integrations.pydantic_ai import smolvm_tool

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        assert [t.name for t in info.function_tools] == ["run_in_smolvm"]
        done = _pydantic_tool_returns(messages)
        if not done:
            return ModelResponse(
                parts=[ToolCallPart("run_in_smolvm", {"command": "echo hello-from-vm"})]
            )
        return ModelResponse(parts=[TextPart("tool said: " + done[0])])

    agent = Agent(FunctionModel(model), tools=[smolvm_tool(runtime)])
    result = agent.run_sync("Say hello from the sandbox.")
    returns = _pydantic_tool_returns(result.all_messages())
    assert len(returns) == 1
    assert "exit_code: 0" in returns[0] and "hello-from-vm" in returns[0]
    assert "hello-from-vm" in result.output


# ---- LangChain -----------------------------------------------------------------------


@pytest.mark.vm
@needs_langchain
def test_langchain_agent_loop(runtime: SmolVMRuntime) -> None:
    from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    from smolvm.integrations.langchain import smolvm_tool

    tool = smolvm_tool(runtime)
    assert set(tool.args) == {"command", "timeout"}
    call = {"name": "run_in_smolvm", "args": {"command": "echo hello-from-vm"}, "id": "call-1"}
    llm = FakeMessagesListChatModel(
        responses=[AIMessage(content="", tool_calls=[call]), AIMessage(content="done")]
    )
    tools = {tool.name: tool}
    messages: list = [HumanMessage("Say hello from the sandbox.")]
    while True:  # the tool-calling loop an agent runs
        ai = llm.invoke(messages)
        messages.append(ai)
        if not ai.tool_calls:
            break
        for tc in ai.tool_calls:
            messages.append(tools[tc["name"]].invoke(tc))
    tool_msgs = [m for m in messages if isinstance(m, ToolMessage)]
    assert len(tool_msgs) == 1 and tool_msgs[0].tool_call_id == "call-1"
    assert "exit_code: 0" in tool_msgs[0].content and "hello-from-vm" in tool_msgs[0].content
    assert messages[-1].content == "done"
    assert "exit_code: 0\nstdout:\nhi" in tool.invoke({"command": "echo hi"})


# ---- OpenAI Agents SDK -----------------------------------------------------------------


@pytest.mark.vm
@needs_openai_agents
def test_openai_agents_function_tool(runtime: SmolVMRuntime) -> None:
    from agents import FunctionTool
    from agents.tool_context import ToolContext

    from smolvm.integrations.openai_agents import smolvm_tool

    tool = smolvm_tool(runtime)
    assert isinstance(tool, FunctionTool) and tool.name == "run_in_smolvm"
    assert set(tool.params_json_schema["properties"]) == {"command", "timeout"}
    args = json.dumps({"command": "echo hello-from-vm", "timeout": 20})
    ctx = ToolContext(
        context=None, tool_name=tool.name, tool_call_id="call-1", tool_arguments=args
    )
    out = asyncio.run(tool.on_invoke_tool(ctx, args))
    assert "exit_code: 0" in out and "hello-from-vm" in out


# ---- missing frameworks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("integration", "blocked", "package", "extra"),
    [
        ("pydantic_ai", "pydantic_ai", "pydantic-ai-slim", "pydantic-ai"),
        ("langchain", "langchain_core", "langchain-core", "langchain"),
        ("openai_agents", "agents", "openai-agents", "openai-agents"),
    ],
)
def test_missing_framework_error(
    monkeypatch: pytest.MonkeyPatch, integration: str, blocked: str, package: str, extra: str
) -> None:
    import importlib

    for name in [m for m in sys.modules if m == blocked or m.startswith(blocked + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # makes `import blocked...` fail
    mod = importlib.import_module(f"smolvm.integrations.{integration}")  # imports fine
    with pytest.raises(ImportError) as err:
        mod.smolvm_tool()
    msg = str(err.value)
    assert f'pip install "smolvm[{extra}]"' in msg and package in msg
    assert 'pip install "smolvm[examples]"' in msg  # every framework at once


@pytest.mark.vm
@needs_openai_agents
def test_openai_agents_runner_loop(runtime: SmolVMRuntime) -> None:
    """A full Runner turn with an offline model that calls the tool, then answers."""
    from agents import Agent, RunConfig, Runner
    from agents.items import ModelResponse
    from agents.models.interface import Model
    from agents.usage import Usage
    from openai.types.responses import (
        ResponseFunctionToolCall,
        ResponseOutputMessage,
        ResponseOutputText,
    )

    from smolvm.integrations.openai_agents import smolvm_tool

    seen: list[str] = []

    class ScriptedModel(Model):
        async def get_response(self, system_instructions, input, *args, **kwargs):  # type: ignore[no-untyped-def]
            outputs = [
                item.get("output")
                for item in (input if isinstance(input, list) else [])
                if isinstance(item, dict) and item.get("type") == "function_call_output"
            ]
            if not outputs:
                call = ResponseFunctionToolCall(
                    type="function_call",
                    call_id="call-1",
                    name="run_in_smolvm",
                    arguments=json.dumps({"command": "echo hello-from-vm", "timeout": 20}),
                )
                return ModelResponse(output=[call], usage=Usage(), response_id=None)
            seen.extend(str(o) for o in outputs)
            text = ResponseOutputText(type="output_text", text="ran it", annotations=[])
            msg = ResponseOutputMessage(
                id="msg-1", type="message", role="assistant", status="completed", content=[text]
            )
            return ModelResponse(output=[msg], usage=Usage(), response_id=None)

        def stream_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    agent = Agent(name="sandbox", model=ScriptedModel(), tools=[smolvm_tool(runtime)])
    result = Runner.run_sync(agent, "Say hello", run_config=RunConfig(tracing_disabled=True))
    assert result.final_output == "ran it"
    assert len(seen) == 1 and "exit_code: 0" in seen[0] and "hello-from-vm" in seen[0]

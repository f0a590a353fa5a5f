"""SmolVMSandboxClient: the OpenAI Agents SDK's SandboxAgent working in a real smolvm VM.

The model is the SDK's own ScriptedModel (agents.testing): no network, no API key. Its
tool calls go through the SDK's real tools (exec_command, write_stdin) into one persistent
VM that the module shares; the test then checks the VM with smolvm itself. Resuming from a
serialized state happens in a second process, as the SDK's RunState allows; a state whose VM
is gone resumes into a new VM hydrated from the session's snapshot. tty=true runs on the VM's
PTY (SmolVM.async_pty).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

agents = pytest.importorskip(
    "agents.sandbox", reason='needs the OpenAI Agents SDK: pip install "smolvm[openai-agents]"'
)

from agents import RunConfig, Runner  # noqa: E402
from agents.sandbox import Manifest, SandboxAgent, SandboxRunConfig  # noqa: E402
from agents.sandbox.entries import File  # noqa: E402
from agents.sandbox.errors import (  # noqa: E402
    ExposedPortUnavailableError,
    WorkspaceReadNotFoundError,
)
from agents.sandbox.snapshot import LocalSnapshotSpec  # noqa: E402
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call  # noqa: E402

from smolvm import SmolVM  # noqa: E402
from smolvm.errors import VMNotFoundError  # noqa: E402
from smolvm.integrations.openai_agents import (  # noqa: E402
    SmolVMSandboxClient,
    SmolVMSandboxClientOptions,
)

GUEST_PORT = 8000
WAIT_MS = 30_000  # the SDK's longest yield: a slow (loaded, nested) guest still answers in one


class _Loop:
    """One event loop for the module, so the session's asyncio objects stay on their loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __call__(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def run() -> Iterator[_Loop]:
    loop = _Loop()
    yield loop
    loop.loop.close()


@pytest.fixture(scope="module")
def client() -> SmolVMSandboxClient:
    if not Path("/dev/kvm").exists():
        pytest.skip("/dev/kvm is absent: this host offers no KVM, so no VM can boot here")
    return SmolVMSandboxClient()


@pytest.fixture(scope="module")
def session(run: _Loop, client: SmolVMSandboxClient) -> Iterator[Any]:
    manifest = Manifest(entries={"seed.txt": File(content=b"from the manifest\n")})
    s = run(client.create(manifest=manifest, options=SmolVMSandboxClientOptions(exposed_ports=(GUEST_PORT,))))
    try:
        run(s.start())
        yield s
    finally:
        run(client.delete(s))


def _outputs(call: Any) -> list[str]:
    """The function_call_output texts in a model call's input."""
    items = call.input if isinstance(call.input, list) else []
    return [str(i.get("output")) for i in items if isinstance(i, dict) and i.get("type") == "function_call_output"]


def _driver(command: str, seen: list[str]) -> Any:
    """A ScriptedModel responder: run `command` with exec_command, poll with write_stdin while it
    runs (a loaded host can be slow), then answer "done"."""

    def respond(call: Any) -> Any:
        outs = _outputs(call)
        if not outs:
            args = {"cmd": command, "yield_time_ms": WAIT_MS}
            return [function_call("exec_command", args, call_id="c0")]
        seen.append(outs[-1])
        running = re.search(r"Process running with session ID (\d+)", outs[-1])
        if running:
            args = {"session_id": int(running.group(1)), "chars": "", "yield_time_ms": WAIT_MS}
            return [function_call("write_stdin", args, call_id=f"c{len(outs)}")]
        return [assistant_message("done")]

    return respond


@pytest.mark.vm
def test_sandbox_agent_runs_tools_in_the_vm(run: _Loop, session: Any) -> None:
    """SandboxAgent + SandboxRunConfig(session=...): the agent's command writes a file in the VM
    (read back with smolvm) and its output comes back to the model."""
    seen: list[str] = []
    command = "cat seed.txt && echo agent-was-here > note.txt && uname -s"
    model = ScriptedModel([ModelStep.respond(_driver(command, seen))] * 6)
    agent = SandboxAgent(name="dev", model=model, instructions="Work in the sandbox.")
    cfg = RunConfig(sandbox=SandboxRunConfig(session=session), tracing_disabled=True)
    result = run(Runner.run(agent, "Leave a note.", run_config=cfg))
    assert result.final_output == "done"
    tools = {t.name for t in model.calls[0].tools}
    assert {"exec_command", "write_stdin"} <= tools, tools
    assert "Process exited with code 0" in seen[-1], seen
    text = "".join(seen)
    assert "from the manifest" in text and "Linux" in text, seen
    vm = SmolVM.from_id(session.state.vm_id)  # smolvm itself, not the SDK
    try:
        assert vm.run("cat /workspace/note.txt").stdout == "agent-was-here\n"
    finally:
        vm.close()


@pytest.mark.vm
def test_files_ports_and_exec_sessions(run: _Loop, session: Any) -> None:
    """write/read (binary), ls, mv, mkdir, rm, a missing file, an exposed port and a pipe-mode
    exec session, on the session's VM."""
    blob = bytes(range(256)) * 40
    run(session.write(Path("data/blob.bin"), io.BytesIO(blob)))
    assert run(session.read(Path("data/blob.bin"))).read() == blob
    run(session.mv("data/blob.bin", "data/moved.bin"))
    run(session.mkdir("data/sub/deeper", parents=True))
    names = {Path(e.path).name for e in run(session.ls("data"))}
    assert names == {"moved.bin", "sub"}, names
    run(session.rm("data", recursive=True))
    with pytest.raises(WorkspaceReadNotFoundError):
        run(session.read(Path("data/moved.bin")))
    with pytest.raises(ExposedPortUnavailableError):  # only configured ports are offered
        run(session.resolve_exposed_port(GUEST_PORT + 1))

    server = f"setsid nohup python3 -m http.server {GUEST_PORT} --bind 127.0.0.1 >/dev/null 2>&1 &"
    assert run(session.exec(server)).ok()
    endpoint = run(session.resolve_exposed_port(GUEST_PORT))
    assert endpoint.host == "127.0.0.1"
    again = run(session.resolve_exposed_port(GUEST_PORT))
    assert again.port == endpoint.port  # the VMM's forward is reused, not doubled
    # python3 starts slowly in a guest on a loaded host: wait (in the guest) until it listens
    listening = f"for i in $(seq 1200); do ss -ltn | grep -q ':{GUEST_PORT} ' && exit 0; sleep 0.5; done; exit 1"
    assert run(session.exec(listening, timeout=700)).ok()
    url = endpoint.url_for("http") + "seed.txt"
    body = run(asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=120).read()))
    assert body == b"from the manifest\n"

    update = run(session.pty_exec_start("echo first; sleep 1; echo second; exit 7", yield_time_s=0.3))
    out = update.output
    while update.exit_code is None:
        assert update.process_id is not None
        update = run(session.pty_write_stdin(session_id=update.process_id, chars="", yield_time_s=30))
        out += update.output
    assert (update.exit_code, out) == (7, b"first\nsecond\n")


@pytest.mark.vm
def test_tty_exec_session(run: _Loop, session: Any) -> None:
    """exec_command with tty=true: a PTY (SmolVM.async_pty) that write_stdin types into."""
    update = run(session.pty_exec_start("bash", tty=True, yield_time_s=1))
    out = update.output
    assert update.process_id is not None
    sid = update.process_id
    update = run(session.pty_write_stdin(session_id=sid, chars="tty; exit 3\n", yield_time_s=30))
    out += update.output
    while update.exit_code is None:
        update = run(session.pty_write_stdin(session_id=sid, chars="", yield_time_s=30))
        out += update.output
    assert update.exit_code == 3
    assert re.search(rb"/dev/pts/\d+", out), out


@pytest.mark.vm
def test_resume_in_another_process_then_delete(run: _Loop, client: SmolVMSandboxClient, session: Any) -> None:
    """A serialized state resumes in a second process (SmolVM.from_id underneath) and sees the
    workspace; a resumed session's delete() ends the VM."""
    assert run(session.exec("echo kept > kept.txt")).ok()
    payload = json.dumps(client.serialize_session_state(session.state))
    child = textwrap.dedent(
        """
        import asyncio, json, sys
        from smolvm.integrations.openai_agents import SmolVMSandboxClient

        async def main():
            client = SmolVMSandboxClient()
            resumed = await client.resume(client.deserialize_session_state(json.loads(sys.stdin.read())))
            await resumed.start()
            r = await resumed.exec("cat kept.txt seed.txt")
            await resumed.aclose()  # lets go of the VM: it keeps running
            print(json.dumps({"vm_id": resumed.state.vm_id, "out": r.stdout.decode()}))

        asyncio.run(main())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", child], input=payload, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"vm_id": session.state.vm_id, "out": "kept\nfrom the manifest\n"}

    resumed = run(client.resume(client.deserialize_session_state(json.loads(payload))))
    assert resumed.state.vm_id == session.state.vm_id
    run(client.delete(resumed))
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id(session.state.vm_id)


@pytest.mark.vm
def test_resume_after_the_vm_is_gone_restores_the_snapshot(
    run: _Loop, client: SmolVMSandboxClient, tmp_path: Path
) -> None:
    """stop() persists the workspace (a tar from the guest) into a LocalSnapshot; with the VM
    gone, resume() starts a new VM and start() hydrates its workspace from the snapshot."""
    s = run(client.create(snapshot=LocalSnapshotSpec(base_path=tmp_path)))
    replacement = None
    try:
        run(s.start())
        run(s.write(Path("work/result.txt"), io.BytesIO(b"survives the VM\n")))
        run(s.aclose())  # stop(): the snapshot; shutdown(): lets go of the VM
        assert list(tmp_path.iterdir()), "no snapshot written"
        SmolVM.from_id(s.state.vm_id).delete()  # the VM dies behind the SDK's back
        payload = client.serialize_session_state(s.state)
        replacement = run(client.resume(client.deserialize_session_state(payload)))
        assert replacement.state.vm_id != s.state.vm_id
        run(replacement.start())
        assert run(replacement.read(Path("work/result.txt"))).read() == b"survives the VM\n"
    finally:
        run(client.delete(replacement if replacement is not None else s))


@pytest.mark.vm
def test_runner_owned_session_is_deleted(run: _Loop, client: SmolVMSandboxClient) -> None:
    """SandboxRunConfig(client=..., options=...): the Runner creates the VM, runs the agent's
    command in it, and deletes it when the run ends."""
    seen: list[str] = []
    model = ScriptedModel([ModelStep.respond(_driver("hostname", seen))] * 6)  # the hostname is the vm_id
    agent = SandboxAgent(name="dev", model=model)
    cfg = RunConfig(
        sandbox=SandboxRunConfig(client=client, options=SmolVMSandboxClientOptions()), tracing_disabled=True
    )
    assert run(Runner.run(agent, "Who are you?", run_config=cfg)).final_output == "done"
    vm_ids = re.findall(r"\bvm-[0-9a-f]{12}\b", "".join(seen))
    assert vm_ids, seen
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id(vm_ids[0])


def test_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import smolvm.integrations.openai_agents as mod

    for name in [m for m in sys.modules if m == "agents" or m.startswith("agents.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "smolvm.integrations.openai_agents_sandbox", raising=False)
    monkeypatch.setitem(sys.modules, "agents", None)
    with pytest.raises(ImportError, match=re.escape('pip install "smolvm[openai-agents]"')):
        mod.SmolVMSandboxClient  # noqa: B018

"""The reference docs' agent-framework examples, as users write them, minus the hosted model.

tests/test_examples.py gives each its framework's offline model; everything else (the tool
functions, their registration, the deps pattern, the clean-up) is the docs' code, so a
change in smolvm that breaks what users wrote fails these tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from smolvm import SmolVM

try:  # only the pydantic-ai example needs it; its tests skip without pydantic-ai
    from pydantic_ai import RunContext
except ImportError:  # pragma: no cover
    RunContext = None  # type: ignore[assignment,misc]


def run_in_smolvm(command: str, timeout: int = 30) -> str:
    """Run a shell command inside an ephemeral SmolVM sandbox.

    Args:
        command: Shell command to execute inside the sandbox guest.
        timeout: Maximum number of seconds to wait for the command.
    """
    with SmolVM() as vm:
        result = vm.run(command, timeout=timeout)
        return (
            f"exit_code: {result.exit_code}\n"
            f"stdout:\n{result.stdout.strip() or '<empty>'}\n"
            f"stderr:\n{result.stderr.strip() or '<empty>'}"
        )


# ---- pydantic-ai: a reusable sandbox across turns -------------------------------------


@dataclass
class SandboxDeps:
    vm_id: str | None = None


def connect_vm(deps: SandboxDeps) -> SmolVM:
    """Return the active sandbox, creating it on first use."""
    if deps.vm_id is None:
        vm = SmolVM()
        vm.start()
        deps.vm_id = vm.vm_id
        return vm
    return SmolVM.from_id(deps.vm_id)


def cleanup_vm(vm_id: str | None) -> None:
    """Delete the reusable sandbox if one was created."""
    if vm_id is None:
        return
    vm = SmolVM.from_id(vm_id)
    try:
        vm.delete()
    finally:
        vm.close()


def run_in_reusable_smolvm(ctx: RunContext[SandboxDeps], command: str, timeout: int = 30) -> str:
    """Run a shell command inside a reusable SmolVM sandbox.

    Args:
        command: Shell command to execute inside the sandbox guest.
        timeout: Maximum number of seconds to wait for the command.
    """
    vm = connect_vm(ctx.deps)
    try:
        result = vm.run(command, timeout=timeout)
        return (
            f"exit_code: {result.exit_code}\n"
            f"stdout:\n{result.stdout.strip() or '<empty>'}\n"
            f"stderr:\n{result.stderr.strip() or '<empty>'}"
        )
    finally:
        vm.close()


def reusable_agent(model):  # type: ignore[no-untyped-def]
    """The docs' pydantic-ai agent with the reusable sandbox tool, on `model`."""
    from pydantic_ai import Agent

    agent = Agent(model, deps_type=SandboxDeps, instructions="You have access to a persistent SmolVM sandbox.")
    agent.tool(docstring_format="google", require_parameter_descriptions=True)(run_in_reusable_smolvm)
    return agent

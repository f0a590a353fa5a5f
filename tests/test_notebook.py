"""Jupyter: a real notebook executed by nbclient on an ipykernel against real VMs, and no VM outliving its kernel."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smolvm import SmolVM, registry

nbclient = pytest.importorskip("nbclient", reason="pip install nbclient ipykernel")
import nbclient.util  # noqa: E402
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).parent / "notebooks" / "smolvm_basics.ipynb"
SLOW = 600  # per cell: the kernel's first VM restores the base snapshot


def _gone(vm_id: str, scan: bool, limit: float = 60.0) -> bool:
    """Within limit seconds: the VM's state folder is removed (its VMM ended). With scan, by
    registry.scan() too, which cleans up after VMMs whose owner could not (SIGKILL)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if scan and vm_id in {r.vm_id for r in registry.scan()[0]}:
            time.sleep(0.5)
            continue
        if not registry.vm_dir(vm_id).exists():
            return True
        time.sleep(0.5)
    return False


def _text(output: dict[str, object]) -> str:
    if output.get("output_type") == "stream":
        return str(output.get("text", ""))
    data = output.get("data", {})
    assert isinstance(data, dict)
    return str(data.get("text/html", "")) + str(data.get("text/plain", ""))


@pytest.mark.vm
def test_notebook_runs_and_its_vm_ends_with_the_kernel(vm: SmolVM, smolvm_env: dict[str, str]) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=SLOW, kernel_name="python3", resources={"metadata": {"path": "/"}})
    client.execute(env=smolvm_env)  # shuts the kernel down at the end, as closing a notebook does
    code = [c for c in nb.cells if c.cell_type == "code"]
    run_html = code[0].outputs[0]["data"]
    assert "text/html" in run_html and "exit code 0" in run_html["text/html"], run_html
    assert "hello from vm-" in run_html["text/html"]
    vm_html = code[1].outputs[0]["data"]["text/html"]
    assert "running" in vm_html, vm_html
    assert _text(code[2].outputs[0]) == "async 42\n"  # a top-level await of async_run
    vm_id = _text(code[3].outputs[0]).split()[1]
    assert vm_id in vm_html and _gone(vm_id, scan=False), f"{vm_id} outlived its kernel"


@pytest.mark.vm
def test_kernel_restart_ends_its_vm(vm: SmolVM, smolvm_env: dict[str, str]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from smolvm import SmolVM\nvm = SmolVM()\nvm.run('true', timeout=300)\n"
                                          "print(vm.vm_id)")]  # fmt: skip
    client = nbclient.NotebookClient(nb, timeout=SLOW, kernel_name="python3")
    with client.setup_kernel(env=smolvm_env):
        client.execute_cell(nb.cells[0], 0)
        vm_id = _text(nb.cells[0].outputs[0]).strip()
        assert vm_id in {r.vm_id for r in registry.scan()[0]}
        assert client.km is not None
        nbclient.util.run_sync(client.km.restart_kernel)(now=False)  # the notebook's "Restart kernel"
        assert _gone(vm_id, scan=False), f"{vm_id} outlived its kernel's restart"


OWNER = """
import time
from smolvm import SmolVM
vm = SmolVM()
vm.run("true", timeout=300)
print(vm.vm_id, flush=True)
time.sleep(600)
"""


@pytest.mark.vm
def test_sigterm_of_the_owner_removes_its_vm(vm: SmolVM, smolvm_env: dict[str, str]) -> None:
    """SIGTERM (what a kernel manager sends a kernel that does not shut down in time): the
    VM is closed and its state folder removed before the process dies of the signal.
    (SIGKILL: tests/test_lifecycle.py, the VMM ends with its control socket.)"""
    owner = subprocess.Popen([sys.executable, "-c", OWNER], env=smolvm_env, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        vm_id = owner.stdout.readline().strip()
        assert registry.vm_dir(vm_id).exists()
    finally:
        owner.terminate()
        rc = owner.wait(timeout=120)
    assert rc == -signal.SIGTERM  # it still dies of the signal
    assert _gone(vm_id, scan=False, limit=1.0), f"{vm_id} left its state folder behind"

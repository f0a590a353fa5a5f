"""SmolVMRuntime: one lazily started microVM that an agent framework's shell tool runs commands in.

    from smolvm.runtime import SmolVMRuntime
    with SmolVMRuntime(memory=1024, disk_size=2048) as runtime:
        print(runtime.run("uname -a"))   # "exit_code: 0\\nstdout:\\nLinux ...\\nstderr:\\n<empty>"

The VM starts on the first run() and serves every later call (files and state carry over
between commands); close() deletes it. The VM is ephemeral: it also ends with this process.
"""

from __future__ import annotations

import threading
from typing import Any

from . import _validate
from .errors import SmolVMError, VMGoneError
from .result import RunResult
from .vm import SmolVM

DEFAULT_TIMEOUT_S = 30.0


class RuntimeClosedError(SmolVMError):
    """run() was called on a SmolVMRuntime after close()."""


def format_result(result: RunResult, timeout: float | None = None) -> str:
    """The text an agent sees: exit code, stdout and stderr (``<empty>`` when blank).

    A command stopped by its timeout gets a last line saying so (its exit code is 124).
    """
    text = (
        f"exit_code: {result.exit_code}\n"
        f"stdout:\n{result.stdout.strip() or '<empty>'}\n"
        f"stderr:\n{result.stderr.strip() or '<empty>'}"
    )
    if result.timed_out:
        after = f" after {timeout:g} s" if timeout is not None else ""
        text += f"\ntimed_out: true (the command was killed{after})"
    return text


class SmolVMRuntime:
    """An executor for agent frameworks' shell tools, backed by one reused SmolVM.

    Args:
        memory: Guest memory in MiB.
        disk_size: Size in MiB of the VM's writable disk (the root file system's
            free space for what commands write).
        **kwargs: Passed on to SmolVM (``image``, ``vcpus``, ``boot_timeout``, ...).

    Thread-safe: concurrent run() calls share the one VM (started once); close() may be
    called from any thread and more than once.
    """

    def __init__(self, memory: int = 1024, disk_size: int = 2048, **kwargs: Any) -> None:
        self.memory = memory
        self.disk_size = _validate.disk_size_mib(disk_size)
        self._kwargs = dict(kwargs)
        if self._kwargs.get("image", "default") is not None:
            self._kwargs["disk_size"] = self.disk_size
        SmolVM(memory=memory, **self._kwargs).close()  # check the arguments now, boot nothing
        self._lock = threading.Lock()
        self._vm: SmolVM | None = None
        self._closed = False

    # ---- the VM -------------------------------------------------------------------

    @property
    def vm(self) -> SmolVM:
        """The runtime's VM, started on first access."""
        with self._lock:
            if self._closed:
                raise RuntimeClosedError("this SmolVMRuntime was closed; create a new one")
            if self._vm is None:
                vm = SmolVM(memory=self.memory, **self._kwargs)
                vm.__enter__()  # ephemeral: it also ends if this process dies
                self._vm = vm
            return self._vm

    @property
    def vm_id(self) -> str | None:
        """The id of the VM once started, else None."""
        vm = self._vm
        return vm.vm_id if vm is not None else None

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- running commands ----------------------------------------------------------

    def run_result(
        self,
        command: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> RunResult:
        """Run `command` in the VM and return its RunResult.

        If the VM died, it is dropped (the next call starts a fresh one) and VMGoneError raised.
        """
        vm = self.vm
        try:
            return vm.run(command, timeout=timeout, env=env, cwd=cwd)
        except VMGoneError:
            with self._lock:
                if self._vm is vm:
                    self._vm = None
            vm.delete()
            raise

    def run(self, command: str, timeout: float = DEFAULT_TIMEOUT_S) -> str:
        """Run a shell command in the VM; the text gives exit code, stdout and stderr.

        Format: ``exit_code: N\\nstdout:\\n...\\nstderr:\\n...`` (``<empty>`` for blank
        output), plus a ``timed_out: true ...`` line when the timeout killed the command.
        """
        return format_result(self.run_result(command, timeout), timeout)

    execute = run

    def __call__(self, command: str, timeout: float = DEFAULT_TIMEOUT_S) -> str:
        return self.run(command, timeout)

    # ---- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Delete the VM. Idempotent; run() afterwards raises RuntimeClosedError."""
        with self._lock:
            self._closed = True
            vm, self._vm = self._vm, None
        if vm is not None:
            vm.delete()

    def __enter__(self) -> SmolVMRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._vm else "not started")
        return (
            f"SmolVMRuntime(memory={self.memory}, disk_size={self.disk_size}, "
            f"vm_id={self.vm_id!r}, {state})"
        )

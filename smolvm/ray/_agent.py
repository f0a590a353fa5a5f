"""NodeAgent: the one Ray actor per node that owns that node's sandboxes (SmolVMs in this process)."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import registry
from .._paths import home
from ..errors import VMNotFoundError
from ..result import RunResult
from ..vm import SmolVM

START_THREADS = 4  # VMs restored at once on a node (after the first, which may build the base)


def _base_keys() -> set[str]:
    base = home() / "snapshots" / ".base"
    return {p.name for p in base.iterdir() if not p.name.startswith(".")} if base.is_dir() else set()


class NodeAgent:
    """Holds this node's sandboxes. Ray runs it as an actor pinned to the node (see _nodes.py).

    Ephemeral sandboxes (a SandboxPool's) stop when the actor ends: their VMMs exit when
    this process's control sockets close. Persistent ones (create()) outlive it.
    """

    def __init__(self) -> None:
        import ray

        self._node_id = ray.get_runtime_context().get_node_id()
        self._vms: dict[str, SmolVM] = {}
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        import ray

        return {
            "node_id": self._node_id,
            "ip": ray.util.get_node_ip_address(),
            "home": str(home()),
            "pid": os.getpid(),
        }

    # ---- sandboxes ------------------------------------------------------------------

    def start(self, count: int, vm_kwargs: Mapping[str, Any], persistent: bool = False) -> dict[str, Any]:
        """Start `count` sandboxes. The first one builds this node's base snapshot if it is missing.

        Returns what was started and how long the base snapshot and the start-up took.
        """
        before = _base_keys()
        t0 = time.monotonic()
        first = self._start_one(vm_kwargs, persistent)
        t_first = time.monotonic() - t0
        built = bool(_base_keys() - before)
        started = [first]
        t1 = time.monotonic()
        try:
            if count > 1:
                with ThreadPoolExecutor(min(START_THREADS, count - 1)) as ex:
                    futs = [ex.submit(self._start_one, vm_kwargs, persistent) for _ in range(count - 1)]
                    errors = []
                    for f in futs:
                        try:
                            started.append(f.result())
                        except Exception as e:  # stop the others, then raise the first failure
                            errors.append(e)
                    if errors:
                        raise errors[0]
        except BaseException:
            self.close([s["vm_id"] for s in started])
            raise
        rest = time.monotonic() - t1
        # A sandbox start without the base build: the first VM's time counts only if it restored.
        restores = count - 1 + (0 if built else 1)
        restore_s = rest + (0.0 if built else t_first)
        return {
            "node_id": self._node_id,
            "base": "built" if built else "found",
            "base_seconds": t_first if built else 0.0,
            "start_seconds": restore_s,
            "restored": restores,
            "sandboxes": started,
        }

    def _start_one(self, vm_kwargs: Mapping[str, Any], persistent: bool) -> dict[str, Any]:
        vm = SmolVM(**dict(vm_kwargs))
        if persistent:
            vm.start()
            pid = registry.load(vm.vm_id).pid
        else:
            vm.__enter__()  # ephemeral: it ends with close() or with this process
            pid = vm.pid or 0
        with self._lock:
            self._vms[vm.vm_id] = vm
        return {"vm_id": vm.vm_id, "pid": pid, "node_id": self._node_id}

    def _vm(self, vm_id: str) -> SmolVM:
        with self._lock:
            vm = self._vms.get(vm_id)
        if vm is None:  # a persistent VM started by an earlier agent on this node
            vm = SmolVM.from_id(vm_id)
            with self._lock:
                vm = self._vms.setdefault(vm_id, vm)
        return vm

    def has(self, vm_id: str) -> bool:
        with self._lock:
            if vm_id in self._vms:
                return True
        try:
            return registry.alive(registry.load(vm_id))
        except (VMNotFoundError, ValueError):
            return False

    def pids(self) -> dict[str, int]:
        with self._lock:
            vms = dict(self._vms)
        return {vm_id: vm.pid or 0 for vm_id, vm in vms.items()}

    # ---- work -----------------------------------------------------------------------

    def run(self, vm_id: str, command: str, kwargs: Mapping[str, Any]) -> RunResult:
        return self._vm(vm_id).run(command, **dict(kwargs))

    def run_batch(
        self, items: Sequence[tuple[int, str, str]], kwargs: Mapping[str, Any]
    ) -> list[tuple[int, RunResult | BaseException]]:
        """Run (index, vm_id, command) items: each sandbox's in order, the sandboxes in parallel."""
        queues: dict[str, list[tuple[int, str]]] = {}
        for index, vm_id, command in items:
            queues.setdefault(vm_id, []).append((index, command))
        out: list[tuple[int, RunResult | BaseException]] = []

        def drain(vm_id: str) -> list[tuple[int, RunResult | BaseException]]:
            done: list[tuple[int, RunResult | BaseException]] = []
            for index, command in queues[vm_id]:
                try:
                    done.append((index, self.run(vm_id, command, kwargs)))
                except Exception as e:
                    done.append((index, e))
            return done

        with ThreadPoolExecutor(max(1, len(queues))) as ex:
            for part in ex.map(drain, list(queues)):
                out.extend(part)
        return out

    def upload(self, vm_id: str, data: bytes, guest_path: str, mode: int | None) -> int:
        with tempfile.TemporaryDirectory(prefix="smolvm-ray-") as tmp:
            local = Path(tmp) / "upload"
            local.write_bytes(data)
            local.chmod(0o644 if mode is None else mode & 0o777)
            return self._vm(vm_id).upload_file(local, guest_path, mode=mode)

    def download(self, vm_id: str, guest_path: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="smolvm-ray-") as tmp:
            return self._vm(vm_id).download_file(guest_path, Path(tmp) / "download").read_bytes()

    # ---- ending ---------------------------------------------------------------------

    def close(self, vm_ids: Sequence[str] | None = None) -> list[str]:
        """Stop these sandboxes (all of them by default) and forget them; persistent ones are deleted."""
        with self._lock:
            ids = list(self._vms) if vm_ids is None else [i for i in vm_ids if i in self._vms]
            vms = [self._vms.pop(i) for i in ids]
        for vm in vms:
            vm.delete()
        return ids

    def delete(self, vm_id: str) -> None:
        """Delete a persistent VM of this node (also one an earlier agent started)."""
        try:
            vm = self._vm(vm_id)
        except VMNotFoundError:
            return
        with self._lock:
            self._vms.pop(vm_id, None)
        vm.delete()

    def release(self, vm_id: str) -> None:
        """Let go of a persistent VM's handle in this agent; the VM keeps running."""
        with self._lock:
            vm = self._vms.pop(vm_id, None)
        if vm is not None:
            vm.close()

"""Helpers shared by several test files (and benchmarks/bench_ray.py): threads, servers, /proc, Ray node homes."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from smolvm._paths import home

# ---- threads and servers -----------------------------------------------------------------


def run_threads(worker: Callable[[int], None], ns: Iterable[int]) -> None:
    """Run worker(n) for every n, each on a thread of its own, all at once; return when all ended."""
    threads = [threading.Thread(target=worker, args=(n,)) for n in ns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Listener:
    """Accepts on a listening socket on a daemon thread until close(); each connection goes to
    handle(conn) on a daemon thread of its own.

    close() shuts the socket down first, which wakes the blocked accept(), and waits for the
    accepting thread before closing the fd: closing the fd alone left a thread that could call
    accept() on the fd number after a later test's server had been given it, stealing (and
    resetting) that server's connections."""

    def __init__(self, sock: socket.socket, handle: Callable[[socket.socket], None]) -> None:
        self.sock = sock
        self.handle = handle
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(10)
        assert not self.thread.is_alive(), "the accepting thread did not stop"
        self.sock.close()


# ---- /proc -------------------------------------------------------------------------------


def processes_naming(text: str) -> Iterator[tuple[int, bytes]]:
    """(pid, command line with NUL separators) of the processes, other than this one, whose
    command line contains text; zombies included (their command line is empty)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            yield int(entry.name), cmdline


# ---- Ray nodes on this host --------------------------------------------------------------

# Caches every node reads from this home, and the nested profile's host VM ("host": its
# lock, token and state; "hostvm": its kernel and initramfs): nodes on one machine share one
# host VM as processes of one home do, instead of starting a QEMU each.
RAY_SHARED = ("kernel", "images", "agent", "initramfs", "hostvm", "host")


def ray_node_home(i: int) -> Path:
    """A SMOLVM_HOME of its own for local Ray node i, sharing this home's caches and base snapshots.

    The base snapshots are shared too (snapshots/.base is a symlink): their keys name the
    resolved kernel, initramfs and image files and the VMM sources, which are the same for
    every node here, a snapshot is published by an atomic rename, and restores map its
    memory file copy-on-write. So the whole cluster boots one guest, once, instead of one
    per node; the nodes' VMs and registries (vms/) stay apart.
    """
    main = home()
    h = main / "ray-nodes" / f"n{i}"
    (h / "snapshots").mkdir(parents=True, exist_ok=True)
    for kind in RAY_SHARED:
        if (main / kind).exists():
            link = h / kind
            if not link.is_symlink():
                link.unlink(missing_ok=True)
                link.symlink_to((main / kind).resolve())
    base = main / "snapshots" / ".base"
    base.mkdir(parents=True, exist_ok=True)
    if not (h / "snapshots" / ".base").is_symlink():
        (h / "snapshots" / ".base").symlink_to(base)
    return h


def ray_node_env(h: Path) -> dict[str, str]:
    """A node's environment: its SMOLVM_HOME, and Ray workers (so the VMMs they start) at the
    normal priority instead of Ray's default niceness 15, which starves the guests on a busy host."""
    return {"SMOLVM_HOME": str(h), "RAY_worker_niceness": "0"}


def ray_cluster(nodes: int, per_node: int) -> tuple[Any, list[Any], list[Path]]:
    """A local Ray cluster (ray.cluster_utils.Cluster) of `nodes` small nodes, each offering
    `per_node` of the `smolvm` resource and running with a home of its own (ray_node_home):
    (the cluster, its worker nodes after the head, the nodes' homes). Needs Ray; does not wait
    for the nodes."""
    from ray.cluster_utils import Cluster

    small: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 80 << 20}
    homes = [ray_node_home(i) for i in range(nodes)]
    c = Cluster(
        initialize_head=True,
        head_node_args={**small, "resources": {"smolvm": per_node}, "include_dashboard": False,
                        "env_vars": ray_node_env(homes[0])},
    )  # fmt: skip
    workers = [c.add_node(**small, resources={"smolvm": per_node}, env_vars=ray_node_env(h)) for h in homes[1:]]
    return c, workers, homes

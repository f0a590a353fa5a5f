"""`smolvm host status|start|stop|logs`: the nested profile's host VM (smolvm/hostvm.py)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ._common import add_command, fail, print_json


def cmd_host(args: argparse.Namespace) -> int:
    from .. import hostvm

    if args.host_cmd == "start":
        try:
            started = hostvm.ensure()
        except hostvm.HostVMError as e:
            return fail(str(e), 1, "smolvm host start")
        print(f"host VM running: pid {started.pid}, {started.cpus} vCPUs, {started.memory_mib} MiB")
        return 0
    if args.host_cmd == "stop":
        print("host VM stopped" if hostvm.stop() else "no host VM was running")
        return 0
    if args.host_cmd == "logs":
        print(hostvm.logs(args.lines))
        return 0
    vm = hostvm.current()
    why = hostvm.unavailable_reason()
    rep = {
        "running": vm is not None,
        "pid": vm.pid if vm else None,
        "cpus": vm.cpus if vm else None,
        "memory_mib": vm.memory_mib if vm else None,
        "uptime_s": round(time.time() - vm.started, 1) if vm else None,
        "answers": hostvm.ping(vm.endpoint, vm.token_file) if vm else False,
        "available": why is None,
        "unavailable_reason": why,
        "folder": str(hostvm.host_dir()),
    }
    if args.json:
        print_json(rep)
    elif vm is None:
        print("no host VM running" + (f" (nested profile unavailable: {why})" if why else ""))
    else:
        state = "answering" if rep["answers"] else "NOT answering (starting, or stuck: `smolvm host logs`)"
        print(f"host VM pid {vm.pid}: {vm.cpus} vCPUs, {vm.memory_mib} MiB, up {rep['uptime_s']} s, {state}")
    return 0


def add_parser(sub: Any) -> None:
    h = add_command(sub, "host", cmd_host, "the nested profile's host VM: status, start, stop, logs")
    hsub = h.add_subparsers(dest="host_cmd", required=True)
    st = hsub.add_parser("status", help="is the host VM running, and how big is it")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    hsub.add_parser("start", help="start the host VM now (VMs start it on first use anyway)")
    hsub.add_parser("stop", help="stop the host VM and every VM in it")
    lg = hsub.add_parser("logs", help="the host VM's console, last lines")
    lg.add_argument("-n", "--lines", type=int, default=60)

"""`smolvm port expose|ls|rm`: host ports (127.0.0.1) forwarded into a running VM."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ._common import add_command, on_vm, print_json

if TYPE_CHECKING:
    from ..vm import SmolVM


def _run(args: argparse.Namespace, what: str) -> int:
    def act(vm: SmolVM) -> int:
        if what == "expose":
            host = vm.expose_local(args.guest_port, args.host_port)
            if args.json:
                print_json({"host_port": host, "guest_port": args.guest_port}, indent=None)
            else:
                print(host)
        elif what == "rm":
            vm.unexpose_local(args.port, args.guest_port)
        else:
            fwds = vm.exposed_ports()
            if args.json:
                print_json({"ports": [f._asdict() for f in fwds]}, indent=None)
            else:
                for f in fwds:
                    print(f"127.0.0.1:{f.host_port} -> {args.vm_id}:{f.guest_port}")
        return 0

    return on_vm(args.vm_id, act, prefix=f"smolvm port {what}", not_found=1, failed=1, errors=(ValueError, TypeError))


def add_parser(sub: Any) -> None:
    p = sub.add_parser("port", help="forward host ports (127.0.0.1 only) into a running VM: expose, ls, rm")
    psub = p.add_subparsers(dest="port_cmd", required=True)
    e = add_command(psub, "expose", lambda a: _run(a, "expose"), "listen on 127.0.0.1 and forward to the "
                    "guest's 127.0.0.1:GUEST_PORT; prints the host port")  # fmt: skip
    e.add_argument("vm_id", metavar="ID")
    e.add_argument("guest_port", metavar="GUEST_PORT", type=int)
    e.add_argument("--host-port", type=int, default=None, help="host port (default: a free one)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    ls = add_command(psub, "ls", lambda a: _run(a, "ls"), "list a VM's forwards",
                     json_help='machine-readable: {"ports": [...]}')  # fmt: skip
    ls.add_argument("vm_id", metavar="ID")
    rm = add_command(psub, "rm", lambda a: _run(a, "rm"),
                     "close a forward (by host port, or every forward of a guest port)")  # fmt: skip
    rm.add_argument("vm_id", metavar="ID")
    rm.add_argument("port", metavar="PORT", type=int)
    rm.add_argument("--guest-port", type=int, default=None, help="only the forward of PORT (host) to this guest port")

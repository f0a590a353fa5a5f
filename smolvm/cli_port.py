"""`smolvm port expose|ls|rm`: host ports (127.0.0.1) forwarded into a running VM."""

from __future__ import annotations

import argparse
import json
import sys


def _vm(vm_id: str):  # type: ignore[no-untyped-def]
    from .vm import SmolVM

    return SmolVM.from_id(vm_id)


def _run(args: argparse.Namespace, what: str) -> int:
    from .errors import SmolVMError, VMNotFoundError

    try:
        vm = _vm(args.vm_id)
    except VMNotFoundError as e:
        print(f"smolvm port {what}: {e}", file=sys.stderr)
        return 1
    try:
        if what == "expose":
            host = vm.expose_local(args.guest_port, args.host_port)
            print(json.dumps({"host_port": host, "guest_port": args.guest_port}) if args.json else host)
        elif what == "rm":
            vm.unexpose_local(args.port, args.guest_port)
        else:
            fwds = vm.exposed_ports()
            if args.json:
                print(json.dumps({"ports": [f._asdict() for f in fwds]}))
            else:
                for f in fwds:
                    print(f"127.0.0.1:{f.host_port} -> {args.vm_id}:{f.guest_port}")
    except (SmolVMError, ValueError, TypeError) as e:
        print(f"smolvm port {what}: {e}", file=sys.stderr)
        return 1
    finally:
        vm.close()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("port", help="forward host ports (127.0.0.1 only) into a running VM: expose, ls, rm")
    psub = p.add_subparsers(dest="port_cmd", required=True)
    e = psub.add_parser("expose", help="listen on 127.0.0.1 and forward to the guest's 127.0.0.1:GUEST_PORT; "
                        "prints the host port")  # fmt: skip
    e.add_argument("vm_id", metavar="ID")
    e.add_argument("guest_port", metavar="GUEST_PORT", type=int)
    e.add_argument("--host-port", type=int, default=None, help="host port (default: a free one)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=lambda a: _run(a, "expose"))
    ls = psub.add_parser("ls", help="list a VM's forwards")
    ls.add_argument("vm_id", metavar="ID")
    ls.add_argument("--json", action="store_true", help='machine-readable: {"ports": [...]}')
    ls.set_defaults(func=lambda a: _run(a, "ls"))
    rm = psub.add_parser("rm", help="close a forward (by host port, or every forward of a guest port)")
    rm.add_argument("vm_id", metavar="ID")
    rm.add_argument("port", metavar="PORT", type=int)
    rm.add_argument("--guest-port", type=int, default=None, help="only the forward of PORT (host) to this guest port")
    rm.set_defaults(func=lambda a: _run(a, "rm"))

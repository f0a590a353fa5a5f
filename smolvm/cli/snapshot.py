"""`smolvm snapshot create|ls|rm`: named snapshots of running VMs (SmolVM.from_snapshot(NAME))."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ._common import EXIT_NOT_FOUND, EXIT_USAGE, add_command, age, fail, listed, mib, on_vm, print_json, table

if TYPE_CHECKING:
    from ..vm import SmolVM


def snap_json(i: Any) -> dict[str, Any]:
    """A snapshots.SnapshotInfo as `--json` prints it."""
    return {
        "name": i.name, "path": str(i.path), "memory": i.memory, "vcpus": i.vcpus,
        "created": i.created, "source_vm": i.source_vm, "bytes": i.size_bytes,
        "problem": i.problem or None,
    }  # fmt: skip


def cmd_snapshot_create(args: argparse.Namespace) -> int:
    from .. import snapshots

    try:
        snapshots.check_name(args.name)
    except ValueError as e:
        return fail(str(e), EXIT_USAGE, "smolvm snapshot create")

    def save(vm: SmolVM) -> int:
        info = vm.snapshot(args.name)
        if args.json:
            print_json(snap_json(info))
        else:
            print(f"saved snapshot {info.name} of {args.vm_id} ({mib(info.size_bytes)} on disk); "
                  f"start copies with SmolVM.from_snapshot({info.name!r})")  # fmt: skip
        return 0

    return on_vm(args.vm_id, save)


def cmd_snapshot_ls(args: argparse.Namespace) -> int:
    import time

    from .. import snapshots

    snaps = snapshots.list_all(damaged=True)
    if listed(args.json, "snapshots", [snap_json(i) for i in snaps],
              "no snapshots (take one with `smolvm snapshot create ID NAME` or vm.snapshot(name))"):  # fmt: skip
        return 0
    now = time.time()
    rows = [["NAME", "MEMORY", "VCPUS", "DISK", "AGE", "FROM VM", "STATE"]]
    for i in snaps:
        rows.append([i.name, f"{i.memory} MiB" if i.memory else "-", str(i.vcpus or "-"),
                     mib(i.size_bytes), age(now - i.created) if i.created else "-",
                     i.source_vm or "-", f"DAMAGED: {i.problem}" if i.problem else "ok"])  # fmt: skip
    table(rows)
    return 0


def cmd_snapshot_rm(args: argparse.Namespace) -> int:
    from .. import snapshots
    from ..errors import SnapshotError

    rc = 0
    for name in dict.fromkeys(args.names):
        try:
            snapshots.delete(name)
        except (SnapshotError, ValueError) as e:
            rc = fail(str(e), EXIT_NOT_FOUND)
            continue
        print(f"deleted snapshot {name}")
    return rc


def add_parser(sub: Any) -> None:
    sn = sub.add_parser("snapshot", help="named snapshots: create, ls, rm")
    snsub = sn.add_subparsers(dest="snapshot_cmd", required=True)
    sc = add_command(snsub, "create", cmd_snapshot_create, "save a running VM as a named snapshot",
                     json_help="machine-readable output")  # fmt: skip
    sc.add_argument("vm_id", metavar="ID")
    sc.add_argument("name", metavar="NAME")
    add_command(snsub, "ls", cmd_snapshot_ls, "list snapshots (damaged ones say why)",
                json_help='machine-readable: {"snapshots": [...]}')  # fmt: skip
    sr = add_command(snsub, "rm", cmd_snapshot_rm, "delete snapshots")
    sr.add_argument("names", nargs="+", metavar="NAME")

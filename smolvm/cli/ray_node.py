"""`smolvm ray-node`: the `ray start --resources` flag this host should advertise, from doctor's checks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .._boot import DEFAULT_MEMORY_MIB
from .._validate import MEMORY_MIN_MIB
from ._common import EXIT_USAGE, add_command, fail, print_json

RESOURCE = "smolvm"  # smolvm.ray._nodes.RESOURCE (kept here so this command needs no ray)
HOST_RESERVE_MIB = 2048  # host memory left to Ray, the OS and the VMM processes themselves


def _mem_total_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def ray_node_report(per_vm_mib: int, sandboxes: int | None) -> dict[str, Any]:
    """Whether this host can run sandboxes (doctor's checks) and how many to advertise."""
    from .doctor import doctor_report

    rep = doctor_report()
    total = _mem_total_mib()
    fit = max(0, (total - HOST_RESERVE_MIB) // per_vm_mib)
    count = fit if sandboxes is None else sandboxes
    out: dict[str, Any] = {
        "ok": bool(rep["ok"]) and count > 0,
        "problems": list(rep["problems"]),
        "memory_mib": total,
        "per_sandbox_mib": per_vm_mib,
        "sandboxes": count if rep["ok"] else 0,
        "profile": rep.get("profile", {}).get("name"),
    }
    if rep["ok"] and count <= 0:
        out["problems"].append(
            f"{total} MiB of memory leaves no room for {per_vm_mib} MiB sandboxes; pass --sandboxes"
        )
    if out["ok"]:
        out["resources"] = {RESOURCE: count}
        # One shell word without quotes, so `ray start $(smolvm ray-node)` passes it whole.
        out["flag"] = "--resources=" + json.dumps(out["resources"], separators=(",", ":"))
    return out


def cmd_ray_node(args: argparse.Namespace) -> int:
    if args.per_sandbox_mib < MEMORY_MIN_MIB or (args.sandboxes is not None and args.sandboxes < 1):
        return fail(f"--per-sandbox-mib must be at least {MEMORY_MIN_MIB} and --sandboxes at least 1", EXIT_USAGE,
                    "smolvm ray-node")  # fmt: skip
    rep = ray_node_report(args.per_sandbox_mib, args.sandboxes)
    if args.json:
        print_json(rep)
    elif rep["ok"]:
        print(rep["flag"])
        print(
            f"# {rep['sandboxes']} sandboxes of {rep['per_sandbox_mib']} MiB on this host "
            f"({rep['memory_mib']} MiB, {rep['profile']} profile, SMOLVM_HOME="
            f"{os.environ.get('SMOLVM_HOME', '~/.cache/smolvm')}); typed by hand:\n"
            f"#   ray start --head --resources='{json.dumps(rep['resources'])}'\n"
            "#   ray start --address=HEAD_IP:6379 $(smolvm ray-node)",
            file=sys.stderr,
        )
    else:
        print("smolvm ray-node: this host cannot run sandboxes; start it without the "
              f"{RESOURCE!r} resource, or fix:\n  - " + "\n  - ".join(rep["problems"]), file=sys.stderr)  # fmt: skip
    return 0 if rep["ok"] else 1


def add_parser(sub: Any) -> None:
    memory = DEFAULT_MEMORY_MIB
    r = add_command(sub, "ray-node", cmd_ray_node,
                    "print the `ray start --resources` flag that makes this host a smolvm node",
                    description="Exit status 1 (and no flag) when `smolvm doctor` finds a problem.")  # fmt: skip
    r.add_argument("--per-sandbox-mib", type=int, default=memory,
                   help=f"host memory to budget per sandbox (default {memory}, SmolVM's default)")  # fmt: skip
    r.add_argument("--sandboxes", type=int, default=None, help="advertise this many instead")
    r.add_argument("--json", action="store_true", help="machine-readable output")

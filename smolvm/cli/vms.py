"""`smolvm run` (a VM for one command) and `smolvm ls|exec|fork|rm` for the running VMs of this machine."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from .._boot import DEFAULT_MEMORY_MIB, DEFAULT_VCPUS
from ._common import (
    EXIT_NOT_FOUND,
    EXIT_SMOLVM_ERROR,
    EXIT_TIMED_OUT,
    EXIT_USAGE,
    add_command,
    age,
    command_words,
    fail,
    on_vm,
    print_json,
    table,
)

if TYPE_CHECKING:
    from ..vm import SmolVM


def cmd_run(args: argparse.Namespace) -> int:
    from ..errors import SmolVMError
    from ..profile import detect
    from ..vm import SmolVM

    command = command_words(args.command)
    if command is None:
        return fail("give a command after --, e.g. `smolvm run -- uname -a`", EXIT_USAGE, "smolvm run")
    try:
        vm = SmolVM(memory=args.memory, vcpus=args.vcpus, image=args.image, disk_size=args.disk_size,
                    internet=not args.no_internet)  # fmt: skip
        slow = " (compat profile: this host emulates guest ring 0, a boot takes minutes)" if detect().compat else ""
        print(f"smolvm: booting {vm.vm_id}{slow}", file=sys.stderr, flush=True)
        with vm:
            print(f"smolvm: booted in {vm.boot_time:.1f} s; running {command!r}", file=sys.stderr, flush=True)
            result = vm.run(command, timeout=args.timeout)
    except (SmolVMError, ValueError, TypeError) as e:
        return fail(str(e), EXIT_SMOLVM_ERROR)
    return _emit(result, args.timeout)


def _emit(result: Any, timeout: float) -> int:
    """Write a command's raw output to our stdout/stderr; return its exit status (124 on timeout)."""
    sys.stdout.flush()
    sys.stdout.buffer.write(result.stdout_bytes)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr_bytes)
    sys.stderr.flush()
    if result.timed_out:
        return fail(f"the command timed out after {timeout:g} s", EXIT_TIMED_OUT, "smolvm")
    return int(result.exit_code) & 0xFF


def _vm_json(rec: Any, now: float) -> dict[str, Any]:
    return {
        "vm_id": rec.vm_id, "status": "paused" if rec.extra.get("paused") else "running",
        "pid": rec.pid, "memory": rec.memory, "vcpus": rec.vcpus, "persistent": rec.persistent,
        "owner_pid": rec.owner_pid, "created": rec.created, "age_s": round(now - rec.created, 1),
        "source": rec.source, "image": rec.extra.get("image"), "disk_size": rec.extra.get("disk_size"),
    }  # fmt: skip


def _report_gone(gone: list[str]) -> None:
    if gone:
        print(
            f"smolvm: cleaned up the records of {len(gone)} VM(s) whose VMM had ended: {', '.join(gone)}",
            file=sys.stderr,
        )


def cmd_ls(args: argparse.Namespace) -> int:
    import time

    from .. import registry

    live, gone = registry.scan()
    now = time.time()
    vms = [_vm_json(r, now) for r in live]
    if args.json:
        print_json({"vms": vms, "gone": gone})
        return 0
    if vms:
        rows = [["VM ID", "STATUS", "PID", "MEMORY", "VCPUS", "KIND", "AGE"]]
        for v in vms:
            kind = "persistent" if v["persistent"] else f"ephemeral (owner pid {v['owner_pid']})"
            rows.append([v["vm_id"], v["status"], str(v["pid"]), f"{v['memory']} MiB", str(v["vcpus"]),
                         kind, age(v["age_s"])])  # fmt: skip
        table(rows)
    else:
        print("no VMs running")
    _report_gone(gone)
    return 0


def _exec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=60, help="command timeout in seconds (default 60)")
    p.add_argument("--cwd", help="working directory in the guest")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the command (repeatable)")  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help="print {exit_code, stdout, stderr, timed_out, duration} as JSON")  # fmt: skip


def cmd_exec(args: argparse.Namespace) -> int:
    words = list(args.command)
    if "--" in words and words[0].startswith("-"):  # options between ID and --
        i = words.index("--")
        opts = argparse.ArgumentParser(prog="smolvm exec", add_help=False)
        _exec_options(opts)
        args = opts.parse_args(words[:i], namespace=args)
        words = words[i + 1 :]
    command = command_words(words)
    if command is None:
        return fail("give a command after --, e.g. `smolvm exec ID -- uname -a`", EXIT_USAGE, "smolvm exec")
    env: dict[str, str] = {}
    for item in args.env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            return fail(f"--env wants NAME=VALUE, got {item!r}", EXIT_USAGE, "smolvm exec")
        env[name] = value

    def run(vm: SmolVM) -> int:
        result = vm.run(command, timeout=args.timeout, env=env or None, cwd=args.cwd)
        if not args.json:
            return _emit(result, args.timeout)
        print_json({
            "exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
            "timed_out": result.timed_out, "duration": round(result.duration, 3),
        }, indent=None)  # fmt: skip
        return EXIT_TIMED_OUT if result.timed_out else result.exit_code & 0xFF

    return on_vm(args.vm_id, run, errors=(ValueError, TypeError))


def cmd_rm(args: argparse.Namespace) -> int:
    from .. import registry
    from ..errors import SmolVMError, VMNotFoundError
    from ..vm import SmolVM

    if args.all == bool(args.vm_ids):
        return fail("give VM ids or --all (not both)", EXIT_USAGE, "smolvm rm")
    if args.all:
        live, gone = registry.scan()
        ids = [r.vm_id for r in live]
        _report_gone(gone)
        if not ids:
            print("no VMs running")
    else:
        ids = list(dict.fromkeys(args.vm_ids))
    rc = 0
    for vm_id in ids:
        try:
            rec = registry.load(vm_id)
        except VMNotFoundError as e:
            rc = fail(str(e), EXIT_NOT_FOUND)
            continue
        if not registry.alive(rec):
            registry.remove(vm_id)
            print(f"{vm_id}: already gone (its VMM had ended); its record was cleaned up")
            continue
        try:
            SmolVM.from_id(vm_id).delete()
        except VMNotFoundError:  # ended between the check and now: nothing left to delete
            print(f"{vm_id}: already gone; its record was cleaned up")
            continue
        except SmolVMError as e:
            rc = fail(f"could not delete {vm_id}: {e}", EXIT_SMOLVM_ERROR)
            continue
        print(f"deleted {vm_id}")
    return rc


def cmd_fork(args: argparse.Namespace) -> int:
    def fork(vm: SmolVM) -> int:
        kids = vm.fork(args.n, persistent=True)  # this process ends now: children must outlive it
        cap = vm.last_fork
        if args.json:
            print_json({
                "parent": vm.vm_id, "children": [k.vm_id for k in kids],
                "layered": bool(cap and cap.layered), "pages": cap.pages if cap else 0,
                "vmm_ms": round(cap.vmm_us / 1000, 1) if cap else None,
            })  # fmt: skip
        else:
            for k in kids:
                print(k.vm_id)
            if cap is not None:
                how = "layered" if cap.layered else f"full ({cap.why_full})"
                print(f"smolvm: forked {vm.vm_id} into {len(kids)}: {how} capture of {cap.pages} pages "
                      f"in {cap.vmm_us / 1000:.1f} ms", file=sys.stderr)  # fmt: skip
        for k in kids:
            k.close()
        return 0

    return on_vm(args.vm_id, fork, errors=(ValueError,))


def cmd_rm_and_collect(args: argparse.Namespace) -> int:
    from .. import forks

    rc = cmd_rm(args)
    removed = forks.collect()
    if removed:
        print(f"smolvm: removed {len(removed)} fork capture(s) no VM needs any more", file=sys.stderr)
    return rc


def add_parser(sub: Any) -> None:
    from ..build.image import DEFAULT_IMAGE
    from ..vm import DEFAULT_DISK_MIB

    memory, vcpus = DEFAULT_MEMORY_MIB, DEFAULT_VCPUS
    r = add_command(sub, "run", cmd_run, "boot a VM, run one command, print its output, exit with its code",
                    description="Exit status: the command's, or 125 if the VM could not run it.")  # fmt: skip
    r.add_argument("--memory", type=int, default=memory, help=f"guest RAM in MiB (default {memory})")
    r.add_argument("--vcpus", type=int, default=vcpus, help=f"virtual CPUs (default {vcpus})")
    r.add_argument("--image", default=DEFAULT_IMAGE, help=f"root image (default: {DEFAULT_IMAGE!r}, Debian)")
    r.add_argument("--disk-size", type=int, default=None, help=f"writable disk in MiB (default {DEFAULT_DISK_MIB})")
    r.add_argument("--timeout", type=float, default=60, help="command timeout in seconds (default 60)")
    r.add_argument("--no-internet", action="store_true", help="no network device in the VM (default: egress through passt)")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    add_command(sub, "ls", cmd_ls, "list running VMs (records of VMs whose VMM ended are cleaned up)",
                json_help='machine-readable: {"vms": [...], "gone": [...]}')  # fmt: skip

    e = add_command(sub, "exec", cmd_exec, "run a command in a running VM, print its output, exit with its code",
                    description="Exit status: the command's; 124 if it timed out; 1 for an unknown VM id; "
                    "125 if the VM could not run it.")  # fmt: skip
    _exec_options(e)
    e.add_argument("vm_id", metavar="ID")
    e.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    f = add_command(sub, "fork", cmd_fork, "fork a running VM: N persistent copies starting from this instant",
                    json_help='machine-readable: {"parent", "children": [...], "layered", "pages", "vmm_ms"}')  # fmt: skip
    f.add_argument("vm_id", metavar="ID")
    f.add_argument("-n", type=int, default=1, help="how many children (default 1)")

    rm = add_command(sub, "rm", cmd_rm_and_collect, "delete VMs (stop them and remove their state)")
    rm.add_argument("vm_ids", nargs="*", metavar="ID")
    rm.add_argument("--all", action="store_true", help="delete every VM on this machine")

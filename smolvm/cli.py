"""The `smolvm` command: doctor (is this host ready?), build (guest artifacts), run (one command in a fresh VM)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__

EXIT_SMOLVM_ERROR = 125  # like `docker run`: the sandbox failed, not the command


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _current_keys(home: Path) -> tuple[dict[str, str | None], list[str]]:
    """The cache key each artifact would have now (None where it cannot be computed), without building."""
    keys: dict[str, str | None] = {"kernel": None, "agent": None, "initramfs": None}
    notes: list[str] = []
    try:
        from .build.kernel import kernel_key

        keys["kernel"] = kernel_key()
    except Exception as e:  # linux-source missing and the like
        notes.append(f"kernel: {e}")
    try:
        from .build.agent import AGENT_NAME, agent_key

        akey = keys["agent"] = agent_key()
        agent = home / "agent" / akey / AGENT_NAME
        if agent.is_file():
            from .build.initramfs import initramfs_key

            keys["initramfs"] = initramfs_key(agent)
    except Exception as e:
        notes.append(f"agent/initramfs: {e}")
    return keys, notes


def _cache_report(home: Path) -> dict[str, Any]:
    """What is built in $SMOLVM_HOME: per kind, the complete entries and whether the current one is there."""
    keys, notes = _current_keys(home)
    report: dict[str, Any] = {"_notes": notes}
    for kind, key in keys.items():
        folder = home / kind
        entries = sorted(p.name for p in folder.iterdir() if (p / ".complete").exists()) if folder.is_dir() else []
        report[kind] = {
            "current": key,
            "built": key is not None and key in entries,
            "entries": entries,
            "bytes": _du(folder) if folder.is_dir() else 0,
        }
    return report


def doctor_report() -> dict[str, Any]:
    from ._native import native, vmm_path
    from ._paths import home
    from .errors import SmolVMError
    from .kvm import KVM_PATH, check_kvm
    from .profile import detect, host_info, kernel_cmdline

    rep: dict[str, Any] = {"version": __version__, "problems": []}
    problems: list[str] = rep["problems"]

    kvm: dict[str, Any] = {"path": KVM_PATH, "present": os.path.exists(KVM_PATH)}
    try:
        check_kvm()
        kvm["usable"] = True
    except SmolVMError as e:
        kvm["usable"] = False
        kvm["error"] = str(e)
        problems.append(str(e))
    try:
        nat = native()
        rep["extension"] = {"loaded": True, "path": getattr(nat, "__file__", None)}
        if kvm["usable"]:
            try:
                kvm["info"] = dict(nat.kvm_info())
            except OSError as e:
                kvm["info_error"] = str(e)
    except SmolVMError as e:
        rep["extension"] = {"loaded": False, "error": str(e)}
        problems.append(str(e))
    rep["kvm"] = kvm

    try:
        vmm = vmm_path()
        rep["vmm"] = {"path": str(vmm), "ok": True}
    except SmolVMError as e:
        rep["vmm"] = {"ok": False, "error": str(e)}
        problems.append(str(e))

    host = host_info()
    rep["host"] = {"kind": host.kind, "detail": host.detail}
    try:
        prof = detect()
        rep["profile"] = {
            "name": prof.name,
            "reason": prof.reason,
            "extra_args": list(prof.extra_args),
            "cmdline": kernel_cmdline(prof),
        }
    except ValueError as e:
        rep["profile"] = {"error": str(e)}
        problems.append(str(e))

    h = home()
    rep["home"] = {"path": str(h), "bytes": _du(h)}
    rep["cache"] = _cache_report(h)
    vms = h / "vms"
    rep["vm_dirs"] = sorted(p.name for p in vms.iterdir()) if vms.is_dir() else []
    for kind in ("kernel", "agent", "initramfs"):
        if not rep["cache"][kind]["built"]:
            rep.setdefault("hints", []).append(f"{kind} not built yet: run `smolvm build`")
    rep["ok"] = not problems
    return rep


def _print_doctor(rep: dict[str, Any]) -> None:
    def line(key: str, value: str) -> None:
        print(f"  {key:<12} {value}")

    print(f"smolvm {rep['version']} doctor")
    kvm = rep["kvm"]
    if kvm["usable"]:
        line("/dev/kvm", "present, opens read/write")
    else:
        line("/dev/kvm", f"NOT USABLE: {kvm['error']}")
    if "info" in kvm:
        info = kvm["info"]
        caps = ", ".join(f"{k}={v}" for k, v in info.items() if k != "api_version")
        line("KVM API", f"{info.get('api_version')} ({caps})")
    ext = rep["extension"]
    line("extension", (ext.get("path") or "loaded") if ext["loaded"] else f"MISSING: {ext['error']}")
    vmm = rep["vmm"]
    line("vmm", vmm["path"] if vmm["ok"] else f"MISSING: {vmm['error']}")
    line("host", f"{rep['host']['kind']} ({rep['host']['detail']})")
    prof = rep["profile"]
    if "error" in prof:
        line("profile", f"INVALID: {prof['error']}")
    else:
        line("profile", f"{prof['name']}: {prof['reason']}")
        line("boot args", prof["cmdline"])
    line("SMOLVM_HOME", f"{rep['home']['path']} ({_mib(rep['home']['bytes'])} used)")
    for kind in ("kernel", "agent", "initramfs"):
        item = rep["cache"][kind]
        if item["built"]:
            line(kind, f"built ({item['current']}, {_mib(item['bytes'])} cached)")
        else:
            stale = f"; {len(item['entries'])} older build(s) cached" if item["entries"] else ""
            line(kind, f"not built (run `smolvm build`){stale}")
    for note in rep["cache"]["_notes"]:
        line("note", note)
    if rep["vm_dirs"]:
        line("VM dirs", ", ".join(rep["vm_dirs"]))
    print("OK: this host can run smolvm VMs" if rep["ok"] else "PROBLEMS:\n  - " + "\n  - ".join(rep["problems"]))


def cmd_doctor(args: argparse.Namespace) -> int:
    rep = doctor_report()
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        _print_doctor(rep)
    return 0 if rep["ok"] else 1


def cmd_build(args: argparse.Namespace) -> int:
    from .build._cache import progress

    steps = [("kernel", "smolvm.build.kernel", "ensure_kernel"),
             ("agent", "smolvm.build.agent", "ensure_agent"),
             ("initramfs", "smolvm.build.initramfs", "ensure_initramfs")]  # fmt: skip
    import importlib

    for name, module, func in steps:
        progress(f"{name}: checking the cache")
        try:
            path = getattr(importlib.import_module(module), func)()
        except KeyboardInterrupt:
            raise
        except Exception as e:
            print(f"smolvm build: {name} failed: {e}", file=sys.stderr)
            return 1
        progress(f"{name}: {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .errors import SmolVMError
    from .profile import detect
    from .vm import SmolVM

    words = list(args.command)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        print("smolvm run: give a command after --, e.g. `smolvm run -- uname -a`", file=sys.stderr)
        return 2
    command = words[0] if len(words) == 1 else shlex.join(words)
    try:
        vm = SmolVM(memory=args.memory, vcpus=args.vcpus)
        slow = " (compat profile: this host emulates guest ring 0, a boot takes minutes)" if detect().compat else ""
        print(f"smolvm: booting {vm.vm_id}{slow}", file=sys.stderr, flush=True)
        with vm:
            print(f"smolvm: booted in {vm.boot_time:.1f} s; running {command!r}", file=sys.stderr, flush=True)
            result = vm.run(command, timeout=args.timeout)
    except (SmolVMError, ValueError, TypeError) as e:
        print(f"smolvm: error: {e}", file=sys.stderr)
        return EXIT_SMOLVM_ERROR
    sys.stdout.flush()
    sys.stdout.buffer.write(result.stdout_bytes)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr_bytes)
    sys.stderr.flush()
    if result.timed_out:
        print(f"smolvm: the command timed out after {args.timeout} s", file=sys.stderr)
    return result.exit_code & 0xFF


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smolvm", description="Run shell commands in KVM microVMs.")
    p.add_argument("--version", action="version", version=f"smolvm {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("doctor", help="check KVM, the compat profile and the caches")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_doctor)

    b = sub.add_parser("build", help="build the guest kernel, agent and initramfs into $SMOLVM_HOME")
    b.set_defaults(func=cmd_build)

    r = sub.add_parser(
        "run",
        help="boot a VM, run one command, print its output, exit with its code",
        description="Exit status: the command's, or 125 if the VM could not run it.",
    )
    r.add_argument("--memory", type=int, default=512, help="guest RAM in MiB (default 512)")
    r.add_argument("--vcpus", type=int, default=1, help="virtual CPUs (default 1)")
    r.add_argument("--timeout", type=float, default=60, help="command timeout in seconds (default 60)")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("smolvm: interrupted", file=sys.stderr)
        return 130

"""The `smolvm` command: doctor, build, run; ls, exec, rm for running VMs; snapshot create/ls/rm."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__

EXIT_SMOLVM_ERROR = 125  # like `docker run`: the sandbox failed, not the command
EXIT_NOT_FOUND = 1  # unknown VM id or snapshot name
EXIT_USAGE = 2  # as argparse
EXIT_TIMED_OUT = 124  # as timeout(1)


def _err(msg: str) -> None:
    print(f"smolvm: error: {msg}", file=sys.stderr)


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _command_words(words: Sequence[str]) -> str | None:
    """The shell command from `-- CMD...`: one word is used as is, several are quoted and joined."""
    words = list(words)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        return None
    return words[0] if len(words) == 1 else shlex.join(words)


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

            keys["initramfs"] = initramfs_key(agent, with_busybox=False)  # what image VMs boot
    except Exception as e:
        notes.append(f"agent/initramfs: {e}")
    return keys, notes


def _image_report() -> list[dict[str, Any]]:
    """The built root images (the newest of each name)."""
    from .build.image import _built

    newest: dict[str, Path] = {}
    for _done, name, folder in _built():
        newest[name] = folder
    return [{"name": n, "path": str(f / "rootfs.ext4"), "bytes": _du(f)} for n, f in sorted(newest.items())]


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


def _default_base_key(home: Path, rep: dict[str, Any]) -> str | None:
    """The base snapshot key of a default SmolVM() (512 MiB, 1 vCPU, default image) now, if its inputs are built."""
    from ._native import vmm_path
    from .build.image import ImageError, image_path
    from .build.initramfs import INITRAMFS_NAME
    from .profile import detect
    from .vm import base_key

    cache = rep["cache"]
    if not (cache["kernel"]["built"] and cache["initramfs"]["built"]):
        return None
    kernel = home / "kernel" / cache["kernel"]["current"] / "vmlinux"
    initrd = home / "initramfs" / cache["initramfs"]["current"] / INITRAMFS_NAME
    try:
        return base_key(kernel, initrd, image_path(), 512, 1, vmm_path(), detect(), net=True)
    except (ImageError, OSError):  # no image yet, a missing VMM or artifact: reported elsewhere
        return None


def _snapshot_report(home: Path, rep: dict[str, Any]) -> dict[str, Any]:
    """Base snapshots (one per boot configuration) and user snapshots, with the disk they use."""
    from . import snapshots

    base_root = home / "snapshots" / ".base"
    bases = []
    for d in sorted(base_root.iterdir()) if base_root.is_dir() else []:
        if not d.is_dir() or d.name.startswith("."):
            continue
        try:
            meta = snapshots.read_meta(d)
        except Exception:
            meta = {}
        bases.append({
            "key": d.name, "memory": meta.get("memory"), "vcpus": meta.get("vcpus"),
            "created": meta.get("created"), "bytes": _du(d), "problem": snapshots.problem(d),
        })  # fmt: skip
    user = snapshots.list_all(damaged=True)
    key = _default_base_key(home, rep)
    return {
        "base": bases,
        "base_bytes": sum(b["bytes"] for b in bases),
        "default_base_key": key,
        "default_base_cached": key is not None and any(b["key"] == key and not b["problem"] for b in bases),
        "user": [_snap_json(i) for i in user],
        "user_bytes": sum(i.size_bytes for i in user),
    }


def doctor_report() -> dict[str, Any]:
    from ._native import native, vmm_path
    from ._paths import home
    from .errors import SmolVMError
    from .kvm import KVM_PATH, check_kvm
    from .profile import Profile, detect, host_info, kernel_cmdline

    rep: dict[str, Any] = {"version": __version__, "problems": []}
    problems: list[str] = rep["problems"]

    prof_error = ""
    try:
        prof: Profile | None = detect()
    except ValueError as e:
        prof, prof_error = None, str(e)
    nested_profile = prof is not None and prof.nested
    kvm: dict[str, Any] = {"path": KVM_PATH, "present": os.path.exists(KVM_PATH)}
    try:
        check_kvm()
        kvm["usable"] = True
    except SmolVMError as e:
        kvm["usable"] = False
        kvm["error"] = str(e)
        if not nested_profile:  # nested VMs use the host VM's KVM, not this one
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

    from .network import check_passt

    ok, seen = check_passt()
    rep["network"] = {"passt_ok": ok, "passt": seen}
    if not ok:
        rep.setdefault("hints", []).append(f"passt: {seen}")

    host = host_info()
    rep["host"] = {"kind": host.kind, "detail": host.detail}
    if prof is not None:
        rep["profile"] = {
            "name": prof.name,
            "reason": prof.reason,
            "extra_args": list(prof.extra_args),
            "cmdline": kernel_cmdline(prof),
        }
    else:
        rep["profile"] = {"error": prof_error}
        problems.append(prof_error)

    from . import hostvm

    why_not = hostvm.unavailable_reason()
    running = hostvm.current()
    rep["nested"] = {
        "available": why_not is None, "unavailable_reason": why_not,
        "host_vm_running": running is not None, "host_vm_pid": running.pid if running else None,
    }  # fmt: skip
    if nested_profile and why_not:
        problems.append(f"nested profile: {why_not}")
    rep["alternatives"] = {
        "native": "VT-x/AMD-V hosts only: guests run at hardware speed",
        "compat": "this host's own KVM, guest ring 0 emulated: boot ~1 min, `true` ~1-2 s, "
                  "`python3 -c pass` ~16 s; user space at native speed",
        "nested": "a QEMU TCG host VM with a real KVM: host VM start ~20 s once, boot ~5 s, "
                  "`true` ~20-100 ms, `python3 -c pass` ~0.2-1 s; user space several times slower",
    }  # fmt: skip

    h = home()
    rep["home"] = {"path": str(h), "bytes": _du(h)}
    rep["cache"] = _cache_report(h)
    rep["cache"]["images"] = _image_report()
    rep["snapshots"] = _snapshot_report(h, rep)
    vms = h / "vms"
    rep["vm_dirs"] = sorted(p.name for p in vms.iterdir()) if vms.is_dir() else []
    from . import registry

    live, gone = registry.scan()
    rep["vms"] = {"running": len(live), "ids": [r.vm_id for r in live], "gone_cleaned_up": gone}
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
    net = rep["network"]
    line("network", f"passt {'OK' if net['passt_ok'] else 'NOT USABLE'}: {net['passt']}")
    line("host", f"{rep['host']['kind']} ({rep['host']['detail']})")
    prof = rep["profile"]
    if "error" in prof:
        line("profile", f"INVALID: {prof['error']}")
    else:
        line("profile", f"{prof['name']}: {prof['reason']}")
        line("boot args", prof["cmdline"])
        for name, cost in rep["alternatives"].items():
            if name != prof["name"]:
                line("", f"instead {name}: {cost}")
    nested = rep["nested"]
    if nested["available"]:
        state = f"running (pid {nested['host_vm_pid']})" if nested["host_vm_running"] else "not running"
        line("nested", f"available; host VM {state} (`smolvm host status`)")
    else:
        line("nested", f"unavailable: {nested['unavailable_reason']}")
    line("SMOLVM_HOME", f"{rep['home']['path']} ({_mib(rep['home']['bytes'])} used)")
    for kind in ("kernel", "agent", "initramfs"):
        item = rep["cache"][kind]
        if item["built"]:
            line(kind, f"built ({item['current']}, {_mib(item['bytes'])} cached)")
        else:
            stale = f"; {len(item['entries'])} older build(s) cached" if item["entries"] else ""
            line(kind, f"not built (run `smolvm build`){stale}")
    images = rep["cache"].get("images", [])
    if images:
        line("images", ", ".join(f"{im['name']} ({_mib(im['bytes'])})" for im in images))
    else:
        line("images", "none built (run `smolvm build`; VMs build the default image on first use)")
    for note in rep["cache"]["_notes"]:
        line("note", note)
    snaps = rep["snapshots"]
    bases = snaps["base"]
    if snaps["default_base_cached"]:
        current = "the default configuration's (512 MiB, 1 vCPU) is cached: new VMs restore it"
    else:
        current = "none yet for the default configuration: the next SmolVM() boots and saves it"
    line("base snaps", f"{len(bases)} cached, {_mib(snaps['base_bytes'])} on disk; {current}")
    for b in bases:
        if b["problem"]:
            line("", f"{b['key']}: DAMAGED ({b['problem']})")
    user = snaps["user"]
    names = ", ".join(u["name"] + (" (DAMAGED)" if u["problem"] else "") for u in user)
    line("snapshots", f"{len(user)}, {_mib(snaps['user_bytes'])} on disk" + (f": {names}" if names else ""))
    vms = rep["vms"]
    line("VMs", f"{vms['running']} running" + (f": {', '.join(vms['ids'])}" if vms["ids"] else ""))
    if vms["gone_cleaned_up"]:
        line("", f"cleaned up the records of {len(vms['gone_cleaned_up'])} VM(s) whose VMM had ended: "
             + ", ".join(vms["gone_cleaned_up"]))  # fmt: skip
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
    from .build.agent import ensure_agent
    from .build.image import ensure_image
    from .build.initramfs import ensure_initramfs
    from .build.kernel import ensure_kernel

    steps: list[tuple[str, Callable[[], object]]] = [
        ("kernel", ensure_kernel),
        ("agent", ensure_agent),
        ("initramfs", lambda: ensure_initramfs(with_busybox=False)),
        ("busybox initramfs (image=None)", ensure_initramfs),
        ("default image", ensure_image),
    ]
    if getattr(args, "browser", False):
        from .browser import ensure_browser_image

        steps.append(("browser image", ensure_browser_image))
    from .profile import detect

    if detect().nested:
        from .build.hostvm import ensure_hostvm

        steps.insert(0, ("nested profile's host VM kernel", ensure_hostvm))
    for name, func in steps:
        progress(f"{name}: checking the cache")
        try:
            path = func()
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

    command = _command_words(args.command)
    if command is None:
        print("smolvm run: give a command after --, e.g. `smolvm run -- uname -a`", file=sys.stderr)
        return 2
    try:
        vm = SmolVM(memory=args.memory, vcpus=args.vcpus, image=args.image, disk_size=args.disk_size,
                    internet=not args.no_internet)
        slow = " (compat profile: this host emulates guest ring 0, a boot takes minutes)" if detect().compat else ""
        print(f"smolvm: booting {vm.vm_id}{slow}", file=sys.stderr, flush=True)
        with vm:
            print(f"smolvm: booted in {vm.boot_time:.1f} s; running {command!r}", file=sys.stderr, flush=True)
            result = vm.run(command, timeout=args.timeout)
    except (SmolVMError, ValueError, TypeError) as e:
        print(f"smolvm: error: {e}", file=sys.stderr)
        return EXIT_SMOLVM_ERROR
    return _emit(result, args.timeout)


def _emit(result: Any, timeout: float) -> int:
    """Write a command's raw output to our stdout/stderr; return its exit status (124 on timeout)."""
    sys.stdout.flush()
    sys.stdout.buffer.write(result.stdout_bytes)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr_bytes)
    sys.stderr.flush()
    if result.timed_out:
        print(f"smolvm: the command timed out after {timeout:g} s", file=sys.stderr)
        return EXIT_TIMED_OUT
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

    from . import registry

    live, gone = registry.scan()
    now = time.time()
    vms = [_vm_json(r, now) for r in live]
    if args.json:
        print(json.dumps({"vms": vms, "gone": gone}, indent=2))
        return 0
    if vms:
        rows = [["VM ID", "STATUS", "PID", "MEMORY", "VCPUS", "KIND", "AGE"]]
        for v in vms:
            kind = "persistent" if v["persistent"] else f"ephemeral (owner pid {v['owner_pid']})"
            rows.append([v["vm_id"], v["status"], str(v["pid"]), f"{v['memory']} MiB", str(v["vcpus"]),
                         kind, _age(v["age_s"])])  # fmt: skip
        _table(rows)
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
    from .errors import SmolVMError, VMNotFoundError
    from .vm import SmolVM

    words = list(args.command)
    if "--" in words and words[0].startswith("-"):  # options between ID and --
        i = words.index("--")
        opts = argparse.ArgumentParser(prog="smolvm exec", add_help=False)
        _exec_options(opts)
        args = opts.parse_args(words[:i], namespace=args)
        words = words[i + 1 :]
    command = _command_words(words)
    if command is None:
        print("smolvm exec: give a command after --, e.g. `smolvm exec ID -- uname -a`", file=sys.stderr)
        return EXIT_USAGE
    env: dict[str, str] = {}
    for item in args.env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            print(f"smolvm exec: --env wants NAME=VALUE, got {item!r}", file=sys.stderr)
            return EXIT_USAGE
        env[name] = value
    try:
        vm = SmolVM.from_id(args.vm_id)
    except VMNotFoundError as e:
        _err(str(e))
        return EXIT_NOT_FOUND
    try:
        result = vm.run(command, timeout=args.timeout, env=env or None, cwd=args.cwd)
    except (SmolVMError, ValueError, TypeError) as e:
        _err(str(e))
        return EXIT_SMOLVM_ERROR
    finally:
        vm.close()
    if args.json:
        print(json.dumps({
            "exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
            "timed_out": result.timed_out, "duration": round(result.duration, 3),
        }))  # fmt: skip
        return EXIT_TIMED_OUT if result.timed_out else result.exit_code & 0xFF
    return _emit(result, args.timeout)


def cmd_rm(args: argparse.Namespace) -> int:
    from . import registry
    from .errors import SmolVMError, VMNotFoundError
    from .vm import SmolVM

    if args.all == bool(args.vm_ids):
        print("smolvm rm: give VM ids or --all (not both)", file=sys.stderr)
        return EXIT_USAGE
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
            _err(str(e))
            rc = EXIT_NOT_FOUND
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
            _err(f"could not delete {vm_id}: {e}")
            rc = EXIT_SMOLVM_ERROR
            continue
        print(f"deleted {vm_id}")
    return rc


def _snap_json(i: Any) -> dict[str, Any]:
    return {
        "name": i.name, "path": str(i.path), "memory": i.memory, "vcpus": i.vcpus,
        "created": i.created, "source_vm": i.source_vm, "bytes": i.size_bytes,
        "problem": i.problem or None,
    }  # fmt: skip


def cmd_snapshot_create(args: argparse.Namespace) -> int:
    from . import snapshots
    from .errors import SmolVMError, VMNotFoundError
    from .vm import SmolVM

    try:
        snapshots.check_name(args.name)
    except ValueError as e:
        print(f"smolvm snapshot create: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        vm = SmolVM.from_id(args.vm_id)
    except VMNotFoundError as e:
        _err(str(e))
        return EXIT_NOT_FOUND
    try:
        info = vm.snapshot(args.name)
    except SmolVMError as e:
        _err(str(e))
        return EXIT_SMOLVM_ERROR
    finally:
        vm.close()
    if args.json:
        print(json.dumps(_snap_json(info), indent=2))
    else:
        print(f"saved snapshot {info.name} of {args.vm_id} ({_mib(info.size_bytes)} on disk); "
              f"start copies with SmolVM.from_snapshot({info.name!r})")  # fmt: skip
    return 0


def cmd_snapshot_ls(args: argparse.Namespace) -> int:
    import time

    from . import snapshots

    snaps = snapshots.list_all(damaged=True)
    if args.json:
        print(json.dumps({"snapshots": [_snap_json(i) for i in snaps]}, indent=2))
        return 0
    if not snaps:
        print("no snapshots (take one with `smolvm snapshot create ID NAME` or vm.snapshot(name))")
        return 0
    now = time.time()
    rows = [["NAME", "MEMORY", "VCPUS", "DISK", "AGE", "FROM VM", "STATE"]]
    for i in snaps:
        rows.append([i.name, f"{i.memory} MiB" if i.memory else "-", str(i.vcpus or "-"),
                     _mib(i.size_bytes), _age(now - i.created) if i.created else "-",
                     i.source_vm or "-", f"DAMAGED: {i.problem}" if i.problem else "ok"])  # fmt: skip
    _table(rows)
    return 0


def cmd_snapshot_rm(args: argparse.Namespace) -> int:
    from . import snapshots
    from .errors import SnapshotError

    rc = 0
    for name in dict.fromkeys(args.names):
        try:
            snapshots.delete(name)
        except (SnapshotError, ValueError) as e:
            _err(str(e))
            rc = EXIT_NOT_FOUND
            continue
        print(f"deleted snapshot {name}")
    return rc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smolvm", description="Run shell commands in KVM microVMs.")
    p.add_argument("--version", action="version", version=f"smolvm {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("doctor", help="check KVM, the compat profile and the caches")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_doctor)

    b = sub.add_parser("build", help="build the guest kernel, agent, initramfs and default image into $SMOLVM_HOME")
    b.add_argument("--browser", action="store_true", help="also the browser image (Chromium, Xvfb, noVNC, ffmpeg)")
    b.set_defaults(func=cmd_build)

    r = sub.add_parser(
        "run",
        help="boot a VM, run one command, print its output, exit with its code",
        description="Exit status: the command's, or 125 if the VM could not run it.",
    )
    r.add_argument("--memory", type=int, default=512, help="guest RAM in MiB (default 512)")
    r.add_argument("--vcpus", type=int, default=1, help="virtual CPUs (default 1)")
    r.add_argument("--image", default="default", help="root image (default: 'default', Debian)")
    r.add_argument("--disk-size", type=int, default=None, help="writable disk in MiB (default 1024)")
    r.add_argument("--timeout", type=float, default=60, help="command timeout in seconds (default 60)")
    r.add_argument("--no-internet", action="store_true", help="no network device in the VM (default: egress through passt)")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    r.set_defaults(func=cmd_run)

    ls = sub.add_parser("ls", help="list running VMs (records of VMs whose VMM ended are cleaned up)")
    ls.add_argument("--json", action="store_true", help='machine-readable: {"vms": [...], "gone": [...]}')
    ls.set_defaults(func=cmd_ls)

    e = sub.add_parser(
        "exec",
        help="run a command in a running VM, print its output, exit with its code",
        description="Exit status: the command's; 124 if it timed out; 1 for an unknown VM id; "
        "125 if the VM could not run it.",
    )
    _exec_options(e)
    e.add_argument("vm_id", metavar="ID")
    e.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    e.set_defaults(func=cmd_exec)

    rm = sub.add_parser("rm", help="delete VMs (stop them and remove their state)")
    rm.add_argument("vm_ids", nargs="*", metavar="ID")
    rm.add_argument("--all", action="store_true", help="delete every VM on this machine")
    rm.set_defaults(func=cmd_rm)

    from .cli_image import add_parser as add_image_parser

    add_image_parser(sub)

    from .cli_browser import add_parser as add_browser_parser

    add_browser_parser(sub)

    from .cli_port import add_parser as add_port_parser
    from .cli_ray import add_parser as add_ray_parser

    add_port_parser(sub)
    add_ray_parser(sub)

    from .cli_host import add_parser as add_host_parser

    add_host_parser(sub)

    sn = sub.add_parser("snapshot", help="named snapshots: create, ls, rm")
    snsub = sn.add_subparsers(dest="snapshot_cmd", required=True)
    sc = snsub.add_parser("create", help="save a running VM as a named snapshot")
    sc.add_argument("vm_id", metavar="ID")
    sc.add_argument("name", metavar="NAME")
    sc.add_argument("--json", action="store_true", help="machine-readable output")
    sc.set_defaults(func=cmd_snapshot_create)
    sl = snsub.add_parser("ls", help="list snapshots (damaged ones say why)")
    sl.add_argument("--json", action="store_true", help='machine-readable: {"snapshots": [...]}')
    sl.set_defaults(func=cmd_snapshot_ls)
    sr = snsub.add_parser("rm", help="delete snapshots")
    sr.add_argument("names", nargs="+", metavar="NAME")
    sr.set_defaults(func=cmd_snapshot_rm)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("smolvm: interrupted", file=sys.stderr)
        return 130

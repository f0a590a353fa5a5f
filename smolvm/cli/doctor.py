"""`smolvm doctor` (can this host run VMs, what is cached) and `smolvm build` (build what is missing)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._boot import DEFAULT_MEMORY_MIB, DEFAULT_VCPUS
from .. import __version__
from ._common import add_command, du, fail, mib, print_json
from .snapshot import snap_json


def _current_keys(home: Path) -> tuple[dict[str, str | None], list[str]]:
    """The cache key each artifact would have now (None where it cannot be computed), without building."""
    keys: dict[str, str | None] = {"kernel": None, "agent": None, "initramfs": None}
    notes: list[str] = []
    try:
        from ..build.kernel import kernel_key

        keys["kernel"] = kernel_key()
    except Exception as e:  # linux-source missing and the like
        notes.append(f"kernel: {e}")
    try:
        from ..build.agent import AGENT_NAME, agent_key

        akey = keys["agent"] = agent_key()
        agent = home / "agent" / akey / AGENT_NAME
        if agent.is_file():
            from ..build.initramfs import initramfs_key

            keys["initramfs"] = initramfs_key(agent, with_busybox=False)  # what image VMs boot
    except Exception as e:
        notes.append(f"agent/initramfs: {e}")
    return keys, notes


def _image_report() -> list[dict[str, Any]]:
    """The built root images (the newest of each name)."""
    from ..build.image import built_images

    newest: dict[str, Path] = {}
    for _done, name, folder in built_images():
        newest[name] = folder
    return [{"name": n, "path": str(f / "rootfs.ext4"), "bytes": du(f)} for n, f in sorted(newest.items())]


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
            "bytes": du(folder) if folder.is_dir() else 0,
        }
    return report


def _default_base_key(home: Path, rep: dict[str, Any]) -> str | None:
    """The base snapshot key a default SmolVM() would restore now, if its inputs are built."""
    from .._native import vmm_path
    from ..build.image import ImageError, image_path
    from ..build.initramfs import INITRAMFS_NAME
    from ..profile import detect
    from ..vm import base_key

    cache = rep["cache"]
    if not (cache["kernel"]["built"] and cache["initramfs"]["built"]):
        return None
    kernel = home / "kernel" / cache["kernel"]["current"] / "vmlinux"
    initrd = home / "initramfs" / cache["initramfs"]["current"] / INITRAMFS_NAME
    try:
        memory, vcpus = DEFAULT_MEMORY_MIB, DEFAULT_VCPUS
        return base_key(kernel, initrd, image_path(), memory, vcpus, vmm_path(), detect(), net=True)
    except (ImageError, OSError):  # no image yet, a missing VMM or artifact: reported elsewhere
        return None


def _snapshot_report(home: Path, rep: dict[str, Any]) -> dict[str, Any]:
    """Base snapshots (one per boot configuration) and user snapshots, with the disk they use."""
    from .. import snapshots

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
            "created": meta.get("created"), "bytes": du(d), "problem": snapshots.problem(d),
        })  # fmt: skip
    user = snapshots.list_all(damaged=True)
    key = _default_base_key(home, rep)
    return {
        "base": bases,
        "base_bytes": sum(b["bytes"] for b in bases),
        "default_base_key": key,
        "default_base_cached": key is not None and any(b["key"] == key and not b["problem"] for b in bases),
        "user": [snap_json(i) for i in user],
        "user_bytes": sum(i.size_bytes for i in user),
    }


def doctor_report() -> dict[str, Any]:
    from .._native import native, vmm_path
    from .._paths import home
    from ..errors import SmolVMError
    from ..kvm import KVM_PATH, check_kvm
    from ..profile import Profile, detect, host_info, kernel_cmdline

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

    from ..network import check_passt

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

    from .. import hostvm

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
    rep["home"] = {"path": str(h), "bytes": du(h)}
    rep["cache"] = _cache_report(h)
    rep["cache"]["images"] = _image_report()
    rep["snapshots"] = _snapshot_report(h, rep)
    vms = h / "vms"
    rep["vm_dirs"] = sorted(p.name for p in vms.iterdir()) if vms.is_dir() else []
    from .. import registry

    live, gone = registry.scan()
    rep["vms"] = {"running": len(live), "ids": [r.vm_id for r in live], "gone_cleaned_up": gone}
    from .. import forks

    rep["forks"] = forks.report()  # vm.fork() captures kept for live children; orphans removed
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
    line("SMOLVM_HOME", f"{rep['home']['path']} ({mib(rep['home']['bytes'])} used)")
    for kind in ("kernel", "agent", "initramfs"):
        item = rep["cache"][kind]
        if item["built"]:
            line(kind, f"built ({item['current']}, {mib(item['bytes'])} cached)")
        else:
            stale = f"; {len(item['entries'])} older build(s) cached" if item["entries"] else ""
            line(kind, f"not built (run `smolvm build`){stale}")
    images = rep["cache"].get("images", [])
    if images:
        line("images", ", ".join(f"{im['name']} ({mib(im['bytes'])})" for im in images))
    else:
        line("images", "none built (run `smolvm build`; VMs build the default image on first use)")
    for note in rep["cache"]["_notes"]:
        line("note", note)
    snaps = rep["snapshots"]
    bases = snaps["base"]
    if snaps["default_base_cached"]:
        config = f"{DEFAULT_MEMORY_MIB} MiB, {DEFAULT_VCPUS} vCPU"
        current = f"the default configuration's ({config}) is cached: new VMs restore it"
    else:
        current = "none yet for the default configuration: the next SmolVM() boots and saves it"
    line("base snaps", f"{len(bases)} cached, {mib(snaps['base_bytes'])} on disk; {current}")
    for b in bases:
        if b["problem"]:
            line("", f"{b['key']}: DAMAGED ({b['problem']})")
    user = snaps["user"]
    names = ", ".join(u["name"] + (" (DAMAGED)" if u["problem"] else "") for u in user)
    line("snapshots", f"{len(user)}, {mib(snaps['user_bytes'])} on disk" + (f": {names}" if names else ""))
    vms = rep["vms"]
    line("VMs", f"{vms['running']} running" + (f": {', '.join(vms['ids'])}" if vms["ids"] else ""))
    if vms["gone_cleaned_up"]:
        line("", f"cleaned up the records of {len(vms['gone_cleaned_up'])} VM(s) whose VMM had ended: "
             + ", ".join(vms["gone_cleaned_up"]))  # fmt: skip
    fk = rep["forks"]
    line("fork caps", f"{fk['count']} kept for live children, {mib(fk['bytes'])} on disk"
         + (f"; removed {len(fk['removed_orphans'])} orphaned" if fk["removed_orphans"] else ""))  # fmt: skip
    print("OK: this host can run smolvm VMs" if rep["ok"] else "PROBLEMS:\n  - " + "\n  - ".join(rep["problems"]))


def cmd_doctor(args: argparse.Namespace) -> int:
    rep = doctor_report()
    if args.json:
        print_json(rep)
    else:
        _print_doctor(rep)
    return 0 if rep["ok"] else 1


def cmd_build(args: argparse.Namespace) -> int:
    from ..build._cache import progress
    from ..build.agent import ensure_agent
    from ..build.image import ensure_image
    from ..build.initramfs import ensure_initramfs
    from ..build.kernel import ensure_kernel

    steps: list[tuple[str, Callable[[], object]]] = [
        ("kernel", ensure_kernel),
        ("agent", ensure_agent),
        ("initramfs", lambda: ensure_initramfs(with_busybox=False)),
        ("busybox initramfs (image=None)", ensure_initramfs),
        ("default image", ensure_image),
    ]
    if getattr(args, "browser", False):
        from ..browser import ensure_browser_image

        steps.append(("browser image", ensure_browser_image))
    from ..profile import detect

    if detect().nested:
        from ..build.hostvm import ensure_hostvm

        steps.insert(0, ("nested profile's host VM kernel", ensure_hostvm))
    for name, func in steps:
        progress(f"{name}: checking the cache")
        try:
            path = func()
        except KeyboardInterrupt:
            raise
        except Exception as e:
            return fail(f"{name} failed: {e}", 1, "smolvm build")
        progress(f"{name}: {path}")
    return 0


def add_parser(sub: Any) -> None:
    add_command(sub, "doctor", cmd_doctor, "check KVM, the compat profile and the caches",
                json_help="machine-readable output")  # fmt: skip
    b = add_command(sub, "build", cmd_build,
                    "build the guest kernel, agent, initramfs and default image into $SMOLVM_HOME")  # fmt: skip
    b.add_argument("--browser", action="store_true", help="also the browser image (Chromium, Xvfb, noVNC, ffmpeg)")

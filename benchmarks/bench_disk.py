"""Benchmark the disk-backed sandbox: create with a 2 GiB disk, python3 round trip, file throughput; JSON out.

    python3 benchmarks/bench_disk.py [--disk-size 2048] [--runs 5] [--big-mib 50] [--rebuild-image]
                                     [--out FILE.json]

On hosts whose KVM emulates guest ring 0 (the compat profile) absolute guest-side times say
little about real hardware; host-side figures (disk creation, host disk used) do.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from smolvm import SmolVM, disk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import arguments, host_facts, median, timed, write_result  # noqa: E402

MIB = 1 << 20

METHODOLOGY = (
    "create: SmolVM(disk_size=N).start() restoring the configuration's base snapshot (made "
    "first if missing, not timed) = make the sparse ext4 disk on the host (mkfs.ext4), spawn the "
    "VMM, restore, setup frame (the guest mounts its disk and overlay root). 'mkfs_s' times "
    "disk.create() alone. 'host_disk_used' is st_blocks of the VM's disk file right after start. "
    "python3: median wall time of run('python3 -c pass') in a started sandbox, after one warm-up. "
    "throughput: upload_file/download_file of a random file, MiB/s of wall time (guest writes go "
    "through its page cache). image_build_s: the default image's recorded build time, or a fresh "
    "build into a temporary SMOLVM_HOME with --rebuild-image."
)


def bench_create(disk_mib: int, runs: int) -> dict[str, Any]:
    SmolVM(disk_size=disk_mib).start().delete()  # make the base snapshot if needed
    starts, used = [], []
    for _ in range(runs):
        t0 = time.monotonic()
        vm = SmolVM(disk_size=disk_mib).start()
        starts.append(time.monotonic() - t0)
        used.append(disk.used_bytes(vm.state_dir / "disk.img"))
        df = vm.run("df -k / | tail -1", timeout=600).stdout.split()
        vm.delete()
    with tempfile.TemporaryDirectory() as d:
        mk = []
        for i in range(runs):
            t0 = time.monotonic()
            disk.create(Path(d) / f"d{i}.img", disk_mib)
            mk.append(time.monotonic() - t0)
    return {
        "disk_size_mib": disk_mib, "start_s": median(starts), "start_s_all": [round(x, 3) for x in starts],
        "mkfs_s": median(mk), "host_disk_used_mib": round(statistics.median(used) / MIB, 2),
        "guest_root_free_mib": round(int(df[3]) / 1024, 1) if len(df) > 3 else None,
    }  # fmt: skip


def bench_python(vm: SmolVM, runs: int) -> dict[str, Any]:
    def python_pass() -> None:
        r = vm.run("python3 -c pass", timeout=600)
        assert r.ok, r.stderr

    vm.run("python3 -c pass", timeout=600)  # warm-up
    times = timed(python_pass, runs, warmup=False)
    sh = timed(lambda: vm.run("true", timeout=600), runs, warmup=False)
    return {"python3_c_pass_s": median(times), "sh_true_s": median(sh)}


def bench_transfer(vm: SmolVM, mib: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        src, back = Path(d) / "src", Path(d) / "back"
        src.write_bytes(os.urandom(mib * MIB))
        t0 = time.monotonic()
        vm.upload_file(src, f"/root/bench-{mib}")
        up = time.monotonic() - t0
        t0 = time.monotonic()
        vm.download_file(f"/root/bench-{mib}", back)
        down = time.monotonic() - t0
        assert back.read_bytes() == src.read_bytes()
    vm.run(f"rm -f /root/bench-{mib}", timeout=600)
    return {"mib": mib, "upload_s": round(up, 3), "upload_mib_s": round(mib / up, 2),
            "download_s": round(down, 3), "download_mib_s": round(mib / down, 2)}  # fmt: skip


def bench_image(rebuild: bool) -> dict[str, Any]:
    from smolvm.build.image import ensure_image

    if not rebuild:
        meta = json.loads((ensure_image().parent / "image.json").read_text())
        return {"image_build_s": meta.get("build_seconds"), "image_mib": round(meta["size"] / MIB, 1),
                "source": "recorded at build"}  # fmt: skip
    with tempfile.TemporaryDirectory() as home:
        old = os.environ.get("SMOLVM_HOME")
        os.environ["SMOLVM_HOME"] = home
        try:
            t0 = time.monotonic()
            path = ensure_image()
            took = time.monotonic() - t0
            size = path.stat().st_size
        finally:
            if old is None:
                os.environ.pop("SMOLVM_HOME", None)
            else:
                os.environ["SMOLVM_HOME"] = old
    return {"image_build_s": round(took, 1), "image_mib": round(size / MIB, 1), "source": "fresh build"}


def main() -> int:
    ap = arguments(__doc__, "bench_disk")
    ap.add_argument("--disk-size", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--big-mib", type=int, default=50)
    ap.add_argument("--rebuild-image", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {
        "host": platform.node(), **host_facts("profile", "profile_reason"),
        "methodology": METHODOLOGY, "image": bench_image(args.rebuild_image),
    }
    print("image:", out["image"], file=sys.stderr)
    out["create"] = bench_create(args.disk_size, args.runs)
    print("create:", out["create"], file=sys.stderr)
    with SmolVM(disk_size=args.disk_size) as vm:
        out["python3"] = bench_python(vm, args.runs)
        print("python3:", out["python3"], file=sys.stderr)
        out["transfer"] = [bench_transfer(vm, 1), bench_transfer(vm, args.big_mib)]
        print("transfer:", out["transfer"], file=sys.stderr)
    write_result(args.out, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

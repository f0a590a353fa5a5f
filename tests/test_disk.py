"""The Debian root image with a writable disk per VM, files in and out, env and cwd: real VMs."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import io
import json
import os
import secrets
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smolvm import SmolVM
from smolvm.build.image import ImageNotFoundError
from smolvm.errors import SnapshotError
from smolvm.network import HOST_ALIAS

pytestmark = pytest.mark.vm

MIB = 1 << 20
SLOW = 600  # seconds: guest kernel work is emulated (slow) on some hosts


@pytest.fixture(scope="module")
def small_disk(vm: SmolVM) -> Iterator[SmolVM]:
    """A VM whose disk is only 64 MiB (restored from the same base snapshot as `vm`)."""
    with SmolVM(disk_size=64) as small:
        yield small


def test_root_is_an_overlay_on_the_image_and_the_disk(vm: SmolVM) -> None:
    r = vm.run("cat /proc/mounts; df -k / | tail -1; . /etc/os-release; echo ID=$ID", timeout=SLOW)
    assert r.ok, r.stderr
    root = [ln for ln in r.stdout.splitlines() if ln.split()[1:2] == ["/"]]
    assert root and root[-1].split()[2] == "overlay", r.stdout
    assert "ID=debian" in r.stdout
    avail_kib = int([ln for ln in r.stdout.splitlines() if ln.startswith("overlay")][-1].split()[3])
    assert vm.disk_size == 1024
    assert 900 * 1024 < avail_kib <= 1024 * 1024, r.stdout  # the disk's size, minus ext4's own


@pytest.mark.guest_only
def test_python3_version_and_a_script(vm: SmolVM) -> None:
    r = vm.run("python3 --version", timeout=SLOW)
    assert r.ok and r.stdout.startswith("Python 3."), r
    script = "\n".join([
        "python3 - <<'EOF'",
        "import json, sys",
        "squares = {n: n * n for n in range(5)}",
        "for n in sorted(squares):",
        "    print(n, squares[n])",
        "print(json.dumps({'ok': True}), file=sys.stderr)",
        "EOF",
    ])  # fmt: skip
    r = vm.run(script, timeout=SLOW)
    assert r.ok, r.stderr
    assert r.stdout == "0 0\n1 1\n2 4\n3 9\n4 16\n"
    assert r.stderr.strip() == '{"ok": true}'


def _wheel(tmp_path: Path) -> Path:
    """A tiny pure-Python wheel, written by hand (no build tools, no network)."""
    name, ver = "smolvm_hello", "1.0"
    dist = f"{name}-{ver}.dist-info"
    files = {
        f"{name}/__init__.py": b"def greet():\n    return 'hello from a wheel'\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: smolvm-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    out = tmp_path / f"{name}-{ver}-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    out.write_bytes(buf.getvalue())
    return out


@pytest.fixture
def simple_index(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A PEP 503 simple index on the host's 127.0.0.1 holding one wheel: (port, project name)."""
    wheel = _wheel(tmp_path)
    project = tmp_path / "www" / "simple" / "smolvm-hello"
    project.mkdir(parents=True)
    wheel.rename(project / wheel.name)
    digest = hashlib.sha256((project / wheel.name).read_bytes()).hexdigest()
    (project / "index.html").write_text(f'<a href="{wheel.name}#sha256={digest}">{wheel.name}</a>\n')
    (project.parent / "index.html").write_text('<a href="smolvm-hello/">smolvm-hello</a>\n')

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "www"))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], "smolvm-hello"
    srv.shutdown()
    srv.server_close()


@pytest.mark.guest_only
def test_venv_and_pip_install_from_an_index_on_the_host(vm: SmolVM, simple_index: tuple[int, str]) -> None:
    # The venv borrows Debian's pip (--system-site-packages) instead of copying one into it
    # with ensurepip: one pip run instead of three, minutes on hosts that emulate ring 0.
    # The index is served on the host's loopback, reached as host.smolvm.internal (no public index).
    port, project = simple_index
    index = f"http://{HOST_ALIAS}:{port}/simple/"
    r = vm.run(
        "python3 -m venv --without-pip --system-site-packages /root/venv && "
        f"/root/venv/bin/python -m pip install -q --index-url {index} --trusted-host {HOST_ALIAS} "
        f"--no-deps --no-cache-dir --no-compile --disable-pip-version-check {project} && "
        "/root/venv/bin/python -c 'import sys, smolvm_hello; print(sys.prefix, smolvm_hello.greet())' && "
        "python3 -c 'import smolvm_hello' 2>&1 | tail -1",
        timeout=1800,
    )
    assert r.ok, r
    lines = r.stdout.strip().splitlines()
    assert len(lines) >= 2 and lines[-2] == "/root/venv hello from a wheel", r
    assert "ModuleNotFoundError" in lines[-1], r  # installed into the venv, not the system


@pytest.mark.guest_only
def test_64_mib_fit_on_a_256_mib_disk(vm: SmolVM) -> None:
    with SmolVM(disk_size=256) as mid:
        r = mid.run(
            "dd if=/dev/zero of=/root/big bs=1M count=64 oflag=direct 2>&1 && sync && "
            "stat -c %s /root/big && df -k / | tail -1",
            timeout=SLOW,
        )
        assert r.ok, r
        lines = r.stdout.strip().splitlines()
        assert len(lines) >= 2 and lines[-2] == str(64 * MIB), r
        avail_kib = int(lines[-1].split()[3])
        assert 100 * 1024 < avail_kib < 200 * 1024, r.stdout  # 256 MiB - 64 MiB - ext4's own


def test_full_disk_fails_the_command_not_the_vm(small_disk: SmolVM) -> None:
    r = small_disk.run("dd if=/dev/zero of=/root/fill bs=1M count=128 oflag=direct", timeout=SLOW)
    assert not r.ok and r.exit_code != 0
    assert "No space left on device" in r.stderr
    r = small_disk.run("rm /root/fill && echo still-works > /root/after && cat /root/after", timeout=SLOW)
    assert r.ok and r.stdout == "still-works\n", r


def test_two_vms_disks_are_independent(vm: SmolVM, small_disk: SmolVM) -> None:
    mark = secrets.token_hex(8)
    assert vm.run(f"echo {mark} > /root/mark-a && echo {mark} > /etc/mark-a", timeout=SLOW).ok
    r = small_disk.run("cat /root/mark-a /etc/mark-a", timeout=SLOW)
    assert not r.ok and "No such file" in r.stderr
    assert small_disk.run(f"echo b > /root/mark-b-{mark}", timeout=SLOW).ok
    assert not vm.run(f"test -e /root/mark-b-{mark}", timeout=SLOW).ok
    assert vm.run("cat /etc/mark-a", timeout=SLOW).stdout == f"{mark}\n"


@pytest.mark.parametrize("size", [0, 1, pytest.param(8 * MIB, marks=pytest.mark.guest_only)])
def test_upload_download_round_trip(vm: SmolVM, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    src, back = tmp_path / "src.bin", tmp_path / "back.bin"
    src.write_bytes(data)
    src.chmod(0o640)
    assert vm.upload_file(src, f"/root/f{size}.bin") == size
    r = vm.run(f"sha256sum /root/f{size}.bin; stat -c %a /root/f{size}.bin", timeout=SLOW)
    assert r.ok, r.stderr
    assert r.stdout.split() == [hashlib.sha256(data).hexdigest(), f"/root/f{size}.bin", "640"]
    assert vm.download_file(f"/root/f{size}.bin", back) == back
    assert back.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_download_into_a_folder_keeps_the_name(vm: SmolVM, tmp_path: Path) -> None:
    assert vm.run("printf 'a\\nb\\n' > /root/two-lines.txt", timeout=SLOW).ok
    got = vm.download_file("/root/two-lines.txt", tmp_path)
    assert got == tmp_path / "two-lines.txt" and got.read_bytes() == b"a\nb\n"


def test_file_errors_name_the_path(vm: SmolVM, tmp_path: Path) -> None:
    src = tmp_path / "x"
    src.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="/no/such/folder"):
        vm.upload_file(src, "/no/such/folder/x", make_dirs=False)
    assert vm.run("ls /no 2>&1", timeout=SLOW).exit_code != 0
    with pytest.raises(FileNotFoundError, match="missing-local"):
        vm.upload_file(tmp_path / "missing-local", "/root/x")
    with pytest.raises(FileNotFoundError, match="/root/never-written"):
        vm.download_file("/root/never-written", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(IsADirectoryError):
        vm.download_file("/root", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        vm.download_file("/etc/hostname", tmp_path / "no-such-dir" / "h", make_dirs=False)
    for bad in ("relative/path", "", "/"):
        with pytest.raises(ValueError, match="absolute|name a file"):
            vm.upload_file(src, bad)
        with pytest.raises(ValueError, match="absolute|name a file"):
            vm.download_file(bad, tmp_path / "out")
    assert vm.run("echo alive", timeout=SLOW).stdout == "alive\n"


def test_env_cwd_and_set_env(vm: SmolVM) -> None:
    r = vm.run("pwd; echo $ONE-$TWO", env={"ONE": "1", "TWO": "2"}, cwd="/usr/share", timeout=SLOW)
    assert r.stdout == "/usr/share\n1-2\n", r
    with pytest.raises(FileNotFoundError, match="/no/such/dir"):
        vm.run("pwd", cwd="/no/such/dir", timeout=SLOW)
    with pytest.raises(NotADirectoryError, match="/etc/hostname"):
        vm.run("pwd", cwd="/etc/hostname", timeout=SLOW)
    try:
        vm.set_env({"SMOLVM_KEEP": "kept", "SMOLVM_OVER": "base"})
        assert vm.env["SMOLVM_KEEP"] == "kept"
        r = vm.run("echo $SMOLVM_KEEP $SMOLVM_OVER", env={"SMOLVM_OVER": "run"}, timeout=SLOW)
        assert r.stdout == "kept run\n"
        other = SmolVM.from_id(vm.vm_id)  # another handle (as another process would get) sees it
        assert other.run("echo $SMOLVM_KEEP", timeout=SLOW).stdout == "kept\n"
        other.close()
        vm.set_env({"SMOLVM_KEEP": None})
        assert vm.run("echo x${SMOLVM_KEEP}x", timeout=SLOW).stdout == "xx\n"
    finally:
        vm.set_env({"SMOLVM_KEEP": None, "SMOLVM_OVER": None})
    with pytest.raises(TypeError):
        vm.set_env(["A=1"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        vm.set_env({"A=B": "1"})


def test_snapshot_carries_the_disk(vm: SmolVM) -> None:
    name = "test-disk-" + secrets.token_hex(4)
    with SmolVM(disk_size=128) as src:
        assert src.run("echo before > /root/state.txt", timeout=SLOW).ok
        src.snapshot(name)
        assert src.run("echo after > /root/state.txt", timeout=SLOW).ok
        from smolvm import snapshots

        meta_file = snapshots.user_dir(name) / snapshots.META
        meta = json.loads(meta_file.read_text())
        # As if taken through a $SMOLVM_HOME path that has since gone (a symlinked cache, as
        # CI's nested test home once was): the image, found by name and unchanged, still serves.
        meta["image"]["path"] = "/nonexistent/home/images/default/rootfs.ext4"
        meta_file.write_text(json.dumps(meta))
        try:
            restored = SmolVM.from_snapshot(name)
            assert restored.image == "default" and restored.disk_size == 128
            with restored:
                assert restored.run("cat /root/state.txt", timeout=SLOW).stdout == "before\n"
                assert restored.run("echo mine > /root/state.txt", timeout=SLOW).ok
            assert src.run("cat /root/state.txt", timeout=SLOW).stdout == "after\n"
            meta["image"]["ident"] += "-rebuilt"  # the image changed since: refused, clearly
            meta_file.write_text(json.dumps(meta))
            with pytest.raises(SnapshotError, match="rebuilt or removed; take the snapshot again"):
                SmolVM.from_snapshot(name).start()
        finally:
            snapshots.delete(name)


def test_image_and_disk_arguments_are_checked() -> None:
    with pytest.raises(ImageNotFoundError, match="default"):
        SmolVM(image="no-such-image")
    with pytest.raises(ValueError, match="disk_size"):
        SmolVM(disk_size=8)
    with pytest.raises(TypeError, match="disk_size"):
        SmolVM(disk_size="2G")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="disk_size needs an image"):
        SmolVM(image=None, disk_size=100)
    with pytest.raises(ValueError, match="image name"):
        SmolVM(image="Bad Name")
    vm = SmolVM(memory=1024, disk_size=2048)
    assert (vm.memory, vm.disk_size, vm.image) == (1024, 2048, "default")
    vm.close()

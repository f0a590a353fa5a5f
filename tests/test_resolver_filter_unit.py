"""The VMM's resolver thread under its real seccomp filter, against a DNS server in a network namespace of its own (no VM).

tests/c/test_resolver_filter.c runs csrc/vmm/resolver.c with the "resolver" role of csrc/vmm/sysfilter.c
(a forbidden call kills it). It runs in new mount and network namespaces (root only): resolv.conf, hosts and
nsswitch.conf are bind-mounted over the real ones there, and the only nameserver is a small one on that
namespace's loopback, so no query leaves it. nsswitch.conf names hesiod first: glibc must load it (an
executable mapping), which the filter refuses with EPERM, and glibc goes on to files and dns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ctest import ROOT, compiler
from smolvm import _binaries, _process

SOURCES = ["tests/c/test_resolver_filter.c", "csrc/vmm/resolver.c", "csrc/vmm/sysfilter.c"]

# Inside the namespaces: answer every A query on 127.0.0.1:53 with 127.0.0.9, run the test (argv), exit with its status.
SERVER = r"""
import socket, struct, subprocess, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
def serve():
    while True:
        q, peer = s.recvfrom(600)
        end = q.index(b"\0", 12) + 5
        a = q[:2] + b"\x81\x80" + q[4:6] + b"\x00\x00\x00\x00\x00\x00" + q[12:end]
        if struct.unpack(">H", q[end - 4:end - 2])[0] == 1:
            a = a[:6] + b"\x00\x01" + a[8:] + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([127, 0, 0, 9])
        s.sendto(a, peer)
threading.Thread(target=serve, daemon=True).start()
sys.exit(subprocess.run(sys.argv[1:]).returncode)
"""


def test_resolver_thread_resolves_under_its_filter(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip (new mount and network namespaces)")
    exe = tmp_path / "test_resolver_filter"
    libs = [f"-l{lib}" for lib in _binaries.BINARIES["smolvm-vmm"].libraries]
    cmd = [
        compiler(), "-std=gnu11", "-O1", "-Wall", "-Wextra", "-Werror",
        *(f"-I{d}" for d in _binaries.include_dirs("smolvm-vmm", ROOT)),
        "-o", str(exe), *(str(ROOT / s) for s in SOURCES), *libs,
    ]  # fmt: skip
    built = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    files = {"resolv.conf": "nameserver 127.0.0.1\n", "hosts": "127.0.0.1 localhost\n127.0.0.7 pinned.test\n",
             "nsswitch.conf": "hosts: hesiod files dns\n"}  # fmt: skip
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "server.py").write_text(SERVER)
    mounts = " && ".join(f"mount --bind {tmp_path / name} /etc/{name}" for name in files)
    script = f"ip link set lo up && {mounts} && exec python3 {tmp_path / 'server.py'} \"$@\""
    # A plain build: the ASan pass's preloaded runtime must not join it (its exit-time calls are
    # outside the release filter and would die of SIGSYS after the tests passed).
    env = _process.tool_env()
    done = subprocess.run(
        ["unshare", "--mount", "--net", "sh", "-c", script, "sh", str(exe),
         "pinned.test=127.0.0.7", "allowed.example=127.0.0.9", "localhost=127.0.0.1"],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr  # 225 (-31 & 255, SIGSYS): the filter killed it
    assert "all resolver_filter tests passed" in done.stdout, done.stdout

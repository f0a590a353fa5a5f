"""Shared by the host-only agent tests: build the agent and a C test client, run the client against it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from smolvm import _binaries  # noqa: E402
from smolvm.build import agent as agent_build  # noqa: E402

WARN = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-g"]
SANITIZE = ["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
VARIANTS = {"plain": ["-O2"], "sanitized": SANITIZE}


def need_toolchain() -> None:
    if shutil.which("cc") is None or shutil.which("gcc") is None:
        pytest.skip("needs a C compiler: apt-get install gcc libc6-dev")
    if not Path("/usr/include/liburing.h").exists():
        pytest.skip("needs liburing: apt-get install liburing-dev")


def cc(args: list[str]) -> None:
    res = subprocess.run(["cc", *args], capture_output=True, text=True)
    assert res.returncode == 0, f"cc {' '.join(args)}\n{res.stderr}"


def run_client_against_agent(variant: str, tmp_path: Path, test_c: str) -> None:
    """Compile tests/c/<test_c> with the host side of the protocol (the _smolvm extension's C files
    but module.c) and run it against the agent in --unix mode.

    plain: the agent exactly as it goes into the guest (static, stripped); sanitized: ASan+UBSan both sides.
    """
    need_toolchain()
    flags = VARIANTS[variant]
    agent = tmp_path / "agent"
    test = tmp_path / Path(test_c).stem
    agent_build.compile_agent(agent, None if variant == "plain" else [*WARN, *flags])
    incs = [f"-I{d}" for d in _binaries.include_dirs("_smolvm", ROOT)]
    cc([*WARN, *flags, *incs, "-o", str(test), str(ROOT / "tests/c" / test_c),
        *map(str, _binaries.library("_smolvm", ROOT)), "-luring", "-lpthread"])  # fmt: skip
    res = subprocess.run(
        [str(test), str(agent)], capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
             "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"},
    )  # fmt: skip
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert "0 failure(s)" in res.stdout

"""Compile and run tests/c/test_exec.c: the guest agent in --unix mode against csrc/exec_client.c, no VM needed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from smolvm.build import agent as agent_build  # noqa: E402
from smolvm.build.initramfs import _is_static_elf  # noqa: E402

WARN = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-g"]
SANITIZE = ["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
VARIANTS = {"plain": ["-O2"], "sanitized": SANITIZE}


def _need_toolchain() -> None:
    if shutil.which("cc") is None or shutil.which("gcc") is None:
        pytest.skip("needs a C compiler: apt-get install gcc libc6-dev")
    if not Path("/usr/include/liburing.h").exists():
        pytest.skip("needs liburing: apt-get install liburing-dev")


def _cc(args: list[str]) -> None:
    res = subprocess.run(["cc", *args], capture_output=True, text=True)
    assert res.returncode == 0, f"cc {' '.join(args)}\n{res.stderr}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exec_client_against_agent(variant: str, tmp_path: Path) -> None:
    _need_toolchain()
    flags = VARIANTS[variant]
    agent = tmp_path / "agent"
    test = tmp_path / "test_exec"
    # plain: the agent exactly as it goes into the guest (static, stripped); sanitized: ASan+UBSan both sides
    agent_build.compile_agent(agent, None if variant == "plain" else [*WARN, *flags])
    _cc([*WARN, *flags, "-I", str(ROOT / "csrc"), "-o", str(test),
         str(ROOT / "tests/c/test_exec.c"), str(ROOT / "csrc/exec_client.c"), "-luring", "-lpthread"])
    res = subprocess.run(
        [str(test), str(agent)], capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
             "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"},
    )
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert "0 failure(s)" in res.stdout


def test_ensure_agent_is_static_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_toolchain()
    monkeypatch.setenv("SMOLVM_HOME", str(tmp_path))
    path = agent_build.ensure_agent()
    assert path.is_file() and path.is_relative_to(tmp_path)
    assert _is_static_elf(path.read_bytes()), "the agent must be a static binary (the guest has no libc)"
    mtime = path.stat().st_mtime_ns
    assert agent_build.ensure_agent() == path
    assert path.stat().st_mtime_ns == mtime


def test_missing_compiler_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_build, "CC", "smolvm-no-such-gcc")
    with pytest.raises(agent_build.AgentBuildError, match="apt-get install gcc libc6-dev"):
        agent_build.agent_key()

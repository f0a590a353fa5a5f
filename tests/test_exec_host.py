"""Compile and run tests/c/test_exec.c: the guest agent in --unix mode against csrc/client/exec_client.c, no VM needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent_host import VARIANTS, need_toolchain, run_client_against_agent  # noqa: E402

from smolvm.build import agent as agent_build  # noqa: E402
from smolvm.build.initramfs import _is_static_elf  # noqa: E402

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exec_client_against_agent(variant: str, tmp_path: Path) -> None:
    run_client_against_agent(variant, tmp_path, "test_exec.c")


def test_ensure_agent_is_static_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_toolchain()
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

"""`smolvm image build NAME --packages ...`, then SmolVM(image=NAME) runs in it: real mmdebstrap, real VM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from smolvm import SmolVM
from smolvm.build.image import ImageNotFoundError

pytestmark = [pytest.mark.vm, pytest.mark.guest_only]

NAME = "smolvm-test-jq"
SLOW = 600


def smolvm_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smolvm", *args], capture_output=True, text=True,
                          env=env, timeout=1800)  # fmt: skip


def test_custom_image_build_ls_use_rm(smolvm_env: dict[str, str], vm: SmolVM) -> None:
    bad = smolvm_cli(smolvm_env, "image", "build", NAME)
    assert bad.returncode == 2 and "--packages" in bad.stderr  # says how to name packages
    built = smolvm_cli(smolvm_env, "image", "build", NAME, "--packages", "jq", "--json")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["name"] == NAME
    listed = json.loads(smolvm_cli(smolvm_env, "image", "ls", "--json").stdout)["images"]
    mine = [im for im in listed if im["name"] == NAME]
    assert mine and "jq" in mine[0]["packages"] and "python3" in mine[0]["packages"]
    with SmolVM(image=NAME, disk_size=128) as custom:
        r = custom.run("jq --version && echo '{\"a\": [1, 2]}' | jq -c .a && python3 --version", timeout=SLOW)
        assert r.ok, r.stderr
        assert r.stdout.splitlines()[1] == "[1,2]"
        assert custom.image == NAME
    assert not vm.run("command -v jq", timeout=SLOW).ok  # the default image has no jq
    removed = smolvm_cli(smolvm_env, "image", "rm", NAME)
    assert removed.returncode == 0, removed.stderr
    with pytest.raises(ImageNotFoundError, match=NAME):
        SmolVM(image=NAME)
    again = smolvm_cli(smolvm_env, "image", "rm", NAME)
    assert again.returncode == 1 and "no image named" in again.stderr

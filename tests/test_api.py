"""Tests of the Python side that need no VM: RunResult, argument checks, profile detection, errors, doctor, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import smolvm
from smolvm import RunResult, SmolVM
from smolvm import profile as prof
from smolvm._process import describe_status, parse_exit_line, tail
from smolvm.kvm import check_kvm


# ---- RunResult --------------------------------------------------------------------------


def test_run_result_decoding_and_fields() -> None:
    r = RunResult.from_bytes(0, b"  hello\n", b"w\xffarn", 0.25)
    assert r.stdout == "  hello\n"
    assert r.stderr == "w\ufffdarn"
    assert r.stderr_bytes == b"w\xffarn"
    assert r.output == "hello"
    assert r.ok and not r.timed_out
    assert r.duration == 0.25


def test_run_result_not_ok() -> None:
    assert not RunResult.from_bytes(1, b"", b"", 0.1).ok
    timed = RunResult.from_bytes(124, b"so far", b"", 5.0, timed_out=True)
    assert not timed.ok and timed.timed_out and timed.exit_code == 124


def test_run_result_repr_is_short() -> None:
    r = RunResult.from_bytes(3, b"x" * 10_000, b"", 1.5)
    text = repr(r)
    assert text.startswith("RunResult(exit_code=3, ok=False")
    assert "1.500s" in text and "+9940 chars" in text
    assert len(text) < 300


def test_run_result_is_frozen() -> None:
    r = RunResult.from_bytes(0, b"", b"", 0.0)
    with pytest.raises(AttributeError):
        r.exit_code = 1  # type: ignore[misc]


# ---- argument validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"memory": 10}, ValueError, "memory must be between 64 and 65536"),
        ({"memory": 100_000}, ValueError, "memory"),
        ({"memory": "512"}, TypeError, "memory must be an int"),
        ({"memory": 512.0}, TypeError, "memory must be an int"),
        ({"memory": True}, TypeError, "memory"),
        ({"vcpus": 0}, ValueError, "vcpus must be between 1 and 16"),
        ({"vcpus": 17}, ValueError, "vcpus"),
        ({"vcpus": None}, TypeError, "vcpus"),
        ({"boot_timeout": 0}, ValueError, "boot_timeout"),
        ({"boot_timeout": "soon"}, TypeError, "boot_timeout"),
        ({"kernel": "/nonexistent/vmlinux"}, FileNotFoundError, "kernel"),
        ({"initrd": 42}, TypeError, "initrd"),
    ],
)
def test_smolvm_validation(kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        SmolVM(**kwargs)


def test_smolvm_fresh_state() -> None:
    vm = SmolVM(memory=256, vcpus=2)
    assert vm.status == "created"
    assert vm.vm_id.startswith("vm-") and len(vm.vm_id) == 15
    assert vm.console_log.name == "console.log"
    assert vm.pid is None
    assert "created" in repr(vm)
    vm.close()
    vm.close()
    assert vm.status == "stopped"
    with pytest.raises(smolvm.VMNotRunningError):
        vm.run("true")


@pytest.mark.parametrize(
    ("args", "kwargs", "exc"),
    [
        ((123,), {}, TypeError),
        (("",), {}, ValueError),
        (("a\0b",), {}, ValueError),
        (("true",), {"timeout": 0}, ValueError),
        (("true",), {"timeout": -1}, ValueError),
        (("true",), {"timeout": float("nan")}, ValueError),
        (("true",), {"timeout": "30"}, TypeError),
        (("true",), {"timeout": 10**9}, ValueError),
        (("true",), {"env": ["A=1"]}, TypeError),
        (("true",), {"env": {"A=B": "1"}}, ValueError),
        (("true",), {"env": {"A": 1}}, TypeError),
        (("true",), {"cwd": "relative/dir"}, ValueError),
        (("true",), {"cwd": 5}, TypeError),
    ],
)
def test_run_validation_before_boot(args: tuple, kwargs: dict, exc: type[Exception]) -> None:
    vm = SmolVM()
    with pytest.raises(exc):
        vm.run(*args, **kwargs)
    assert vm.status == "created", "bad arguments must not boot a VM"


def test_boot_timeout_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_BOOT_TIMEOUT", "12.5")
    assert SmolVM()._boot_timeout == 12.5
    monkeypatch.setenv("SMOLVM_BOOT_TIMEOUT", "abc")
    with pytest.raises(ValueError, match="SMOLVM_BOOT_TIMEOUT"):
        SmolVM()


# ---- profile detection ------------------------------------------------------------------


def fake_root(tmp_path: Path, flags: str, kvm: bool = True, pvm: bool = False, mhz: str = "2445.406") -> Path:
    (tmp_path / "proc").mkdir(parents=True)
    (tmp_path / "proc/cpuinfo").write_text(
        f"processor\t: 0\nmodel name\t: Test CPU\ncpu MHz\t\t: {mhz}\nflags\t\t: fpu {flags} sse2\n\n"
        f"processor\t: 1\nflags\t\t: fpu\n"
    )
    if kvm:
        (tmp_path / "dev").mkdir()
        (tmp_path / "dev/kvm").write_text("")
    if pvm:
        (tmp_path / "sys/module/kvm_pvm").mkdir(parents=True)
    return tmp_path


def test_profile_vtx_is_native(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "vmx ept")
    p = prof.detect(env={}, root=root)
    assert p.name == "native" and p.extra_args == () and "VT-x" in p.reason
    assert prof.host_info(root).kind == "VT-x"


def test_profile_amdv_is_native(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "svm npt")
    assert prof.detect(env={}, root=root).name == "native"
    assert prof.host_info(root).kind == "AMD-V"


def no_nested() -> str:
    return "QEMU is not installed"


def test_profile_pvm_module_is_compat(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "vmx", pvm=True)
    p = prof.detect(env={}, root=root, nested_unavailable=no_nested)
    assert p.name == "compat" and "kvm_pvm" in p.reason and "QEMU is not installed" in p.reason
    assert p.extra_args == prof.COMPAT_ARGS


def test_profile_kvm_without_vmx_svm_is_compat(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "avx2")
    p = prof.detect(env={}, root=root, nested_unavailable=no_nested)
    assert p.name == "compat" and "no vmx/svm" in p.reason


def test_profile_emulating_kvm_prefers_nested(tmp_path: Path) -> None:
    for root in (fake_root(tmp_path / "a", "vmx", pvm=True), fake_root(tmp_path / "b", "avx2")):
        p = prof.detect(env={}, root=root, nested_unavailable=lambda: None)
        assert p.name == "nested" and p.nested and not p.compat
        assert p.extra_args == () and p.vmm_args == ()  # the guests boot as on real hardware


def test_profile_no_kvm_no_flags(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "avx2", kvm=False)
    assert prof.host_info(root).kind == "unknown"
    assert prof.detect(env={}, root=root, nested_unavailable=no_nested).name == "native"
    assert prof.detect(env={}, root=root, nested_unavailable=lambda: None).name == "nested"
    # Real hardware never goes nested, whatever QEMU offers.
    vtx = fake_root(tmp_path / "vtx", "vmx ept")
    assert prof.detect(env={}, root=vtx, nested_unavailable=lambda: None).name == "native"


def test_profile_forced_by_env(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "vmx")
    assert prof.detect(env={"SMOLVM_PROFILE": "compat"}, root=root).name == "compat"
    assert prof.detect(env={"SMOLVM_PROFILE": "native"}, root=root).extra_args == ()
    with pytest.raises(ValueError, match="compat"):
        prof.detect(env={"SMOLVM_PROFILE": "fast"}, root=root)


def test_kernel_cmdline(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "avx2")
    compat = prof.detect(env={}, root=root, nested_unavailable=no_nested)
    line = prof.kernel_cmdline(compat, env={"SMOLVM_CMDLINE_EXTRA": "quiet loglevel=3"}, root=root)
    words = line.split()
    assert words[: len(prof.BASE_ARGS)] == list(prof.BASE_ARGS)
    assert "lpj=24454060" in words
    assert "smolvm_compat" in words and "noxsave" not in words
    assert compat.vmm_args == ("--xstate-port",)
    assert words[-2:] == ["quiet", "loglevel=3"]
    clear = next(w for w in words if w.startswith("clearcpuid="))
    assert len(clear) < 128, "the kernel ignores clearcpuid= past ~128 characters"
    for feature in ("smap", "smep", "cx16", "popcnt"):
        assert feature in clear.split("=", 1)[1].split(",")
    native = prof.detect(env={"SMOLVM_PROFILE": "native"}, root=root)
    assert "clearcpuid" not in prof.kernel_cmdline(native, env={}, root=root)


def test_cpu_flags_parsing() -> None:
    assert prof.cpu_flags("flags\t: a b c\nflags\t: d\n") == {"a", "b", "c"}
    assert prof.cpu_flags("nothing here") == set()
    assert prof.cpu_mhz("cpu MHz\t: 1000.5\n") == 1000.5
    assert prof.cpu_mhz("cpu MHz\t: ?\n") is None


# ---- errors and process helpers ---------------------------------------------------------


def test_error_hierarchy() -> None:
    for cls in (smolvm.KVMUnavailableError, smolvm.VMStartError, smolvm.VMGoneError,
                smolvm.VMNotRunningError, smolvm.AgentError):  # fmt: skip
        assert issubclass(cls, smolvm.SmolVMError)
    e = smolvm.VMGoneError("gone", exit_reason="reset", console_tail="tail")
    assert e.exit_reason == "reset" and e.console_tail == "tail"


def test_check_kvm_messages(tmp_path: Path) -> None:
    with pytest.raises(smolvm.KVMUnavailableError, match="modprobe kvm_intel"):
        check_kvm(str(tmp_path / "no-kvm"))
    if os.geteuid() != 0:  # root opens anything
        locked = tmp_path / "kvm"
        locked.write_text("")
        locked.chmod(0)
        with pytest.raises(smolvm.KVMUnavailableError, match="usermod -aG kvm"):
            check_kvm(str(locked))


def test_process_helpers(tmp_path: Path) -> None:
    assert parse_exit_line(b"EXIT reset guest requested a reset\n") == ("reset", "guest requested a reset")
    assert parse_exit_line(b"EXIT shutdown\n") == ("shutdown", "")
    assert parse_exit_line(b"READY\n") is None
    assert describe_status(9) == "was killed by SIGKILL (9)"
    assert describe_status(3 << 8) == "exited with status 3"
    assert "elsewhere" in describe_status(None)
    log = tmp_path / "console.log"
    log.write_bytes(b"".join(b"line %d\r\n" % i for i in range(100)) + b"\xff end")
    out = tail(log, lines=3)
    assert out == "line 98\nline 99\n\ufffd end"
    assert tail(tmp_path / "missing") == ""


# ---- package, doctor and CLI ------------------------------------------------------------


def test_import_needs_no_kvm() -> None:
    code = "import smolvm, sys; assert 'smolvm._smolvm' not in sys.modules; print(smolvm.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == smolvm.__version__


def test_package_data_found() -> None:
    from smolvm._paths import data_dir

    for name in ("kernel-config", "csrc", "guest"):
        assert data_dir(name).is_dir()
    assert (data_dir("kernel-config") / "smolvm.config").is_file()
    assert (data_dir("csrc") / "proto.h").is_file()
    assert (Path(smolvm.__file__).parent / "py.typed").is_file()


def run_cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smolvm", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def test_doctor_json(smolvm_env: dict[str, str], tmp_path: Path) -> None:
    out = run_cli(smolvm_env, tmp_path, "doctor", "--json")
    rep = json.loads(out.stdout)
    assert out.returncode == (0 if rep["ok"] else 1)
    assert rep["profile"]["name"] == prof.detect().name
    assert rep["host"]["kind"] == prof.host_info().kind
    assert rep["kvm"]["present"] == Path("/dev/kvm").exists()
    for kind in ("kernel", "agent", "initramfs"):
        assert "built" in rep["cache"][kind]
    from smolvm.build.image import list_images

    assert sorted(im["name"] for im in rep["cache"]["images"]) == list_images()
    assert "path" in rep["home"] and rep["home"]["bytes"] >= 0
    if rep["kvm"].get("usable"):
        assert rep["kvm"]["info"]["api_version"] == 12


def test_doctor_text(smolvm_env: dict[str, str], tmp_path: Path) -> None:
    out = run_cli(smolvm_env, tmp_path, "doctor")
    assert "profile" in out.stdout and "/dev/kvm" in out.stdout and "SMOLVM_HOME" in out.stdout
    assert prof.detect().name in out.stdout


def test_cli_run_usage(smolvm_env: dict[str, str], tmp_path: Path) -> None:
    out = run_cli(smolvm_env, tmp_path, "run")
    assert out.returncode == 2 and "--" in out.stderr
    out = run_cli(smolvm_env, tmp_path, "run", "--memory", "1", "--", "true")
    assert out.returncode == 125 and "memory" in out.stderr

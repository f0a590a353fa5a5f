"""Argument checks for SmolVM and SmolVM.run, with messages that say what is allowed."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MEMORY_MIN_MIB = 64
MEMORY_MAX_MIB = 65536
VCPUS_MIN = 1
VCPUS_MAX = 16
TIMEOUT_MAX_S = 7 * 24 * 3600  # the host deadline (timeout + grace) must fit a C int of ms
DEFAULT_BOOT_TIMEOUT_S = 600.0  # a boot takes minutes on hosts whose KVM emulates ring 0


def _int_in(name: str, value: Any, lo: int, hi: int, unit: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}{unit}, got {value}")
    return value


def memory_mib(value: Any) -> int:
    return _int_in("memory", value, MEMORY_MIN_MIB, MEMORY_MAX_MIB, " MiB")


def vcpus(value: Any) -> int:
    return _int_in("vcpus", value, VCPUS_MIN, VCPUS_MAX)


def seconds(name: str, value: Any, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    secs = float(value)
    if math.isnan(secs) or secs <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {secs}")
    if secs > maximum:
        raise ValueError(f"{name} must be at most {maximum:.0f} seconds, got {secs}")
    return secs


def timeout_ms(value: Any) -> int:
    return max(1, math.ceil(seconds("timeout", value, TIMEOUT_MAX_S) * 1000))


def boot_timeout(value: Any) -> float:
    if value is None:
        env = os.environ.get("SMOLVM_BOOT_TIMEOUT", "").strip()
        if not env:
            return DEFAULT_BOOT_TIMEOUT_S
        try:
            value = float(env)
        except ValueError:
            raise ValueError(f"SMOLVM_BOOT_TIMEOUT={env!r} is not a number of seconds") from None
    return seconds("boot_timeout", value, TIMEOUT_MAX_S)


def optional_file(name: str, value: Any) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), not {type(value).__name__}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{name} file not found: {path}")
    return path.resolve()


def _no_nul(name: str, value: str) -> str:
    if "\0" in value:
        raise ValueError(f"{name} must not contain NUL characters")
    return value


def command(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"command must be a str (a shell command line run by /bin/sh -c), not {type(value).__name__}"
        )
    if not value.strip():
        raise ValueError("command must not be empty")
    return _no_nul("command", value)


def env(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise TypeError(f"env must be a mapping of str to str, not {type(value).__name__}")
    out = []
    for key, val in value.items():
        if not isinstance(key, str) or not isinstance(val, str):
            raise TypeError(f"env keys and values must be str, got {key!r}: {val!r}")
        if not key or "=" in key:
            raise ValueError(f"env key {key!r} is not a valid variable name (empty or contains '=')")
        out.append(_no_nul("env", f"{key}={val}"))
    return out


def cwd(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"cwd must be a str, not {type(value).__name__}")
    if not value.startswith("/"):
        raise ValueError(f"cwd must be an absolute path inside the guest, got {value!r}")
    return _no_nul("cwd", value)


DISK_MIN_MIB = 16
DISK_MAX_MIB = 1 << 20  # 1 TiB: the scratch file is sparse, only what the guest writes uses space


def disk_size_mib(value: Any) -> int:
    return _int_in("disk_size", value, DISK_MIN_MIB, DISK_MAX_MIB, " MiB")


def guest_path(value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"guest path must be a str, not {type(value).__name__}")
    if not value.startswith("/"):
        raise ValueError(f"guest path must be absolute (start with '/'), got {value!r}")
    if value.rstrip("/") == "":
        raise ValueError("guest path must name a file, not '/'")
    return _no_nul("guest path", value)


def local_path(value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"local path must be a str or os.PathLike, not {type(value).__name__}")
    return Path(value).expanduser()

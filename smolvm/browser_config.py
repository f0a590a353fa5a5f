"""BrowserSessionConfig: what a BrowserSession runs (mode, viewport, profile, limits), checked on creation."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import _validate
from .errors import SmolVMError

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
MODES = ("headless", "live")
PROFILE_MODES = ("ephemeral", "persistent")
BROWSERS = ("chromium",)
VIEWPORT_MIN = (640, 480)
VIEWPORT_MAX = (7680, 4320)
TIMEOUT_MINUTES = (1, 240)
MEM_MIB = (512, 16384)
DISK_MIB = (2048, 16384)
DEFAULT_VIEWPORT = (1280, 720)


class BrowserConfigError(SmolVMError, ValueError):
    """A BrowserSessionConfig field is out of range or contradicts another one."""


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise BrowserConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return str(value)


def _int(name: str, value: Any, lo: int, hi: int, unit: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BrowserConfigError(f"{name} must be an int, not {type(value).__name__} ({value!r})")
    if not lo <= value <= hi:
        raise BrowserConfigError(f"{name} must be between {lo} and {hi}{unit}, got {value}")
    return value


def _ident(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BrowserConfigError(f"{name} must be a string, not {type(value).__name__}")
    value = value.strip()
    if not value:
        return None
    if not ID_RE.match(value):
        raise BrowserConfigError(
            f"{name} must be 1-63 letters, digits, '_' or '-' starting with a letter or digit, got {value!r}"
        )
    return value


@dataclass(frozen=True)
class BrowserSessionConfig:
    """How a BrowserSession's browser runs. Every field is checked when the config is made.

    >>> BrowserSessionConfig(mode="live", record_video=True, viewport={"width": 1440, "height": 900})

    - mode: "headless" (no display) or "live" (Chromium on a virtual display that
      `live_url` shows through noVNC). record_video (ffmpeg, into the artifacts) needs "live".
    - profile_mode: "ephemeral" (a fresh profile per session, gone with it) or "persistent"
      (kept on the host under profile_id and brought back by later sessions).
    - viewport / viewport_width, viewport_height: the page size, 640x480 to 7680x4320.
    - timeout_minutes: 1-240; the session stops itself after it.
    - mem_size_mib / disk_size_mib: the VM's memory and writable disk.
    - env_vars: variables for commands run with session.vm.run().
    - internet_settings: kept for the network issue's policy (stored; not yet enforced here).
    """

    session_id: str | None = None
    browser: str = "chromium"
    mode: str = "headless"
    profile_mode: str = "ephemeral"
    profile_id: str | None = None
    timeout_minutes: int = 30
    viewport_width: int = DEFAULT_VIEWPORT[0]
    viewport_height: int = DEFAULT_VIEWPORT[1]
    viewport: Mapping[str, int] | None = None
    record_video: bool = False
    allow_downloads: bool = True
    env_vars: Mapping[str, str] = field(default_factory=dict)
    mem_size_mib: int = 2048
    disk_size_mib: int = 4096
    internet_settings: Any = None

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalised values are set once, here
        put(self, "session_id", _ident("session_id", self.session_id))
        put(self, "profile_id", _ident("profile_id", self.profile_id))
        _choice("browser", self.browser, BROWSERS)
        _choice("mode", self.mode, MODES)
        _choice("profile_mode", self.profile_mode, PROFILE_MODES)
        width, height = self._resolve_viewport()
        put(self, "viewport_width", width)
        put(self, "viewport_height", height)
        put(self, "viewport", {"width": width, "height": height})
        _int("timeout_minutes", self.timeout_minutes, *TIMEOUT_MINUTES, " minutes")
        _int("mem_size_mib", self.mem_size_mib, *MEM_MIB, " MiB")
        _int("disk_size_mib", self.disk_size_mib, *DISK_MIB, " MiB")
        for name in ("record_video", "allow_downloads"):
            if not isinstance(getattr(self, name), bool):
                raise BrowserConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.record_video and self.mode != "live":
            raise BrowserConfigError(
                "record_video=True records the live display: use mode='live' with it "
                "(headless Chromium has no display to record)"
            )
        if self.profile_mode == "persistent" and self.profile_id is None:
            raise BrowserConfigError(
                "profile_mode='persistent' needs a profile_id naming the profile to keep, "
                "e.g. BrowserSessionConfig(profile_mode='persistent', profile_id='work')"
            )
        if self.profile_mode == "ephemeral" and self.profile_id is not None:
            raise BrowserConfigError(
                "profile_id names a kept profile: use it with profile_mode='persistent'"
            )
        if not isinstance(self.env_vars, Mapping):
            raise BrowserConfigError(f"env_vars must be a mapping of str to str, not {type(self.env_vars).__name__}")
        try:
            _validate.env(dict(self.env_vars))
        except (TypeError, ValueError) as e:
            raise BrowserConfigError(f"env_vars: {e}") from None
        put(self, "env_vars", dict(self.env_vars))

    def _resolve_viewport(self) -> tuple[int, int]:
        width, height = self.viewport_width, self.viewport_height
        vp = self.viewport
        if vp is not None:
            if hasattr(vp, "width") and hasattr(vp, "height") and not isinstance(vp, Mapping):
                vp = {"width": vp.width, "height": vp.height}  # a BrowserViewport-like object
            if not isinstance(vp, Mapping) or set(vp) - {"width", "height"}:
                raise BrowserConfigError(
                    f"viewport must be a mapping {{'width': W, 'height': H}}, got {self.viewport!r}"
                )
            given_w, given_h = vp.get("width", width), vp.get("height", height)
            for name, own, given, default in (
                ("width", width, given_w, DEFAULT_VIEWPORT[0]),
                ("height", height, given_h, DEFAULT_VIEWPORT[1]),
            ):
                if own != default and own != given:
                    raise BrowserConfigError(
                        f"viewport[{name!r}]={given!r} contradicts viewport_{name}={own!r}: give one of them"
                    )
            width, height = given_w, given_h
        _int("viewport width", width, VIEWPORT_MIN[0], VIEWPORT_MAX[0], " pixels")
        _int("viewport height", height, VIEWPORT_MIN[1], VIEWPORT_MAX[1], " pixels")
        return width, height

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["viewport"] = dict(self.viewport or {})
        d["env_vars"] = dict(self.env_vars)
        if self.internet_settings is not None and not isinstance(self.internet_settings, (dict, list, str)):
            d["internet_settings"] = repr(self.internet_settings)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BrowserSessionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in d.items() if k in known}
        data.pop("viewport", None)  # viewport_width/height carry it
        return cls(**data)

    def replace(self, **changes: Any) -> BrowserSessionConfig:
        """A copy with some fields changed (the viewport from viewport_width/height unless given)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["viewport"] = None
        data.update(changes)
        return BrowserSessionConfig(**data)


def parse_viewport(text: str) -> dict[str, int]:
    """'1440x900' -> {'width': 1440, 'height': 900} (for the CLI)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise BrowserConfigError(f"viewport must look like WIDTHxHEIGHT (e.g. 1440x900), got {text!r}")
    return {"width": int(m[1]), "height": int(m[2])}

"""RunResult: what one command run inside a VM gave back."""

from __future__ import annotations

import html
from dataclasses import dataclass, field


def _short(text: str, limit: int = 60) -> str:
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"...(+{len(text) - limit} chars)"


@dataclass(frozen=True)
class RunResult:
    """Exit status and output of one command.

    `stdout`/`stderr` are decoded as UTF-8 with undecodable bytes replaced
    (U+FFFD); the exact bytes are in `stdout_bytes`/`stderr_bytes`.
    A command stopped by its timeout has `timed_out=True` and exit code 124.
    """

    exit_code: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False
    signal: int = 0
    stdout_bytes: bytes = field(default=b"", repr=False, compare=False)
    stderr_bytes: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def from_bytes(
        cls,
        exit_code: int,
        stdout: bytes,
        stderr: bytes,
        duration: float,
        *,
        timed_out: bool = False,
        signal: int = 0,
    ) -> RunResult:
        return cls(
            exit_code=exit_code,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            duration=duration,
            timed_out=timed_out,
            signal=signal,
            stdout_bytes=stdout,
            stderr_bytes=stderr,
        )

    @property
    def ok(self) -> bool:
        """True when the command exited 0 within its timeout."""
        return self.exit_code == 0 and not self.timed_out

    @property
    def output(self) -> str:
        """stdout with surrounding whitespace stripped."""
        return self.stdout.strip()

    def __repr__(self) -> str:
        parts = [f"exit_code={self.exit_code}", f"ok={self.ok}"]
        if self.timed_out:
            parts.append("timed_out=True")
        if self.signal:
            parts.append(f"signal={self.signal}")
        parts.append(f"duration={self.duration:.3f}s")
        parts.append(f"stdout={_short(self.stdout)}")
        parts.append(f"stderr={_short(self.stderr)}")
        return "RunResult(" + ", ".join(parts) + ")"

    def _repr_html_(self) -> str:
        """Jupyter: the exit status and both streams (each cut to its last 20,000 characters)."""
        color = "green" if self.ok else "#b00"
        status = f"exit code {self.exit_code}" + (", timed out" if self.timed_out else "")
        parts = [f"<div><b style='color:{color}'>{html.escape(status)}</b> in {self.duration:.3f} s</div>"]
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text:
                shown = text if len(text) <= 20_000 else "…" + text[-20_000:]
                parts.append(f"<div>{name}</div><pre style='margin:0'>{html.escape(shown)}</pre>")
        return "".join(parts)

"""What every `smolvm` subcommand shares: exit codes, error lines, JSON and table output, parser wiring."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..vm import SmolVM

EXIT_SMOLVM_ERROR = 125  # like `docker run`: the sandbox failed, not the command
EXIT_NOT_FOUND = 1  # unknown VM id or snapshot name
EXIT_USAGE = 2  # as argparse
EXIT_TIMED_OUT = 124  # as timeout(1)

Command = Callable[[argparse.Namespace], int]


def fail(msg: str, code: int, prefix: str = "smolvm: error") -> int:
    """Print `prefix: msg` on stderr and return code, the command's exit status."""
    print(f"{prefix}: {msg}", file=sys.stderr)
    return code


def print_json(obj: Any, indent: int | None = 2) -> None:
    print(json.dumps(obj, indent=indent))


def listed(as_json: bool, key: str, items: list[Any], empty: str) -> bool:
    """Print {key: items} as JSON, or the line empty when there are no items; False: print the table."""
    if as_json:
        print_json({key: items})
    elif not items:
        print(empty)
    return as_json or not items


def add_command(
    sub: Any, name: str, func: Command, help: str, *, json_help: str | None = None, **kw: Any
) -> argparse.ArgumentParser:
    """The subparser `name` that runs func; with json_help it takes `--json` (machine-readable output)."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, **kw)
    if json_help is not None:
        p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=func)
    return p


def on_vm(
    vm_id: str,
    action: Callable[[SmolVM], int],
    *,
    prefix: str = "smolvm: error",
    not_found: int = EXIT_NOT_FOUND,
    failed: int = EXIT_SMOLVM_ERROR,
    errors: tuple[type[Exception], ...] = (),
) -> int:
    """Attach to the running VM vm_id, return action(vm) and detach.

    An unknown id exits not_found; a SmolVMError (or one of errors) from action exits failed;
    both print `prefix: message`.
    """
    from ..errors import SmolVMError, VMNotFoundError
    from ..vm import SmolVM

    try:
        vm = SmolVM.from_id(vm_id)
    except VMNotFoundError as e:
        return fail(str(e), not_found, prefix)
    caught: tuple[type[Exception], ...] = (SmolVMError, *errors)
    try:
        return action(vm)
    except caught as e:
        return fail(str(e), failed, prefix)
    finally:
        vm.close()


def age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(rows: list[list[str]]) -> None:
    """Print rows (the first is the header) as left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def command_words(words: Sequence[str]) -> str | None:
    """The shell command from `-- CMD...`: one word is used as is, several are quoted and joined."""
    words = list(words)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        return None
    return words[0] if len(words) == 1 else shlex.join(words)


def du(path: Path) -> int:
    """Bytes allocated on disk below path."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"

"""The `smolvm` command: main() and the parser; each subcommand lives in its own module here.

doctor.py (doctor, build), vms.py (run, ls, exec, rm), shell.py, image.py, browser.py, port.py,
ray_node.py, host.py, snapshot.py; _common.py holds what they share (exit codes, error
lines, JSON and table output, `add_command`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from . import browser, doctor, host, image, mcp, port, ray_node, shell, snapshot, vms
from ._common import EXIT_NOT_FOUND, EXIT_SMOLVM_ERROR, EXIT_TIMED_OUT, EXIT_USAGE
from .doctor import doctor_report

__all__ = [
    "EXIT_NOT_FOUND", "EXIT_SMOLVM_ERROR", "EXIT_TIMED_OUT", "EXIT_USAGE",
    "build_parser", "doctor_report", "main",
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smolvm", description="Run shell commands in KVM microVMs.")
    p.add_argument("--version", action="version", version=f"smolvm {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    for module in (doctor, vms, shell, image, browser, port, ray_node, host, snapshot, mcp):  # the order of `smolvm -h`
        module.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("smolvm: interrupted", file=sys.stderr)
        return 130

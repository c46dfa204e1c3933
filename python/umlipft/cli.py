"""The ``umlipft`` command: a thin layer over the library API.

Each stage owns a ``cli`` module with ``register(subparsers)``; those modules import nothing
heavy at import time so that ``umlipft --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from . import __version__
from .errors import UmlipftError

# Order is the order of `umlipft --help`: the study's loop, then analysis and workflows.
_STAGE_MODULES: tuple[str, ...] = (
    "umlipft.models.cli",
    "umlipft.build.cli",
    "umlipft.md.cli",
    "umlipft.extract.cli",
    "umlipft.label.cli",
    "umlipft.finetune.cli",
    "umlipft.evaluate.cli",
    "umlipft.analysis.cli",
    "umlipft.report.cli",
    "umlipft.workflows.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umlipft",
        description="Fine-tune universal MACE potentials and run long LAMMPS MD with them.",
    )
    parser.add_argument("--version", action="version", version=f"umlipft {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _STAGE_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UmlipftError as err:
        if not getattr(err, "quiet", False):  # MPI ranks other than 0 repeat rank 0's error
            print(f"umlipft {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 1)
    except OSError as err:
        # A file operation no driver anticipated (unwritable, full disk, vanished): a message
        # naming the path, not a traceback. Programming errors are not OSErrors and still trace.
        from .io import os_error_reason

        where = f"cannot use {err.filename}: " if err.filename else ""
        print(f"umlipft {args.command}: error: {where}{os_error_reason(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"umlipft {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

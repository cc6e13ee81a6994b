"""``aam-fast`` / ``python -m aam_fast``: one subcommand family per stage module, and the one error boundary.

Each stage module exposes ``add_parser(subparsers)``, which registers its subcommands and sets ``func`` (taking the
parsed ``argparse.Namespace``, returning an exit code) with ``set_defaults``. To add a stage, append its module to
:data:`STAGE_MODULES`; a module listed there that is not present in this installation is skipped. Whatever a command
ends in becomes one line ``aam-fast COMMAND: error: ...`` on stderr (each rank its own under torchrun) and an exit
code, as :func:`aam_fast.errors.describe_failure` says: 2 for bad input, 1 for everything else; ``--debug`` (before
or after the command) raises it with its traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .errors import describe_failure
from .training.config import Parser

STAGE_MODULES = (
    "aam_fast.stages.rm.cli",  # train-rm, eval-rm
    "aam_fast.stages.rm.demo",  # demo
    "aam_fast.stages.grpo.cli",  # train-grpo
    "aam_fast.stages.grpo.demo",  # demo-grpo
)
DEBUG_HELP = "on a failure, show the full traceback instead of one error line (default: off)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="aam-fast", description="Act-Adaptive-Margin reward models and GRPO on fused log-prob kernels."
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):  # not installed
                continue
            raise
        register = getattr(module, "add_parser", None)
        if register is None:
            print(f"aam-fast: {name} defines no add_parser(subparsers); its commands are unavailable", file=sys.stderr)
            continue
        register(subparsers)
    for command in subparsers.choices.values():  # also after the command; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # the one boundary: one line naming what failed, the traceback only with --debug
        if args.debug:
            raise
        code, message = describe_failure(exc)
        rank = os.environ.get("RANK", "?") if os.environ.get("WORLD_SIZE", "1") != "1" else None
        rank = f" (rank {rank})" if rank else ""
        print(f"aam-fast {args.command}{rank}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())

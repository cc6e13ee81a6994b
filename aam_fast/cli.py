"""``aam-fast`` / ``python -m aam_fast``: one subcommand family per stage module.

Each stage module exposes ``add_parser(subparsers)``, which registers its subcommands and sets ``func`` (taking the
parsed ``argparse.Namespace``, returning an exit code) with ``set_defaults``. To add a stage, append its module to
:data:`STAGE_MODULES`; a module listed there that is not present in this installation is skipped. A ``ValueError``
from a command (bad data, bad flags) is printed as one error line with exit code 2; a run stopped by a non-finite
loss or gradient (:class:`~aam_fast.training.TrainingDiverged`) as one line with exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .training.runtime import TrainingDiverged

STAGE_MODULES = (
    "aam_fast.stages.rm.cli",  # train-rm, eval-rm
    "aam_fast.stages.rm.demo",  # demo
    "aam_fast.stages.grpo.cli",  # train-grpo
    "aam_fast.stages.grpo.demo",  # demo-grpo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aam-fast", description="Act-Adaptive-Margin reward models and GRPO on fused log-prob kernels."
    )
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:  # bad input (a data record, a flag combination): the message says what and where
        print(f"aam-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:  # nothing non-finite was applied or saved; the message names the step
        print(f"aam-fast {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""``aam-fast train-grpo``: flags generated from :class:`GRPOConfig` (every flag with its help and default)."""

from __future__ import annotations

import argparse
import sys

from ...training.config import add_config_command, config_from_args
from ...training.distributed import is_main_process
from .config import GRPOConfig
from .stats import summary_lines
from .trainer import train_grpo


def run_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(GRPOConfig, args)
    rows = train_grpo(cfg)
    if is_main_process():
        for line in summary_lines(rows, cfg.output):
            print(line, file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    """Register ``train-grpo``."""
    add_config_command(
        subparsers,
        "train-grpo",
        GRPOConfig,
        run_train,
        help="GRPO: train a policy against an AAM reward model and rule rewards",
        description="GRPO with group-relative advantages, the fused GRPO loss and exact resume.",
    )

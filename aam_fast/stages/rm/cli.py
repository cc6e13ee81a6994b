"""``aam-fast train-rm`` and ``aam-fast eval-rm``: flags generated from :class:`RMConfig` and :class:`EvalConfig`."""

from __future__ import annotations

import argparse
import json

from ...training.config import HelpFormatter, add_config_arguments, config_from_args
from .config import RMConfig
from .evaluate import EvalConfig, evaluate_folder, format_report
from .trainer import train_reward_model


def run_train(args: argparse.Namespace) -> int:
    train_reward_model(config_from_args(RMConfig, args))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvalConfig, args)
    report = evaluate_folder(cfg)
    if cfg.json:
        print(json.dumps(report))
    else:
        print(f"scored {report['scored']} of {report['data']}")
        print(format_report(report))
    return 0


def add_parser(subparsers) -> None:
    """Register ``train-rm`` and ``eval-rm``."""
    train = subparsers.add_parser(
        "train-rm",
        help="train an AAM reward model",
        description="Train a reward model with the Act-Adaptive Margin (or plain Bradley-Terry) loss.",
        formatter_class=HelpFormatter,
    )
    add_config_arguments(train, RMConfig)
    train.set_defaults(func=run_train)
    evaluate = subparsers.add_parser(
        "eval-rm",
        help="pairwise accuracy of a saved reward model",
        description="RewardBench-style pairwise accuracy (ties wrong) beside the length baseline.",
        formatter_class=HelpFormatter,
    )
    add_config_arguments(evaluate, EvalConfig)
    evaluate.set_defaults(func=run_eval)

"""``aam-fast train-rm`` and ``aam-fast eval-rm``: flags generated from :class:`RMConfig` and :class:`EvalConfig`."""

from __future__ import annotations

import argparse
import json

from ...training.config import add_config_command, config_from_args
from .compare import CompareConfig, format_markdown, run_compare
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


def run_compare_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(CompareConfig, args)
    report = run_compare(cfg)
    if cfg.json:
        print(json.dumps(report))
    else:
        print(format_markdown(report))
    return 0


def add_parser(subparsers) -> None:
    """Register ``train-rm``, ``eval-rm`` and ``compare``."""
    add_config_command(
        subparsers,
        "train-rm",
        RMConfig,
        run_train,
        help="train an AAM reward model",
        description="Train a reward model with the Act-Adaptive Margin (or plain Bradley-Terry) loss.",
    )
    add_config_command(
        subparsers,
        "eval-rm",
        EvalConfig,
        run_eval,
        help="pairwise accuracy of a saved reward model",
        description="RewardBench-style pairwise accuracy (ties wrong) beside the length baseline.",
    )
    add_config_command(
        subparsers,
        "compare",
        CompareConfig,
        run_compare_command,
        help="train bt, pr, ld (and beta/gamma sweeps) on one cached trunk and compare held-out accuracy",
        description="Train reward-model variants side by side (same initial weights, data order and seed; the frozen "
        "trunk below --trainable-layers computed once for every training and eval sequence) and report each eval "
        "set's accuracy with bootstrap 95%% intervals, the paired difference against bt with its paired-bootstrap "
        "interval and an exact McNemar p-value, and each variant's AAM margin size. Writes OUTPUT/<variant>/ (as "
        "train-rm), OUTPUT/compare.json, compare.md and (with matplotlib) compare.png.",
    )

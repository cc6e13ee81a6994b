"""``aam-fast compare``: bt, fixed, pr and ld (and beta/gamma sweeps) trained side by side on one cached trunk, every
variant evaluated on every eval set, with paired confidence intervals against bt.

The frozen trunk (all layers below ``--trainable-layers``) is run once over every training and eval sequence
(:mod:`.inputs`); each variant is then a train-rm run (:class:`VariantTrainer`, the train-rm trainer fed the
shared pairs and trunk) of the top layers and the score head, from the same initial weights (checked) in the same data
order, saved to ``OUTPUT/<variant>/`` exactly as train-rm saves, and scored on every eval set from the cached trunk.
The report (:mod:`.report`) goes to ``OUTPUT/compare.json``, ``compare.md`` and ``compare.png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ....modeling import RewardModel
from ....training.launch import closing, launch
from ....training.runtime import log
from ..config import RMConfig
from ..evaluate import pairwise_report, score_pairs
from ..setup import EncodedData
from ..trainer import RMTrainer
from .config import CompareConfig, Variant, expand_variants, variant_config
from .inputs import SharedInputs, prepare_inputs
from .report import build_report, write_outputs
from .stats import margin_summary


class VariantTrainer(RMTrainer):
    """train-rm's trainer for one variant, fed the shared encoded pairs and cached trunk instead of encoding the data
    and running the trunk itself. It also keeps every training pair's AAM margin and reward gap, and its final
    evaluation scores every eval set from the cached trunk (``scores[name] = (chosen, rejected)``)."""

    def __init__(self, cfg: RMConfig, shared: SharedInputs):
        self.shared = shared
        self.margin_values: list[torch.Tensor] = []
        self.gap_values: list[torch.Tensor] = []
        self.scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(cfg)

    def load_data(self) -> EncodedData:
        return EncodedData(self.shared.train, [], self.shared.stats, self.shared.train_fingerprint, "no dev pairs")

    def cache_trunk(self):
        return self.shared.train_cache

    def _micro_batch_loss(self, model: RewardModel, batch: dict[str, Any]):
        result, rewards = super()._micro_batch_loss(model, batch)
        self.margin_values.append(result.margin.float().cpu())
        self.gap_values.append(result.reward_gap.float().cpu())
        return result, rewards

    def evaluate(self) -> dict[str, Any] | None:
        """Score every eval set from its cached trunk; log and record each accuracy; the first set's report (the
        saved model's ``final_eval``), or None without eval sets."""
        first = None
        for eval_set in self.shared.eval_sets:
            chosen, rejected = score_pairs(
                self.model,
                eval_set.pairs,
                self.shared.pad_token_id,
                batch_size=self.cfg.eval_batch_size,
                device=self.device,
                autocast_dtype=self.amp_dtype,
                trunk=eval_set.cache,
            )
            self.scores[eval_set.name] = (chosen, rejected)
            report = pairwise_report(chosen, rejected, eval_set.pairs)
            prefix = f"eval/{eval_set.name}/"
            record = {"step": self.step, prefix + "accuracy": report["accuracy"]}
            record[prefix + "length_baseline"] = report["length_baseline"]
            record[prefix + "num_pairs"] = report["num_pairs"]
            self.writer.write(record)
            variant = Path(self.cfg.output).name
            log(f"{variant} step {self.step}: {eval_set.name} accuracy {report['accuracy']:.4f}")
            first = first or report
        return first

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of the weights this variant trains (its initial weights when called before :meth:`train`)."""
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def _check_same_start(name: str, state: dict[str, torch.Tensor], first: dict[str, torch.Tensor] | None) -> None:
    """RuntimeError unless every weight ``state`` shares with the first variant's initial weights is equal (a variant
    may train more, e.g. the LM head under ``--no-detach-margin`` for pr and ld only)."""
    if first is None:
        return
    common = state.keys() & first.keys()
    if not common or any(not torch.equal(state[k], first[k]) for k in common):
        raise RuntimeError(f"variant {name} does not start from the first variant's initial weights")


def train_variant(
    cfg: RMConfig, variant: Variant, shared: SharedInputs, first_state: dict[str, torch.Tensor] | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Train and save one variant; returns its result (summary, margin statistics, eval scores) and its initial
    weights."""
    trainer = VariantTrainer(cfg, shared)
    state = trainer.trainable_state()
    _check_same_start(variant.name, state, first_state)
    summary = trainer.run_to_end()
    result = {
        "variant": variant,
        "summary": summary,
        "margin": margin_summary(torch.cat(trainer.margin_values), torch.cat(trainer.gap_values)),
        "scores": trainer.scores,
    }
    return result, state


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run the comparison; returns the report (also written to ``OUTPUT/compare.json``, ``.md`` and ``.png``)."""
    started = time.time()
    run = launch(
        cfg, {"--model": cfg.model, "--data": cfg.data}, one_process="compare runs in one process (one cached trunk)"
    )
    try:
        with closing(run.ctx):
            variants = expand_variants(cfg)
            configs = [variant_config(cfg, v) for v in variants]
            shared = prepare_inputs(run, cfg, configs[0], needs_reference=any(c.needs_reference for c in configs))
            trunk_seconds = time.time() - started
            seconds = f"{trunk_seconds:.1f} s"
            log(f"cached the frozen trunk of every sequence in {seconds}; training {len(variants)} variants")
            results, first_state = [], None
            for variant, variant_cfg in zip(variants, configs, strict=True):
                result, state = train_variant(variant_cfg, variant, shared, first_state)
                first_state = first_state or state
                results.append(result)
            cost = {"prepare_seconds": round(trunk_seconds, 1), "total_seconds": round(time.time() - started, 1)}
            report = build_report(cfg, shared, results, cost)
            write_outputs(report, run.output)
    finally:
        run.release()  # the comparison folder's lock
    return report

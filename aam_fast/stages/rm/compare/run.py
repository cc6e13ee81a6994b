"""``aam-fast compare``: bt, fixed, pr and ld (and beta/gamma/SFT-weight sweeps) trained side by side, every variant
evaluated on every eval set, with paired confidence intervals against bt.

What the variants share is computed once (:mod:`.inputs`): the encoded pairs, the reference's log-probs and either
the frozen trunk's output of every sequence (``--trainable-layers`` without LoRA) or the one model that every variant
trains in turn (full fine-tuning or LoRA, :mod:`.shared_model`). Each variant is then a train-rm run
(:class:`VariantTrainer`, the train-rm trainer fed what is shared) from the same initial weights (checked by digest)
in the same data order, saved to ``OUTPUT/<variant>/`` exactly as train-rm saves, and scored on every eval set. The
report (:mod:`.report`) goes to ``OUTPUT/compare.json``, ``compare.md`` and ``compare.png``.
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
from .shared_model import combined_digest, trainable_digest
from .stats import margin_summary


class VariantTrainer(RMTrainer):
    """train-rm's trainer for one variant, fed the shared encoded pairs and either the cached trunk or the shared
    model (its initial weights put back) with the reference log-probs, instead of building them itself. It also keeps
    every training pair's AAM margin and reward gap, and its final evaluation scores every eval set
    (``scores[name] = (chosen, rejected)``)."""

    def __init__(self, cfg: RMConfig, shared: SharedInputs):
        self.shared = shared
        self.margin_values: list[torch.Tensor] = []
        self.gap_values: list[torch.Tensor] = []
        self.scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(cfg)

    def load_model(self) -> tuple[RewardModel, Any]:
        shared = self.shared.model
        if shared is None:
            return super().load_model()
        return shared.start(self.cfg), shared.tokenizer

    def build_reference(self) -> None:
        if self.shared.model is None:
            super().build_reference()
            return
        self.reference = None  # the steps read the log-probs computed once from the initial model
        self.reference_logps = self.shared.reference_logps if self.cfg.needs_reference else None

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


def _check_same_start(name: str, digest: dict[str, str], first: dict[str, str] | None) -> None:
    """RuntimeError unless every weight ``digest`` shares with the first variant's initial weights has the same
    digest (a variant may train more, e.g. the LM head under an SFT term or ``--no-detach-margin``)."""
    if first is None:
        return
    common = digest.keys() & first.keys()
    if not common or any(digest[k] != first[k] for k in common):
        raise RuntimeError(f"variant {name} does not start from the first variant's initial weights")


def train_variant(
    cfg: RMConfig, variant: Variant, shared: SharedInputs, first_digest: dict[str, str] | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Train and save one variant; returns its result (summary, margin statistics, eval scores) and the digest of
    its initial trainable weights."""
    trainer = VariantTrainer(cfg, shared)
    digest = trainable_digest(trainer.model)
    _check_same_start(variant.name, digest, first_digest)
    summary = trainer.run_to_end()
    result = {
        "variant": variant,
        "summary": summary,
        "margin": margin_summary(torch.cat(trainer.margin_values), torch.cat(trainer.gap_values)),
        "scores": trainer.scores,
        "initial_digest": combined_digest(digest, digest.keys() & (first_digest or digest).keys()),
    }
    return result, digest


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
            shared = prepare_inputs(run, cfg, configs)
            prepare_seconds = time.time() - started
            what = "cached the frozen trunk of every sequence" if cfg.caches_trunk else "prepared the shared model"
            log(f"{what} in {prepare_seconds:.1f} s; training {len(variants)} variants")
            results, first_digest = [], None
            for variant, variant_cfg in zip(variants, configs, strict=True):
                result, digest = train_variant(variant_cfg, variant, shared, first_digest)
                first_digest = first_digest or digest
                results.append(result)
            cost = {"prepare_seconds": round(prepare_seconds, 1), "total_seconds": round(time.time() - started, 1)}
            report = build_report(cfg, shared, results, cost)
            write_outputs(report, run.output)
    finally:
        run.release()  # the comparison folder's lock
    return report

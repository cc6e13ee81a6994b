"""End to end: a whole reward-model run of `aam-fast train-rm` against TRL's `RewardTrainer`, same model, data and
settings, each case in its own process (real tokens per second of the training steps, peak RSS, dev accuracy).

Cases: ``trl-bt`` (TRL's RewardTrainer, Bradley-Terry), ``trl-pr`` (the AAM-PR reward model a TRL user would write
without this project: a RewardTrainer subclass whose margin comes from materialised logits of the model and of a
frozen copy, bench.e2e.trl_pr), ``aam-bt``, ``aam-bt-packing``, ``aam-bt-packing-gc`` (with gradient checkpointing),
``aam-pr`` (its reference's log-probs precomputed before the first step, the default), ``aam-pr-perstep``
(``--no-precompute-ref-logps``: the frozen reference's forward in every step), ``aam-pr-packing-gc`` and ``aam-ld``
(`train-rm --margin ...`; LD needs no reference). The pairs are
hh-rlhf transcripts as TRL's conversational records, kept only where both responses fit ``--max-length`` tokens
through the model's chat template (TRL drops longer pairs, train-rm cuts their prompts: the filter gives both the
same pairs). Both full-fine-tune in float32 on the CPU (or ``--device cuda --dtype bfloat16``: autocast over float32
weights in both) with the same learning rate, batch size, steps, warmup and thread count,
on identical batches from the same initial model: the TRL cases take train-rm's batch order (its seeded
permutation, not TRL's sampler) and train-rm's initial score head (the same seeded draw of a random ``Linear(D, 1)``;
TRL's own draw differs, and after a few steps at 1e-5 the dev accuracy still mostly reflects that draw: 0.48 against
0.64 before any step on the 64 dev pairs of the default run). The losses of the first and last steps
(``first_loss``, ``last_loss``) show it: trl-bt's equal aam-bt's, trl-pr's aam-pr's. Dev accuracy is `eval-rm` on
the ``--dev-pairs`` pairs that follow the training pairs, for TRL's saved model too; the TRL cases also report TRL's
own ``trainer.evaluate()`` accuracy on them (``trl_eval_accuracy``). Tokens/s counts the attended tokens each trainer
reports (`num_tokens`) over the wall time of its training steps (from the first step's start); ``setup_seconds`` is
everything before that from the case process's start (library imports, data loading and tokenisation, model load,
trainer construction; the TRL cases' initial score head and batch order are drawn by the parent, outside it);
peak RSS is the process's high-water mark when the steps end (setup and training; the save and the evaluations
after it are left out).

``python -m bench.e2e.reward_model --model DIR [--pairs 256 --steps 32 --max-length 512] --json out.json
[--markdown out.md]``; DIR is SmolLM2-135M-Instruct as `make demo` converts it
(``$AAM_FAST_CACHE/smollm2-135m-instruct``). ``python -m bench.e2e.report out.json`` renders a JSON again.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .cases import add_run_arguments, peak_memory, run_case

STARTED = time.perf_counter()  # a case's setup is timed from here (its process's start) to its first step
CASES = (
    "trl-bt",
    "trl-pr",
    "aam-bt",
    "aam-bt-packing",
    "aam-bt-packing-gc",
    "aam-pr",
    "aam-pr-perstep",
    "aam-pr-packing-gc",
    "aam-ld",
)
SHARED = Path(__file__).resolve().parents[3] / "shared"
DEV_FRACTION = 0.2


def write_pairs(model: str, source: Path, count: int, max_length: int, out: Path) -> int:
    """The first ``count`` hh-rlhf pairs whose sequences both fit ``max_length``, as TRL conversational records."""
    from aam_fast.data import PairEncoder, load_preferences
    from aam_fast.modeling import load_tokenizer

    encoder = PairEncoder(load_tokenizer(model), max_length=10**6)
    kept = 0
    with out.open("w") as handle:
        for pair in load_preferences(source, skip_invalid=True).pairs:
            lengths = [len(encoder.encode_sequence(pair.prompt, r).ids) for r in (pair.chosen, pair.rejected)]
            if max(lengths) > max_length or not pair.chosen or not pair.rejected:
                continue
            prompt = pair.prompt if isinstance(pair.prompt, list) else [{"role": "user", "content": pair.prompt}]
            record = {"chosen": [*prompt, *_turns(pair.chosen)], "rejected": [*prompt, *_turns(pair.rejected)]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            kept += 1
            if kept == count:
                break
    return kept


def _turns(response) -> list[dict]:
    return response if isinstance(response, list) else [{"role": "assistant", "content": response}]


def rm_config(
    args,
    data: Path,
    output: Path,
    margin: str,
    packing: bool = False,
    checkpointing: bool = False,
    precompute: bool = True,
):
    """train-rm's settings of a case (also what the TRL cases take their initial score head from)."""
    from aam_fast.stages.rm.config import RMConfig

    return RMConfig(
        model=args.model,
        data=str(data),
        output=str(output),
        margin=margin,
        packing=packing,
        gradient_checkpointing=checkpointing,
        precompute_ref_logps=precompute,
        dev_fraction=0.0,
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_steps=args.steps,
        lr=args.lr,
        warmup_ratio=0.0,
        seed=args.seed,
        progress=False,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
    )


def train_order(pairs: int, batch_size: int, seed: int, steps: int) -> list[int]:
    """The pair indices train-rm visits in its first ``steps`` batches, in order (its seeded permutations)."""
    from aam_fast.stages.rm.setup import micro_batch_indices

    return [i for step in range(steps) for i in micro_batch_indices(pairs, batch_size, seed, step)[1]]


def initial_score(args):
    """The score head train-rm starts from with ``--seed`` (seeded as train-rm seeds, then its model is built).
    Drawn in the parent process: the TRL cases' setup does not pay for this extra model load."""
    import torch

    from aam_fast.stages.rm.setup import build_model
    from aam_fast.training.runtime import seed_everything

    seed_everything(args.seed)
    model, _ = build_model(rm_config(args, Path("unused"), Path("unused"), "bt"), torch.device("cpu"))
    return model.score.weight.detach().clone()


def run_trl(args, data: Path, dev: Path, output: Path, margin: str) -> dict:
    """TRL's RewardTrainer (``bt``) or the trl_pr baseline (``pr``) on train-rm's batches from train-rm's initial
    score head (``--trl-init``: ``{"score", "order"}`` from the parent); times the setup and the steps."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from .trl_pr import AAMPRRewardTrainer, response_spans

    class FirstStep(TrainerCallback):
        started: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = self.started or time.perf_counter()

    base = AAMPRRewardTrainer if margin == "pr" else RewardTrainer

    class SameBatches(base):
        """Batches in train-rm's order (TRL's shuffling sampler replaced)."""

        def _get_train_sampler(self, train_dataset=None):
            return order

    init = torch.load(args.trl_init)
    score, order = init["score"], init["order"]
    train = datasets.load_dataset("json", data_files=str(data), split="train")
    evaluation = datasets.load_dataset("json", data_files=str(dev), split="train")
    if margin == "pr":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        train, evaluation = response_spans(train, tokenizer), response_spans(evaluation, tokenizer)
    config = RewardConfig(
        output_dir=str(output),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8,  # eval-rm's batch
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=args.seed,
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        bf16=args.dtype == "bfloat16",  # TRL's defaults are bf16 autocast and gradient checkpointing: as train-rm runs
        gradient_checkpointing=False,
    )
    first = FirstStep()
    trainer = SameBatches(model=args.model, args=config, train_dataset=train, callbacks=[first])
    if len(trainer.train_dataset) != len(train):
        raise ValueError(f"TRL kept {len(trainer.train_dataset)} of the {len(train)} pairs: the batches would differ")
    with torch.no_grad():
        trainer.model.score.weight.copy_(score)
        if margin == "pr":
            trainer.ref_model.score.weight.copy_(score)
    trainer.train()
    ended = time.perf_counter()
    peak = peak_memory()  # the training's high-water mark, before saving and evaluating
    trainer.save_model(str(output))
    metrics = trainer.evaluate(eval_dataset=evaluation)
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    return {
        "setup": first.started - STARTED,
        "seconds": ended - first.started,
        "tokens": trainer._total_train_tokens,
        "peak": peak,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "trl_eval_accuracy": metrics["eval_accuracy"],
    }


def run_aam(args, data: Path, output: Path, margin: str, options: list[str]) -> dict:
    """train-rm's trainer with ``options`` from the case name: packing, gc (gradient checkpointing), perstep (the
    reference forward in every step instead of its log-probs precomputed)."""
    from aam_fast.stages.rm.trainer import RMTrainer

    packing, checkpointing, precompute = "packing" in options, "gc" in options, "perstep" not in options
    trainer = RMTrainer(rm_config(args, data, output, margin, packing, checkpointing, precompute))
    trainer.model.train()
    first = time.perf_counter()
    losses = []
    while trainer.step < trainer.total_steps:  # the training steps alone, as TRL's train() times them
        losses.append(trainer.train_step()["loss"])
    ended = time.perf_counter()
    peak = peak_memory()  # the training's high-water mark, before saving and evaluating
    trainer.export(None)
    trainer.ctx.close()
    return {
        "setup": first - STARTED,
        "seconds": ended - first,
        "tokens": trainer.num_tokens,
        "peak": peak,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    data, dev, output = Path(args.data), Path(args.dev), Path(args.output)
    trainer, margin, *rest = args.case.split("-")
    if trainer == "trl":
        result = run_trl(args, data, dev, output, margin)
    else:
        result = run_aam(args, data, output, margin, rest)
    from aam_fast.stages.rm.evaluate import EvalConfig, evaluate_folder

    report = evaluate_folder(EvalConfig(model=str(output), data=str(dev), progress=False, device=args.device))
    summary = {
        "case": args.case,
        "setup_seconds": round(result["setup"], 1),
        "seconds": round(result["seconds"], 1),
        "tokens": int(result["tokens"]),
        "tokens_per_s": round(result["tokens"] / result["seconds"], 1),
        **result["peak"],
        "first_loss": round(result["first_loss"], 6),
        "last_loss": round(result["last_loss"], 6),
        "dev_accuracy": report["accuracy"],
        "dev_pairs": report["num_pairs"],
    }
    if "trl_eval_accuracy" in result:
        summary["trl_eval_accuracy"] = result["trl_eval_accuracy"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="SmolLM2-135M-Instruct folder (make demo converts it)")
    parser.add_argument("--source", default=str(SHARED / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"))
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--dev-pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-5)
    add_run_arguments(parser)
    parser.add_argument("--json", default=None, help="write the settings and per-case results here")
    parser.add_argument("--markdown", default=None, help="write the report (bench.e2e.report) here")
    parser.add_argument("--case", choices=CASES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dev", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trl-init", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(child(args)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        both = Path(tmp) / "all.jsonl"
        kept = write_pairs(args.model, Path(args.source), args.pairs + args.dev_pairs, args.max_length, both)
        lines = both.read_text().splitlines(keepends=True)
        train, dev = Path(tmp) / "train.jsonl", Path(tmp) / "dev.jsonl"
        train.write_text("".join(lines[: args.pairs]))
        dev.write_text("".join(lines[args.pairs :]))
        trl_init = Path(tmp) / "trl-init.pt"
        if any(case.startswith("trl") for case in args.cases):
            import torch

            order = train_order(len(lines[: args.pairs]), args.batch_size, args.seed, args.steps)
            torch.save({"score": initial_score(args), "order": order}, trl_init)
        for case in args.cases:
            command = [sys.executable, "-m", "bench.e2e.reward_model", "--case", case, "--model", args.model]
            command += ["--data", str(train), "--dev", str(dev), "--output", str(Path(tmp) / case)]
            command += ["--trl-init", str(trl_init)]
            for name in ("steps", "batch_size", "max_length", "lr"):
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            results.append(run_case(case, command, args))
    summary = {"settings": {**vars(args), "pairs_kept": kept}, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.markdown:
        from .report import write_markdown

        write_markdown(summary, args.markdown)


if __name__ == "__main__":
    main()

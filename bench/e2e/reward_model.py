"""End to end: a whole reward-model run of `aam-fast train-rm` against TRL's `RewardTrainer`, same model, data and
settings, each case in its own process (real tokens per second of the training steps, peak RSS, dev accuracy).

Cases: ``trl-bt`` (TRL's RewardTrainer, Bradley-Terry), ``aam-bt``, ``aam-bt-packing``, ``aam-bt-packing-gc`` (with
gradient checkpointing), ``aam-pr`` and ``aam-ld`` (`train-rm --margin ...`; PR keeps a frozen reference, LD needs
none). The pairs are hh-rlhf transcripts as TRL's
conversational records, kept only where both responses fit ``--max-length`` tokens through the model's chat template
(TRL drops longer pairs, train-rm cuts their prompts: the filter gives both the same pairs). Both full-fine-tune in
float32 with the same learning rate, batch size, steps, warmup and thread count; dev accuracy is `eval-rm` on the
``--dev-pairs`` pairs that follow the training pairs, for TRL's saved model too. Tokens/s counts the attended tokens
each trainer reports (`num_tokens`) over the wall time of its training loop; peak RSS is the process's high-water
mark when that loop ends (model loading, tokenisation and training; the save and the evaluation after it are left
out).

``python -m bench.e2e.reward_model --model DIR [--pairs 256 --steps 32 --max-length 512] --json out.json``; DIR is
SmolLM2-135M-Instruct as `make demo` converts it (``$AAM_FAST_CACHE/smollm2-135m-instruct``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("trl-bt", "aam-bt", "aam-bt-packing", "aam-bt-packing-gc", "aam-pr", "aam-ld")
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


def run_trl(args, data: Path, output: Path) -> dict:
    import datasets
    from trl import RewardConfig, RewardTrainer

    train = datasets.load_dataset("json", data_files=str(data), split="train")
    config = RewardConfig(
        output_dir=str(output),
        per_device_train_batch_size=args.batch_size,
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
        use_cpu=True,
        dataloader_num_workers=0,
        bf16=False,  # TRL's defaults are bf16 autocast and gradient checkpointing: float32 without, as train-rm runs
        gradient_checkpointing=False,
    )
    trainer = RewardTrainer(model=args.model, args=config, train_dataset=train)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = _peak_rss_gib()  # the training's high-water mark, before saving and evaluating
    trainer.save_model(str(output))
    return {"seconds": seconds, "tokens": trainer._total_train_tokens, "peak": peak}


def run_aam(args, data: Path, output: Path, margin: str, packing: bool, checkpointing: bool) -> dict:
    from aam_fast.stages.rm.config import RMConfig
    from aam_fast.stages.rm.trainer import RMTrainer

    cfg = RMConfig(
        model=args.model,
        data=str(data),
        output=str(output),
        margin=margin,
        packing=packing,
        gradient_checkpointing=checkpointing,
        dev_fraction=0.0,
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_steps=args.steps,
        lr=args.lr,
        warmup_ratio=0.0,
        seed=args.seed,
        progress=False,
        threads=args.threads,
    )
    trainer = RMTrainer(cfg)
    trainer.model.train()
    started = time.perf_counter()
    while trainer.step < trainer.total_steps:  # the training steps alone, as TRL's train() times them
        trainer.train_step()
    seconds = time.perf_counter() - started
    peak = _peak_rss_gib()  # the training's high-water mark, before saving and evaluating
    trainer.export(None)
    trainer.ctx.close()
    return {"seconds": seconds, "tokens": trainer.num_tokens, "peak": peak}


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    data, output = Path(args.data), Path(args.output)
    if args.case == "trl-bt":
        result = run_trl(args, data, output)
    else:
        _, margin, *rest = args.case.split("-")
        result = run_aam(args, data, output, margin, packing="packing" in rest, checkpointing="gc" in rest)
    from aam_fast.stages.rm.evaluate import EvalConfig, evaluate_folder

    report = evaluate_folder(EvalConfig(model=str(output), data=args.dev, progress=False))
    return {
        "case": args.case,
        "seconds": round(result["seconds"], 1),
        "tokens": int(result["tokens"]),
        "tokens_per_s": round(result["tokens"] / result["seconds"], 1),
        "peak_rss_gib": round(result["peak"], 2),
        "dev_accuracy": report["accuracy"],
        "dev_pairs": report["num_pairs"],
    }


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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--case", choices=CASES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dev", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
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
        for case in args.cases:
            command = [sys.executable, "-m", "bench.e2e.reward_model", "--case", case, "--model", args.model]
            command += ["--data", str(train), "--dev", str(dev), "--output", str(Path(tmp) / case)]
            for name in ("steps", "batch_size", "max_length", "lr", "seed", "threads"):
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                results.append({"case": case, "error": done.stderr.strip().splitlines()[-3:]})
            else:
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr)
    summary = {"settings": {**vars(args), "pairs_kept": kept}, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

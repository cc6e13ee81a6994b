"""Tokens/s of GRPO's packed against its padded passes on CPU, on real rollouts.

stories260k (../shared/models/stories260k) samples completions for RPBench character cards
(../shared/data/rpbench-auto); the same rollouts are then scored padded and packed: the policy's forward-only
log-probs (old policy), the reference's, the loss forward + backward, and the reward model (a stories260k reward
model with a seeded random score head; its scoring batches are sorted by length, as eval-rm's). Each pass is timed
`--repeats` times, the fastest kept; tokens/s counts real (attended) tokens only. stories260k rarely ends a reply
within 64 tokens; `--stop-at-period` also ends each completion at its first ".", for completions of mixed lengths.

    python bench/grpo_packing_throughput.py [--micro-batches 4] [--batch-size 4] [--stop-at-period] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def fastest(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    from transformers import AutoTokenizer

    from aam_fast.modeling import RewardModel, RewardScorer, load_causal_lm, save_reward_model
    from aam_fast.stages.grpo import trainer as grpo_trainer
    from aam_fast.stages.grpo.config import GRPOConfig
    from aam_fast.stages.grpo.trainer import GRPOTrainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per micro-batch")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-length", type=int, default=1024)
    parser.add_argument("--rm-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stop-at-period", action="store_true", help="end completions at their first '.' too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = SHARED / "models" / "stories260k"
    if not model.is_dir():
        raise SystemExit(f"{model} not found: this measurement needs ../shared")

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_reward_model(RewardModel(load_causal_lm(model)), AutoTokenizer.from_pretrained(model), f"{tmp}/rm")
        cfg = GRPOConfig(
            policy=str(model),
            prompts=str(SHARED / "data" / "rpbench-auto" / "rpbench_character.jsonl"),
            reward_model=f"{tmp}/rm",
            output=f"{tmp}/run",
            num_generations=args.num_generations,
            max_new_tokens=args.max_new_tokens,
            max_prompt_length=args.max_prompt_length,
            batch_size=args.batch_size,
            grad_accum=args.micro_batches,
            beta=0.04,
            backend="torch",
            progress=False,
        )
        if args.stop_at_period:
            period = AutoTokenizer.from_pretrained(model).convert_tokens_to_ids(".")
            eos_token_ids = grpo_trainer.eos_token_ids
            grpo_trainer.eos_token_ids = lambda m, t: [*eos_token_ids(m, t), period]
        trainer = GRPOTrainer(cfg)
        batches, _ = trainer.make_rollout()
        for batch in batches:
            batch.advantages = torch.linspace(-1.0, 1.0, batch.targets.shape[0])
            batch.old_logps = None
        scorer = {p: RewardScorer(f"{tmp}/rm", batch_size=args.rm_batch_size, packing=p) for p in (False, True)}
        texts = [(p, c) for b in batches for p, c in zip(b.prompts, b.completions, strict=True)]
        rm_tokens = sum(len(scorer[False].encoder.encode_sequence(p, c).ids) for p, c in texts)
        rm_padded = 0
        lengths = sorted(len(scorer[False].encoder.encode_sequence(p, c).ids) for p, c in texts)
        for start in range(0, len(lengths), args.rm_batch_size):
            chunk = lengths[start : start + args.rm_batch_size]
            rm_padded += max(chunk) * len(chunk)

        real = sum(int(b.attention_mask.sum()) for b in batches)
        padded = sum(b.attention_mask.numel() for b in batches)
        completion = [int(n) for b in batches for n in b.mask.sum(1)]
        prompt = [int(n) for b in batches for n in b.attention_mask[:, : b.prompt_len].sum(1)]
        results = {
            "micro_batches": len(batches),
            "rows_per_micro_batch": batches[0].targets.shape[0],
            "prompt_tokens": [min(prompt), sum(prompt) / len(prompt), max(prompt)],
            "completion_tokens": [min(completion), sum(completion) / len(completion), max(completion)],
            "policy_real_tokens": real,
            "policy_padded_tokens": padded,
            "rm_real_tokens": rm_tokens,
            "rm_padded_tokens": rm_padded,
            "threads": args.threads,
            "stop_at_period": args.stop_at_period,
        }
        for packing in (False, True):
            trainer.cfg.packing = packing

            def logps(model):
                for batch in batches:
                    trainer._token_logprobs(model, batch)

            def loss():
                trainer.policy.zero_grad(set_to_none=True)
                trainer.accumulate_gradients(batches)

            def rewards(score=scorer[packing]):
                score([p for p, _ in texts], [c for _, c in texts])

            name = "packed" if packing else "padded"
            seconds = {
                "policy_logprobs": fastest(lambda: logps(trainer.policy), args.repeats),
                "reference_logprobs": fastest(lambda: logps(trainer.reference), args.repeats),
                "loss_forward_backward": fastest(loss, args.repeats),
                "reward_model": fastest(rewards, args.repeats),
            }
            results[name] = {
                key: {"seconds": round(s, 3), "tokens_per_s": round((rm_tokens if key == "reward_model" else real) / s)}
                for key, s in seconds.items()
            }
            total = sum(seconds.values())
            results[name]["all_passes_tokens_per_s"] = round((3 * real + rm_tokens) / total)
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Rollout generation alone, old against new in one process: ``generate`` on G copies of every prompt against the
shared-prefix loop (and its variants), round after round on the same prompts and seeds, the order of the methods
alternating, so that ratios hold on a machine others use. Optionally the forward-only log-prob pass of the rollout
(what the reference and old policy cost) with the whole rows against the shared-prefix one.

Per round: ``batch_size`` prompts from train-grpo's seeded prompt order (RPBench character cards by default, a few
hundred tokens each in SmolLM2's chat template, left-truncated to ``--max-prompt-length``), G completions each with
their row seeds, as a train-grpo micro-batch samples them. Reported: seconds per method summed over the timed rounds
(the first round warms up and is not counted), the median over rounds of each method's time over the first
method's, whether every method drew the same tokens as the first (on the CPU in float32 they must), and the prompt
and completion tokens.

``generate-static`` is ``generate`` on copies with a static KV cache (``cache_implementation="static"``), whose
decode step transformers compiles on CUDA: the number that says whether a static cache and a compiled decode step
would pay (on this CPU they do not: a static cache made a SmolLM2-135M decode step 2.5x slower, compiled 2.1x, after
a compile of minutes; attention then spans the whole reserved length).

``python -m bench.rollouts --policy DIR [--rounds 5 --methods generate shared-prefix --logprobs] [--json out.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


# The bench's flags that are train-grpo settings of the same name.
CONFIG_SETTINGS = ("num_generations", "max_new_tokens", "max_prompt_length", "temperature", "batch_size", "seed")


def settings(args):
    """``(GRPOConfig, policy, tokenizer, eos ids, generation config, prompt records)`` for the run."""
    import torch

    from aam_fast.data import load_prompts
    from aam_fast.stages.grpo import GRPOConfig
    from aam_fast.stages.grpo.policy import eos_token_ids, generation_config, load_policy

    shared = {name: getattr(args, name) for name in CONFIG_SETTINGS}
    cfg = GRPOConfig(policy=args.policy, prompts=args.prompts, reward_fns=["unused:unused"], **shared)
    policy, tokenizer = load_policy(args.policy, torch.device(args.device))
    eos = eos_token_ids(policy, tokenizer)
    records = load_prompts(args.prompts, scenes=args.scenes)
    return cfg, policy, tokenizer, eos, generation_config(cfg, tokenizer, eos), records


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), wall seconds)``, the device synchronised before the clock is read."""
    import torch

    started = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def alternate(names: list[str], round_index: int) -> list[str]:
    return names if round_index % 2 == 0 else names[::-1]


def run(args) -> dict:
    import torch

    from aam_fast.stages.grpo.rollout import PromptStream, generate_micro_batch
    from aam_fast.stages.grpo.sampling import completion_seed

    torch.set_num_threads(args.threads)
    cfg, policy, tokenizer, eos, generation, records = settings(args)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    static = copy.deepcopy(generation)
    static.cache_implementation = "static"  # generate compiles its decode step on CUDA with a static cache
    stream = PromptStream(records, args.seed)
    seconds = {name: [] for name in [*args.methods, *(LOGPROB_PASSES if args.logprobs else ())]}
    identical, prompt_tokens, completion_tokens = True, 0, 0
    for round_index in range(args.rounds + 1):
        batch_records = stream.take(args.batch_size)
        G = cfg.num_generations
        seeds = [completion_seed(args.seed, round_index, p, g) for p in range(args.batch_size) for g in range(G)]
        batches, spent = {}, {}
        for method in alternate(args.methods, round_index):
            config, how = (static, "generate") if method == "generate-static" else (generation, method)
            (batches[method], _, _), spent[method] = timed(
                generate_micro_batch, policy, tokenizer, batch_records, cfg, config, eos, dtype, seeds, method=how
            )
        first = batches[args.methods[0]]
        identical &= all(torch.equal(first.input_ids, b.input_ids) for b in batches.values())
        if args.logprobs:
            spent.update(time_logprob_passes(policy, first, G, args.device, dtype, round_index))
        if round_index:  # the first round warms up
            for name, value in spent.items():
                seconds[name].append(value)
            prompt_tokens += int(first.attention_mask[:, : first.prompt_len].sum()) // G
            completion_tokens += int(first.mask.sum())
    return summary(args, seconds, identical, prompt_tokens, completion_tokens)


LOGPROB_PASSES = ("logprobs-full", "logprobs-shared")


def time_logprob_passes(policy, batch, copies: int, device: str, dtype, round_index: int) -> dict[str, float]:
    """Seconds of the backbone pass that log-probs need: on the whole rows (``completion_hidden``) and with each
    prompt run once (``shared_prefix_hidden``)."""
    import torch

    from aam_fast.stages.grpo.generation import shared_prefix_hidden
    from aam_fast.stages.grpo.rollout import completion_hidden

    passes = {
        "logprobs-full": (completion_hidden, ()),
        "logprobs-shared": (shared_prefix_hidden, (copies,)),
    }
    spent = {}
    for name in alternate(list(passes), round_index):
        fn, extra = passes[name]
        with torch.no_grad(), torch.autocast(device, dtype, enabled=dtype != torch.float32):
            _, spent[name] = timed(fn, policy, batch.input_ids, batch.attention_mask, batch.prompt_len, *extra)
    return spent


def summary(args, seconds: dict, identical: bool, prompt_tokens: int, completion_tokens: int) -> dict:
    """Totals and median per-round ratios: each method to the first method, the shared log-prob pass to the full."""

    def ratio(name, base):
        return round(statistics.median(a / b for a, b in zip(seconds[name], seconds[base], strict=True)), 3)

    out = {
        "settings": vars(args),
        "seconds": {name: round(sum(values), 2) for name, values in seconds.items()},
        "seconds_per_round": {name: [round(v, 3) for v in values] for name, values in seconds.items()},
        "ratio_to_first_method": {name: ratio(name, args.methods[0]) for name in args.methods},
        "same_tokens": identical,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
    if args.logprobs:
        out["logprobs_shared_to_full"] = ratio("logprobs-shared", "logprobs-full")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--policy", required=True, help="a causal LM folder (SmolLM2-135M-Instruct as make demo converts it)"
    )
    parser.add_argument("--prompts", default=str(SHARED / "data" / "rpbench-auto" / "rpbench_character.jsonl"))
    parser.add_argument("--scenes", default=None, help="RPBench scene file (longer prompts)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=("generate", "shared-prefix", "generate-static"),
        default=["generate", "shared-prefix"],
        help="train-grpo's --generation methods; generate-static: generate with a static KV cache (on CUDA "
        "transformers compiles its decode step), to time what a static cache and a compiled decode would give",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one more warms up)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--logprobs", action="store_true", help="also time the forward-only log-prob passes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

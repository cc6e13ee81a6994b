"""End to end: a whole GRPO run of `aam-fast train-grpo` against TRL's `GRPOTrainer`, same policy, reward model,
prompts and settings, each case in its own process (seconds per step split into generation, scoring, log-probs and
update; peak RSS).

Cases: ``trl-grpo`` (TRL 1.16's GRPOTrainer, plain transformers ``generate``, no vLLM) and ``aam-grpo``
(:class:`aam_fast.stages.grpo.GRPOTrainer`, what ``aam-fast train-grpo`` runs, sampling with ``--generation``:
shared-prefix by default, generate on G copies as TRL does for comparison). Both full-fine-tune the policy in
float32 on the CPU (or ``--device cuda --dtype bfloat16``: autocast over float32 weights in both) with the same
thread count, ``--prompts-per-step`` prompts a step (one micro-batch, no gradient
accumulation), 4 completions per prompt of at most 64 new tokens (temperature 1, no top-p/top-k), one optimizer step
per rollout (``num_iterations`` 1, so neither computes old log-probs), KL coefficient 0.04 to a frozen reference
(TRL's default is 0, which loads no reference; both set it), TRL's default loss type ``dapo`` (token-mean over the
step's tokens; ours by that alias), group-scaled advantages, clip 0.2, a constant learning rate without warmup,
gradient clipping at 1, no weight decay, dropout off, no gradient checkpointing.

Reward model: one sequence-classification folder built in this process and given to both: the policy's own trunk
with a bias-free score head drawn from ``--seed`` (:class:`aam_fast.modeling.RewardModel`), written by
:func:`aam_fast.modeling.save_reward_model`, which ``AutoModelForSequenceClassification`` loads (checked here before the
cases run); TRL gets it as ``reward_funcs`` with its tokenizer as ``reward_processing_classes``, train-grpo as
``--reward-model``. Its scores mean nothing; it costs what a trained reward model of that size costs. ``--reward-model
DIR`` uses another such folder. TRL scores all of a step's completions in one forward without truncation; train-grpo
scores them in batches of ``--rm-batch-size`` (set to the step's completion count, so one forward too) without
truncation (the folder records no training length).

Prompts: the first ``--prompts-per-step × --steps`` hh-rlhf conversations (prompt = every turn before the last
assistant reply) whose chat-templated prompt fits ``--max-prompt-tokens``, as conversational records, rendered by the
policy's chat template with the generation prompt in both. ``--source-kind prompts --source FILE`` takes the
prompts from a prompt file train-grpo reads instead (RPBench character cards: a system card of a few hundred tokens
and the opening turn), with the same length filter and order. train-grpo draws them in the seeded order of its
:class:`~aam_fast.stages.grpo.rollout.PromptStream`; TRL gets the same list already in that order with
``shuffle_dataset=False``, so step k of both samples the same prompts (each case records a digest of every step's
prompts and the parent checks they agree). The completions themselves differ: each trainer draws them from its own
random streams.

Reported per case: ``seconds`` (wall time of the training loop: the ``train()`` call, without loading and saving),
``seconds_per_step``, ``phases`` (seconds over all steps: generation = prompt encoding, sampling and decoding;
scoring = the reward model; logprobs = the forward-only reference pass; update = loss forward and backward, gradient
clipping and the optimizer step; the rest of the loop is ``other``), ``peak_rss_gib`` (the process's high-water mark
when the loop ends), ``completion_tokens`` (tokens generated, EOS included), the mean reward of the first and the last
step. train-grpo's phases are its ``timing/*`` metrics; TRL's come from timers wrapped around its methods on the
instance: ``_generate``, ``_calculate_rewards``, ``_get_per_token_logps_and_entropies`` when called from
``_generate_and_score_completions`` (the no-grad passes), and for the update ``training_step`` less its
``_prepare_inputs`` plus the time from the end of the step's last ``training_step`` to ``on_optimizer_step``.

``python -m bench.e2e.grpo --policy DIR [--steps 8 --prompts-per-step 2] --json out.json``; DIR is
SmolLM2-135M-Instruct as `make demo` converts it (``$AAM_FAST_CACHE/smollm2-135m-instruct``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

from .cases import add_run_arguments, peak_memory, run_case

CASES = ("trl-grpo", "aam-grpo")
SHARED = Path(__file__).resolve().parents[3] / "shared"
PHASES = ("generation", "scoring", "logprobs", "update")
# The parent's settings every case's process gets.
PASSED_ON = (
    "steps",
    "prompts_per_step",
    "num_generations",
    "max_new_tokens",
    "temperature",
    "beta",
    "lr",
    "generation",
)


def source_prompts(source: Path, kind: str):
    """The conversational prompts of ``source``: every turn before the last assistant reply of each preference pair
    (``kind`` pairs: hh-rlhf), or the prompt records train-grpo reads from a prompt file (``kind`` prompts: RPBench
    character cards, a system card and the opening turn each)."""
    from aam_fast.data import load_preferences, load_prompt_records

    if kind == "prompts":
        yield from (record["prompt"] for record in load_prompt_records(source))
        return
    for pair in load_preferences(source, skip_invalid=True).pairs:
        yield pair.prompt if isinstance(pair.prompt, list) else [{"role": "user", "content": pair.prompt}]


def write_prompts(
    policy: str, source: Path, kind: str, count: int, max_tokens: int, seed: int, out: Path
) -> tuple[Path, Path]:
    """The first ``count`` prompts of ``source`` (:func:`source_prompts`) whose templated tokens fit ``max_tokens``:
    ``out`` in file order (what train-grpo gets) and ``out.trl`` in train-grpo's draw order (what TRL reads without
    shuffling)."""
    from aam_fast.modeling import load_tokenizer
    from aam_fast.stages.grpo.rollout import PromptStream, encode_prompt

    tokenizer = load_tokenizer(policy)
    records = []
    for prompt in source_prompts(source, kind):
        if len(encode_prompt(tokenizer, prompt, None)[0]) <= max_tokens:
            records.append({"prompt": prompt})
        if len(records) == count:
            break
    if len(records) < count:
        raise ValueError(f"--source: only {len(records)} prompts fit --max-prompt-tokens {max_tokens}")
    ordered = PromptStream(records, seed).take(count)
    trl = out.with_suffix(".trl.jsonl")
    for path, rows in ((out, records), (trl, ordered)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out, trl


def build_reward_model(policy: str, folder: Path, seed: int) -> None:
    """The policy's trunk with a seeded score head, saved as a sequence-classification folder (checked to load
    through ``AutoModelForSequenceClassification``)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from aam_fast.modeling import RewardModel, load_causal_lm, load_tokenizer, save_reward_model

    torch.manual_seed(seed)
    save_reward_model(RewardModel(load_causal_lm(policy, dtype=torch.float32)), load_tokenizer(policy), folder)
    loaded = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    if loaded.config.num_labels != 1:
        raise ValueError(f"{folder}: not a one-label sequence classifier")


def digest(prompts: list) -> str:
    return hashlib.sha1(json.dumps(prompts, sort_keys=True).encode()).hexdigest()[:12]


def run_trl(args, prompts: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    completions_per_step = args.prompts_per_step * args.num_generations
    config = GRPOConfig(
        output_dir=args.output,
        per_device_train_batch_size=completions_per_step,
        gradient_accumulation_steps=1,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        num_iterations=1,
        beta=args.beta,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        shuffle_dataset=False,
        disable_dropout=True,
        bf16=args.dtype == "bfloat16",  # TRL's defaults are bf16 and gradient checkpointing: as train-grpo runs
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        log_completions=False,
        seed=args.seed,
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
    )
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward_model, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=args.policy,
        reward_funcs=reward,
        reward_processing_classes=AutoTokenizer.from_pretrained(args.reward_model),
        args=config,
        train_dataset=datasets.load_dataset("json", data_files=str(prompts), split="train"),
    )
    clock = TRLClock(trainer, args.num_generations)

    class StepBoundaries(TrainerCallback):
        def on_step_begin(self, *_, **__):
            clock.begin_step()

        def on_optimizer_step(self, *_, **__):
            clock.optimizer_stepped()

    trainer.add_callback(StepBoundaries())
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = peak_memory()
    logs = [row for row in trainer.state.log_history if "reward" in row]
    return {
        "seconds": seconds,
        "peak": peak,
        "phases": clock.totals(),
        "rewards": [row["reward"] for row in logs],
        "completion_tokens": sum(row["completions/mean_length"] * completions_per_step for row in logs),
        "prompt_digests": clock.digests,
    }


class TRLClock:
    """Timers wrapped around a TRL GRPOTrainer's methods on the instance (see the module docstring)."""

    def __init__(self, trainer, num_generations: int):
        self.steps: list[dict[str, float]] = []
        self.digests: list[str] = []
        self.in_rollout = False
        self.last_training_step_end = None
        self.num_generations = num_generations
        self._wrap(trainer, "_generate", self._generation)
        self._wrap(trainer, "_calculate_rewards", self._phase("scoring"))
        self._wrap(trainer, "_get_per_token_logps_and_entropies", self._logprobs)
        self._wrap(trainer, "_generate_and_score_completions", self._rollout)
        self._wrap(trainer, "_prepare_inputs", self._prepare)
        self._wrap(trainer, "training_step", self._training_step)

    @staticmethod
    def _wrap(trainer, name, make):
        setattr(trainer, name, make(getattr(trainer, name)))

    def begin_step(self) -> None:
        self.steps.append({**dict.fromkeys(PHASES, 0.0), "prepare": 0.0})

    def optimizer_stepped(self) -> None:
        self.steps[-1]["update"] += time.perf_counter() - self.last_training_step_end

    def totals(self) -> dict[str, float]:
        return {phase: sum(step[phase] for step in self.steps) for phase in PHASES}

    def _timed(self, method, phase):
        started = time.perf_counter()
        try:
            return method()
        finally:
            self.steps[-1][phase] += time.perf_counter() - started

    def _phase(self, phase):
        def make(method):
            return lambda *a, **k: self._timed(lambda: method(*a, **k), phase)

        return make

    def _generation(self, method):
        def run(prompts, *a, **k):
            self.digests.append(digest(prompts[:: self.num_generations]))
            return self._timed(lambda: method(prompts, *a, **k), "generation")

        return run

    def _logprobs(self, method):
        def run(*a, **k):
            if not self.in_rollout:  # the loss's own forward (with grad) is part of the update
                return method(*a, **k)
            return self._timed(lambda: method(*a, **k), "logprobs")

        return run

    def _rollout(self, method):
        def run(*a, **k):
            self.in_rollout = True
            try:
                return method(*a, **k)
            finally:
                self.in_rollout = False

        return run

    def _prepare(self, method):
        return lambda *a, **k: self._timed(lambda: method(*a, **k), "prepare")

    def _training_step(self, method):
        def run(*a, **k):
            prepared = self.steps[-1]["prepare"]
            started = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                self.last_training_step_end = time.perf_counter()
                inside = self.steps[-1]["prepare"] - prepared
                self.steps[-1]["update"] += self.last_training_step_end - started - inside

        return run


def run_aam(args, prompts: Path) -> dict:
    from aam_fast.stages.grpo import GRPOConfig, GRPOTrainer

    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    cfg = GRPOConfig(
        policy=args.policy,
        prompts=records,
        reward_model=args.reward_model,
        rm_batch_size=args.prompts_per_step * args.num_generations,
        output=args.output,
        batch_size=args.prompts_per_step,
        grad_accum=1,
        num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        num_iterations=1,
        beta=args.beta,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        lr=args.lr,
        lr_schedule="constant",
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        seed=args.seed,
        progress=False,
        log_completions_every=0,
        max_prompt_length=None,
        generation=args.generation,
    )
    trainer = GRPOTrainer(cfg)
    digests, ended = [], {}
    make_rollout, save_final = trainer.make_rollout, trainer.save_final

    def recorded_rollout():
        batches, metrics = make_rollout()
        digests.append(digest([p for batch in batches for p in batch.prompts[:: cfg.num_generations]]))
        return batches, metrics

    def marked_save(final_report):  # the loop has ended: read the clock and the high-water mark before saving
        ended.update(time=time.perf_counter(), peak=peak_memory())
        save_final(final_report)

    trainer.make_rollout, trainer.save_final = recorded_rollout, marked_save
    started = time.perf_counter()
    rows = trainer.train()
    trainer.ctx.close()
    completions_per_step = args.prompts_per_step * args.num_generations
    return {
        "seconds": ended["time"] - started,
        "peak": ended["peak"],
        "phases": {phase: sum(row[f"timing/{phase}"] for row in rows) for phase in PHASES},
        "rewards": [row["reward"] for row in rows],
        "completion_tokens": sum(row["completions/mean_length"] * completions_per_step for row in rows),
        "prompt_digests": digests,
    }


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    prompts = Path(args.data)
    result = run_trl(args, prompts) if args.case == "trl-grpo" else run_aam(args, prompts)
    phases = {phase: round(seconds, 2) for phase, seconds in result["phases"].items()}
    steps = len(result["rewards"])
    return {
        "case": args.case,
        "steps": steps,
        "seconds": round(result["seconds"], 1),
        "seconds_per_step": round(result["seconds"] / steps, 2),
        "phases": phases,
        "other": round(result["seconds"] - sum(result["phases"].values()), 2),
        **result["peak"],
        "threads": torch.get_num_threads(),  # after the loop: what the trainer left it at
        "completion_tokens": round(result["completion_tokens"]),
        "reward_first": round(result["rewards"][0], 4),
        "reward_last": round(result["rewards"][-1], 4),
        "prompt_digests": result["prompt_digests"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="SmolLM2-135M-Instruct folder (make demo converts it)")
    parser.add_argument("--reward-model", default=None, help="sequence-classification folder (default: built)")
    parser.add_argument("--source", default=str(SHARED / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"))
    parser.add_argument(
        "--source-kind",
        choices=("pairs", "prompts"),
        default="pairs",
        help="pairs: preference pairs, the prompt is every turn before the last reply (hh-rlhf); prompts: a prompt "
        "file train-grpo reads (RPBench character cards: long system prompts)",
    )
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument(
        "--generation",
        choices=("shared-prefix", "generate"),
        default="shared-prefix",
        help="how aam-grpo samples (train-grpo's --generation; generate: on G copies of every prompt, as TRL does)",
    )
    add_run_arguments(parser)
    parser.add_argument("--json", default=None)
    parser.add_argument("--case", choices=CASES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(child(args)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        count = args.steps * args.prompts_per_step
        ours, trl = write_prompts(
            args.policy,
            Path(args.source),
            args.source_kind,
            count,
            args.max_prompt_tokens,
            args.seed,
            Path(tmp) / "prompts.jsonl",
        )
        reward_model = args.reward_model
        if reward_model is None:
            reward_model = str(Path(tmp) / "reward-model")
            build_reward_model(args.policy, Path(reward_model), args.seed)
        for case in args.cases:
            command = [sys.executable, "-m", "bench.e2e.grpo", "--case", case, "--policy", args.policy]
            command += ["--reward-model", reward_model, "--output", str(Path(tmp) / case)]
            command += ["--data", str(trl if case == "trl-grpo" else ours)]
            for name in PASSED_ON:
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            results.append(run_case(case, command, args))
    digests = [r["prompt_digests"] for r in results if "prompt_digests" in r]
    same_prompts = len(digests) < 2 or all(d == digests[0] for d in digests)
    summary = {"settings": {**vars(args), "prompts": count, "same_prompts": same_prompts}, "results": results}
    if not same_prompts:
        print("warning: the cases sampled different prompts", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

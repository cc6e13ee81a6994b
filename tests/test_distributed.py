"""train-rm and train-grpo under torchrun on CPU (gloo, 2 processes, the tiny Llama and hh-rlhf style pairs that the
test session builds, tests/conftest.py; a rule reward for GRPO): DDP and FSDP2 end where one process on the combined
batch ends, a resumed FSDP2 run from its checkpoint ends where the uninterrupted run does, and checkpoints move
between world sizes (2 ranks -> 1 process, 1 process -> 2 ranks) with batch-size x ranks kept.

Each stage's 2-rank runs share one torchrun launch (tests/two_ranks.py, module-scoped fixtures `rm_ranks` and
`grpo_ranks`): a launch costs each rank seconds of imports, a tiny run a fraction of that. The one-process references
run in this process, once per module."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aam_fast.stages.grpo import GRPOConfig, train_grpo
from aam_fast.stages.grpo.sampling import RowSeededSampler, completion_seed
from aam_fast.stages.rm.config import RMConfig
from aam_fast.stages.rm.trainer import train_reward_model
from aam_fast.training import distributed
from aam_fast.training.launch import closing

pytestmark = pytest.mark.slow  # two torchrun launches and their one-process references

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
PER_RANK = 2


def common_args(paths: dict[str, str]) -> list[str]:
    return [
        "--model", paths["model"],
        "--data", paths["hh"],
        "--max-pairs", "24", "--dev-fraction", "0", "--max-length", "48", "--max-steps", str(STEPS),
        "--lr", "1e-4", "--warmup-ratio", "0", "--no-progress",
    ]  # fmt: skip


def rm_cli(paths: dict[str, str], output: Path, *extra: str) -> list[str]:
    """A 2-rank train-rm step of tests/two_ranks.py: `common_args`, PER_RANK pairs per rank."""
    return ["cli", "train-rm", *common_args(paths), "--output", str(output), "--batch-size", str(PER_RANK), *extra]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch_steps(build: Callable[[Path], dict[str, list[str]]], folder: Path) -> tuple[Path, dict[str, str]]:
    """Run the steps that `build(root)` lays out in a new folder `root` (name -> a step of tests/two_ranks.py), in
    order, in one launch of 2 CPU processes under torchrun (gloo), one intra-op thread per rank; asserts success
    and returns `root` and each step's log (the launch's stderr from the step's marker to the next one).

    A launch with a rank killed by SIGABRT is retried up to twice, in a fresh folder: about 1 run in 10 of 2-rank
    FSDP2 on gloo aborted in process teardown after every output was written. Not understood yet: about 150 runs of
    train-rm and train-grpo under FSDP2 (fresh, resumed from DCP, the gather-count script; alone and three at once
    on the 2 cores) never aborted, nor did 2 gloo ranks where one exits 3 s before the other destroys its process
    group. So that the next abort shows its cause, the ranks run with Python's faulthandler on (every thread's stack
    on a fatal signal) and a retried abort is reported as a warning with the end of its stderr. Any other failure,
    or a third abort, fails the test.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}
    attempts = 3
    for attempt in range(attempts):
        root = folder / f"launch-{attempt}"
        root.mkdir()
        steps = build(root)
        plan = root / "plan.json"
        plan.write_text(json.dumps(list(steps.values())))
        command = [*TORCHRUN, str(REPO / "tests" / "two_ranks.py"), str(plan)]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        aborted = "SIGABRT" in done.stderr or "exitcode  : -6" in done.stderr
        if done.returncode == 0 or not aborted or attempt == attempts - 1:
            break
        tail = done.stderr[-3000:]
        warnings.warn(f"a torchrun rank aborted (SIGABRT); retrying. End of its stderr:\n{tail}", stacklevel=2)
    assert done.returncode == 0, done.stderr[-4000:]
    logs = re.split(r"^--- step \d+ ---$", done.stderr, flags=re.MULTILINE)[1:]
    assert len(logs) == len(steps), done.stderr[-4000:]
    return root, dict(zip(steps, logs, strict=True))


def run_two_ranks(cli: list[str]) -> str:
    """`aam-fast CLI... --overwrite` alone in a launch of 2 CPU processes under torchrun (for other modules' 2-rank
    training runs; `--overwrite`: a launch retried after an abort in teardown finds the first attempt's finished run
    in the same `--output`); asserts success and returns its log."""
    with tempfile.TemporaryDirectory() as folder:
        _, logs = launch_steps(lambda root: {"command": ["cli", *cli, "--overwrite"]}, Path(folder))
    return logs["command"]


def losses(output: Path) -> list[float]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(left) == sorted(right)
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def single(tiny_paths, tmp_path_factory):
    """One process, batch 2 x PER_RANK pairs: the combined batch of the 2-rank runs."""
    output = tmp_path_factory.mktemp("single")
    # step 2's single-process checkpoint is resumed on 2 ranks below
    train_in_process(tiny_paths, output, batch_size=2 * PER_RANK, save_every=2)
    return tiny_paths, output


def train_in_process(paths: dict[str, str], output: Path, **settings) -> None:
    """train-rm in this process, one intra-op thread, with the settings of `common_args` and `settings`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_reward_model(
            RMConfig(
                **{
                    "model": paths["model"],
                    "data": paths["hh"],
                    "output": str(output),
                    "max_pairs": 24,
                    "dev_fraction": 0.0,
                    "max_length": 48,
                    "max_steps": STEPS,
                    "lr": 1e-4,
                    "warmup_ratio": 0.0,
                    "progress": False,
                    **settings,
                }
            )
        )
    finally:
        torch.set_num_threads(threads)


LORA = {"lora_r": 4, "lora_alpha": 8.0, "lr": 1e-2, "save_every": 2}
LORA_FLAGS = ["--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--save-every", "2"]


@pytest.fixture(scope="module")
def rm_ranks(single, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Every 2-rank train-rm run of this module, in one launch: DDP; FSDP2 with a checkpoint at step 2; that run
    resumed from step 2 (a copy of its folder without the last checkpoint, as if it had stopped there); the
    one-process run's step-2 checkpoint resumed under FSDP2 and under DDP; LoRA under FSDP2 and under DDP. Returns
    the folder of the runs (one per step name) and each step's log."""
    paths, reference = single
    checkpoint = reference / "checkpoints" / "checkpoint-2"
    resume = ["--save-every", "2", "--resume", "auto"]

    def build(root: Path) -> dict[str, list[str]]:
        steps = {
            "ddp": rm_cli(paths, root / "ddp", "--strategy", "ddp"),
            "fsdp2": rm_cli(paths, root / "fsdp2", "--strategy", "fsdp2", "--save-every", "2"),
            "copy": ["copy", str(root / "fsdp2"), str(root / "fsdp2-resumed")],
            "remove": ["remove", str(root / "fsdp2-resumed" / "checkpoints" / f"checkpoint-{STEPS}")],
            "fsdp2-resumed": rm_cli(paths, root / "fsdp2-resumed", "--strategy", "fsdp2", *resume),
        }
        for strategy in ("fsdp2", "ddp"):
            run = root / f"from-single-{strategy}"
            shutil.copytree(checkpoint, run / "checkpoints" / checkpoint.name)
            steps[run.name] = rm_cli(paths, run, "--strategy", strategy, *resume)
            steps[f"lora-{strategy}"] = rm_cli(paths, root / f"lora-{strategy}", *LORA_FLAGS, "--strategy", strategy)
        return steps

    return launch_steps(build, tmp_path_factory.mktemp("rm-ranks"))


def test_ddp_two_ranks_match_one_process_on_the_combined_batch(single, rm_ranks):
    (_, reference), (root, _) = single, rm_ranks
    assert_same_weights(reference, root / "ddp")
    assert losses(root / "ddp") == pytest.approx(losses(reference), abs=1e-5)
    assert load_file(str(reference / "model.safetensors"))["score.weight"].abs().sum() > 0


def test_fsdp2_two_ranks_match_one_process_and_resume_exactly(single, rm_ranks, tmp_path):
    (paths, reference), (root, logs) = single, rm_ranks
    run = root / "fsdp2"
    assert logs["fsdp2"].count("training pr reward model") == 1  # one log: rank 0's
    assert_same_weights(reference, run)
    assert losses(run) == pytest.approx(losses(reference), abs=1e-5)
    checkpoint = run / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "rank1.pt").is_file()

    # resumed from step 2 on 2 ranks: bit for bit where the uninterrupted run ended, the same metrics file
    assert "resumed from" in logs["fsdp2-resumed"] and "at step 2" in logs["fsdp2-resumed"]
    resumed = load_file(str(root / "fsdp2-resumed" / "model.safetensors"))
    for name, value in load_file(str(run / "model.safetensors")).items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    assert losses(root / "fsdp2-resumed") == losses(run)

    # onto one process (full weights and optimizer state) with the combined batch: where the one-process run ends
    alone = tmp_path / "alone"
    shutil.copytree(checkpoint, alone / "checkpoints" / checkpoint.name)
    with pytest.raises(ValueError, match=r"written with 4 pairs .* this run has 2 .*keep batch-size x ranks"):
        train_in_process(paths, alone, batch_size=PER_RANK, resume="auto")
    train_in_process(paths, alone, batch_size=2 * PER_RANK, resume="auto")
    assert_same_weights(reference, alone)
    assert losses(alone) == pytest.approx(losses(reference)[2:], abs=1e-5)


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_a_single_process_checkpoint_resumes_on_two_ranks(single, rm_ranks, strategy):
    """The one-process run's step-2 checkpoint resumed by 2 ranks of half the batch ends where the one-process run
    ends."""
    (_, reference), (root, logs) = single, rm_ranks
    checkpoint = reference / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "rank1.pt").exists()
    run = root / f"from-single-{strategy}"
    assert "resumed from" in logs[run.name] and "at step 2" in logs[run.name]
    assert_same_weights(reference, run)
    assert losses(run) == pytest.approx(losses(reference)[2:], abs=1e-5)


@pytest.fixture(scope="module")
def lora_alone(tiny_paths, tmp_path_factory):
    """One process of LoRA on the combined batch: where both strategies' 2-rank runs must end."""
    pytest.importorskip("peft", reason="LoRA needs peft")
    alone = tmp_path_factory.mktemp("lora-alone")
    train_in_process(tiny_paths, alone, batch_size=2 * PER_RANK, **LORA)
    return alone


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_lora_two_ranks_match_one_process_and_resume(tiny_paths, lora_alone, rm_ranks, tmp_path, strategy):
    """LoRA with the adapters-off PR reference under torchrun: 2 ranks end with the adapters and the merged export
    of one process on the combined batch, and the 2-rank checkpoint resumes in one process to the same end."""
    ranks = rm_ranks[0] / f"lora-{strategy}"
    assert_same_weights(lora_alone, ranks)
    assert losses(ranks) == pytest.approx(losses(lora_alone), abs=1e-5)
    a, b = (
        load_file(str(lora_alone / "adapter_model.safetensors")),
        load_file(str(ranks / "adapter_model.safetensors")),
    )
    # lora_A's first gradients are ~0 (they are proportional to lora_B, which starts at 0), and Adam's update
    # g / (sqrt(v) + eps) turns float32 reduction-order noise in such tiny gradients into lr-sized differences: the
    # adapter factors agree to a looser bound than their product (the merged weights above, 1e-5)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=5e-5, msg=name)
    resumed = tmp_path / "resumed"
    shutil.copytree(ranks / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    train_in_process(tiny_paths, resumed, batch_size=2 * PER_RANK, resume="auto", **LORA)
    assert_same_weights(lora_alone, resumed)


def test_the_process_group_is_closed_only_when_a_command_ends_normally():
    """training.launch.closing: a rank that raises runs nothing collective (no barrier it could wait in forever)."""

    class Context:
        closed = 0

        def close(self):
            self.closed += 1

    ctx = Context()
    with closing(ctx):
        pass
    assert ctx.closed == 1
    with pytest.raises(RuntimeError, match="failed alone"), closing(ctx):
        raise RuntimeError("a rank failed alone")
    assert ctx.closed == 1


def test_single_process_context_is_the_identity():
    ctx = distributed.DistContext(rank=0, world=1, local_rank=0, strategy="ddp", device=torch.device("cpu"))
    assert ctx.shard([5, 1, 4]) == [5, 1, 4]
    mean, std = ctx.mean_std(torch.tensor([1.0, 2.0, 4.0]))
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).std(unbiased=False))
    assert ctx.weighted_mean(0.5, 4) == 0.5
    with pytest.raises(ValueError, match="strategy"):
        distributed.setup("zero3", torch.device("cpu"))


def test_rank_slices_partition_the_global_micro_batch():
    indices = list(range(12))
    slices = [
        distributed.DistContext(rank=r, world=3, local_rank=r, strategy="ddp", device=torch.device("cpu")).shard(
            indices
        )
        for r in range(3)
    ]
    assert slices == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="does not split"):
        distributed.DistContext(rank=0, world=5, local_rank=0, strategy="ddp", device=torch.device("cpu")).shard(
            indices
        )


# ------------------------------------------------------------------------------------------------------ GRPO

GRPO_PROMPTS = ["Once upon a time", "One day", "Lily was", "The cat", "Tom and", "There was a", "A dog", "Sam saw"]
GRPO_STEPS = 2
REWARD_SOURCE = """
def share_of_a(prompts, completions, **columns):
    return [c.count("a") / max(len(c), 1) for c in completions]
"""


def grpo_settings(paths: dict[str, str], folder: Path) -> dict:
    """A 2-step run: beta > 0 (reference log-probs), 2 micro-batches per step, lr small enough that float32
    summation-order differences stay far below 1e-5 after AdamW."""
    return dict(
        policy=paths["model"],
        prompts=str(folder / "prompts.jsonl"),
        reward_fns=[f"{folder / 'reward.py'}:share_of_a"],
        num_generations=4,
        max_new_tokens=8,
        beta=0.04,
        grad_accum=2,
        lr=1e-4,
        max_steps=GRPO_STEPS,
        progress=False,
    )


def grpo_cli(settings: dict, output: Path, *extra: str) -> list[str]:
    """A 2-rank train-grpo step of tests/two_ranks.py with `settings`, 1 prompt per rank and micro-batch."""
    s = settings
    cli = ["train-grpo", "--policy", s["policy"], "--prompts", s["prompts"], "--reward-fn", s["reward_fns"][0]]
    cli += ["--num-generations", str(s["num_generations"]), "--max-new-tokens", str(s["max_new_tokens"])]
    cli += ["--beta", str(s["beta"]), "--grad-accum", str(s["grad_accum"]), "--lr", str(s["lr"])]
    cli += ["--max-steps", str(s["max_steps"]), "--no-progress", "--output", str(output)]
    return ["cli", *cli, "--batch-size", "1", *extra]


def metric_rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def completion_rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "completions.jsonl").read_text().splitlines()]


def assert_same_metrics(rows: list[dict], reference: list[dict], steps: list[int] | None = None) -> None:
    steps = steps or list(range(1, GRPO_STEPS + 1))
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == steps
    for row, ref in zip(rows, reference, strict=True):
        for key in ("reward", "reward_std", "completions/mean_length", "loss", "kl", "grad_norm", "entropy"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key


@pytest.fixture(scope="module")
def grpo_single(tiny_paths, tmp_path_factory):
    """One process with 2 prompts per micro-batch: the combined batch of 2 ranks with 1 prompt each."""
    folder = tmp_path_factory.mktemp("grpo")
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in GRPO_PROMPTS))
    (folder / "reward.py").write_text(REWARD_SOURCE)
    settings = grpo_settings(tiny_paths, folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # step 1's single-process checkpoint is resumed on 2 ranks below
        train_grpo(GRPOConfig(**settings, batch_size=2, output=str(folder / "single"), save_every=1))
    finally:
        torch.set_num_threads(threads)
    return settings, folder / "single"


@pytest.fixture(scope="module")
def grpo_ranks(grpo_single, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Every 2-rank GRPO run of this module, in one launch: DDP; FSDP2 with a checkpoint at each step; that run
    resumed from step 1 (a copy of its folder without the last checkpoint, as if it had stopped there); the
    one-process run's step-1 checkpoint resumed under FSDP2; and an FSDP2 rollout that counts its all-gathers
    (`gathers.json`). Returns the folder of the runs (one per step name) and each step's log."""
    settings, reference = grpo_single
    checkpoint = reference / "checkpoints" / "checkpoint-1"
    resume = ["--strategy", "fsdp2", "--save-every", "1", "--resume", "auto"]

    def build(root: Path) -> dict[str, list[str]]:
        shutil.copytree(checkpoint, root / "from-single" / "checkpoints" / checkpoint.name)
        rollout = {**settings, "batch_size": 1, "num_iterations": 2, "output": str(root / "rollout")}
        return {
            "ddp": grpo_cli(settings, root / "ddp", "--strategy", "ddp"),
            "fsdp2": grpo_cli(settings, root / "fsdp2", "--strategy", "fsdp2", "--save-every", "1"),
            "copy": ["copy", str(root / "fsdp2"), str(root / "fsdp2-resumed")],
            "remove": ["remove", str(root / "fsdp2-resumed" / "checkpoints" / "checkpoint-2")],
            "fsdp2-resumed": grpo_cli(settings, root / "fsdp2-resumed", *resume),
            "from-single": grpo_cli(settings, root / "from-single", *resume),
            "gathers": ["gathers", json.dumps({**rollout, "strategy": "fsdp2"}), str(root / "gathers.json")],
        }

    return launch_steps(build, tmp_path_factory.mktemp("grpo-ranks"))


def test_grpo_ddp_two_ranks_match_one_process_on_the_combined_batch(grpo_single, grpo_ranks):
    (settings, reference), (root, logs) = grpo_single, grpo_ranks
    run = root / "ddp"
    assert logs["ddp"].count("policy saved to") == 1  # one summary: rank 0's
    assert_same_weights(reference, run)
    assert_same_metrics(metric_rows(run), metric_rows(reference))
    samples, reference_samples = completion_rows(run), completion_rows(reference)
    assert len(samples) == 2 * settings["grad_accum"] * settings["num_generations"]  # every rank's, step 1
    assert [(r["prompt"], r["completion"]) for r in samples] == [
        (r["prompt"], r["completion"]) for r in reference_samples
    ]
    assert [r["advantage"] for r in samples] == pytest.approx([r["advantage"] for r in reference_samples], abs=1e-6)
    initial = load_file(settings["policy"] + "/model.safetensors")
    final = load_file(str(run / "model.safetensors"))
    assert max(float((final[k] - initial[k]).abs().max()) for k in initial) > 1e-5, "the policy did not move"


def test_grpo_fsdp2_two_ranks_match_one_process_and_resume_exactly(grpo_single, grpo_ranks, tmp_path, logged):
    """2 ranks end as one process does; resumed from the step-1 checkpoint on 2 ranks they end bit for bit where
    the uninterrupted run ended, and on one process within 1e-5."""
    (settings, reference), (root, _) = grpo_single, grpo_ranks
    run = root / "fsdp2"
    assert_same_weights(reference, run)
    assert_same_metrics(metric_rows(run), metric_rows(reference))
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    first = checkpoints / "checkpoint-1"
    assert {"model.safetensors", "optimizer.pt", "rank0.pt", "rank1.pt", "trainer_state.json"} <= {
        p.name for p in first.iterdir()
    }
    assert json.loads((first / "trainer_state.json").read_text())["world_size"] == 2
    assert_same_weights(reference / "checkpoints" / "checkpoint-1", first)  # the full weights, gathered

    resumed = load_file(str(root / "fsdp2-resumed" / "model.safetensors"))
    for name, value in load_file(str(run / "model.safetensors")).items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    untimed = [
        [{k: v for k, v in r.items() if not k.startswith("timing/")} for r in rows]
        for rows in (metric_rows(root / "fsdp2-resumed"), metric_rows(run))
    ]
    assert untimed[0] == untimed[1]  # the wall seconds (timing/*) differ from run to run

    # onto one process (full weights and optimizer state): the same end within float32 summation-order differences
    alone = tmp_path / "alone"
    shutil.copytree(first, alone / "checkpoints" / first.name)
    shutil.copy(run / "metrics.jsonl", alone / "metrics.jsonl")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logged.clear()
    try:
        rows = train_grpo(GRPOConfig(**settings, batch_size=2, output=str(alone), resume="auto"))
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in rows] == [2]
    assert logged.count("changed settings") == 0  # batch_size x ranks is the same: the same settings
    assert logged.count(f"resumed from {re.escape(str(alone / 'checkpoints' / first.name))} at step 1") == 1
    assert_same_weights(run, alone)


def test_grpo_single_process_checkpoint_resumes_on_two_fsdp2_ranks(grpo_single, grpo_ranks):
    """The one-process run's step-1 checkpoint resumed by 2 FSDP2 ranks of 1 prompt each ends where the one-process
    run ends."""
    (_, reference), (root, _) = grpo_single, grpo_ranks
    run = root / "from-single"
    assert [r["step"] for r in metric_rows(run)] == [2]
    assert_same_weights(reference, run)
    assert_same_metrics(metric_rows(run), metric_rows(reference)[1:], steps=[2])


def test_grpo_fsdp2_rollout_gathers_the_weights_once(grpo_ranks):
    """A whole rollout (2 micro-batches, old log-probs too) all-gathers each FSDP2 unit once: every decoder layer
    and the root, never once per generated token."""
    counts = json.loads((grpo_ranks[0] / "gathers.json").read_text())
    assert counts["tokens"] > 1
    assert counts["gathers"] == counts["layers"] + 1


def test_row_seeded_sampler_draws_from_the_warped_distribution():
    """20000 rows with the same logits and their own seeds: top-k excludes the rest, and the frequencies of the
    kept tokens match softmax(logits / T) renormalised over them (chi-square, 2 degrees of freedom)."""
    from transformers import GenerationConfig

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -3.0])
    rows = 20000
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=3, top_p=1.0)
    sampler = RowSeededSampler([completion_seed(0, 0, i, 0) for i in range(rows)], 3, config)
    scores = sampler(torch.zeros(rows, 5, dtype=torch.long), logits.expand(rows, -1).clone())
    assert bool((torch.isfinite(scores).sum(dim=1) == 1).all()), "one token kept per row"
    counts = torch.bincount(scores.argmax(dim=1), minlength=6).double()
    kept = torch.tensor([0, 1, 4])
    assert counts[[2, 3, 5]].sum() == 0
    expected = torch.softmax(logits[kept].double() / 0.7, dim=0) * rows
    assert float(((counts[kept] - expected) ** 2 / expected).sum()) < 13.8  # p = 0.001


def test_row_seeded_draws_ignore_the_rest_of_the_batch():
    """A row's draw depends on its seed, step and logits only: not on the other rows nor on the prompt padding
    (which differ between one process and each rank's slice); other seeds or steps draw differently."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=generator)
    seeds = [completion_seed(7, 2, position, g) for position in range(4) for g in range(2)]

    def draw(rows, prompt_width, generated):
        sampler = RowSeededSampler([seeds[r] for r in rows], prompt_width, config)
        ids = torch.zeros(len(rows), prompt_width + generated, dtype=torch.long)
        return sampler(ids, logits[rows].clone()).argmax(dim=1).tolist()

    whole = draw(list(range(8)), 5, 1)
    assert draw([4, 5, 6, 7], 9, 1) == whole[4:]
    assert draw([1], 2, 1) == whole[1:2]
    assert draw(list(range(8)), 5, 2) != whole
    assert len(set(seeds)) == len(seeds)

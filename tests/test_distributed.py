"""train-rm under torchrun on CPU (gloo, 2 processes, the real stories260k model and hh-rlhf pairs): DDP and FSDP2
end where one process on the combined batch ends, and a resumed FSDP2 run from a sharded (DCP) checkpoint ends where
the uninterrupted run does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aam_fast import distributed
from aam_fast.rm import RMConfig, train_reward_model

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
PER_RANK = 2


def common_args(shared: Path) -> list[str]:
    return [
        "--model", str(shared / "models" / "stories260k"),
        "--data", str(shared / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"),
        "--max-pairs", "24", "--dev-fraction", "0", "--max-length", "48", "--max-steps", str(STEPS),
        "--lr", "1e-4", "--warmup-ratio", "0", "--no-progress",
    ]  # fmt: skip


def torchrun(shared: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "aam_fast", "train-rm", *common_args(shared), "--output", str(output)]
    command += ["--batch-size", str(PER_RANK), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def losses(output: Path) -> list[float]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(left) == sorted(right)
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch 2 x PER_RANK pairs: the combined batch of the 2-rank runs."""
    shared = Path(__file__).resolve().parents[1].parent / "shared"
    if not (shared / "models" / "stories260k").is_dir():
        pytest.skip(f"../shared not found at {shared}: the distributed tests need stories260k and hh-rlhf")
    output = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_reward_model(
            RMConfig(
                model=str(shared / "models" / "stories260k"),
                data=str(shared / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"),
                output=str(output),
                max_pairs=24,
                dev_fraction=0.0,
                max_length=48,
                max_steps=STEPS,
                lr=1e-4,
                warmup_ratio=0.0,
                progress=False,
                batch_size=2 * PER_RANK,
            )
        )
    finally:
        torch.set_num_threads(threads)
    return shared, output


def test_ddp_two_ranks_match_one_process_on_the_combined_batch(single, tmp_path):
    shared, reference = single
    torchrun(shared, tmp_path, "--strategy", "ddp")
    assert_same_weights(reference, tmp_path)
    assert losses(tmp_path) == pytest.approx(losses(reference), abs=1e-5)
    assert load_file(str(reference / "model.safetensors"))["score.weight"].abs().sum() > 0


def test_fsdp2_two_ranks_match_one_process_and_resume_exactly(single, tmp_path):
    shared, reference = single
    done = torchrun(shared, tmp_path, "--strategy", "fsdp2", "--save-every", "2")
    assert done.stderr.count("training pr reward model") == 1  # one log: rank 0's
    assert_same_weights(reference, tmp_path)
    assert losses(tmp_path) == pytest.approx(losses(reference), abs=1e-5)
    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    assert (checkpoint / "dcp").is_dir() and (checkpoint / "rng-rank1.pt").is_file()
    uninterrupted = load_file(str(tmp_path / "model.safetensors"))
    first_losses = losses(tmp_path)

    done = torchrun(shared, tmp_path, "--strategy", "fsdp2", "--save-every", "2", "--resume", "auto")
    assert "resumed from" in done.stderr and "at step 2" in done.stderr
    resumed = load_file(str(tmp_path / "model.safetensors"))
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    assert losses(tmp_path) == first_losses


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

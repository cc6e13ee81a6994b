"""The RM training stage on the tiny Llama and synthetic hh-rlhf style pairs built by the session (tests/conftest.py),
and the short training run also on the real stories260k model and hh-rlhf pairs where the shared folder exists: loss
goes down, checkpoints load and resume exactly, failures stop cleanly, evaluation counts as RewardBench does."""

import json
import shutil

import pytest
import torch

from aam_fast import rm
from aam_fast.data import EncodedPair, EncodedSequence, load_preferences
from aam_fast.rm import (
    RMConfig,
    TrainingDiverged,
    list_checkpoints,
    micro_batch_indices,
    pairwise_report,
    train_reward_model,
)

TRL_KEYS = {
    "loss",
    "accuracy",
    "margin/mean",
    "margin/std",
    "rewards/chosen",
    "rewards/rejected",
    "grad_norm",
    "learning_rate",
    "epoch",
    "step",
}


pytestmark = pytest.mark.usefixtures("single_thread")


def config(paths, output, **overrides):
    values = dict(
        model=paths["model"],
        data=paths["hh"],
        output=str(output),
        max_pairs=24,
        dev_fraction=0.0,
        max_length=48,
        batch_size=4,
        eval_batch_size=8,
        lr=3e-3,
        warmup_ratio=0.1,
        max_steps=4,
        progress=False,
        seed=7,
    )
    values.update(overrides)
    return RMConfig(**values)


def read_metrics(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def train_rows(output):
    return [r for r in read_metrics(output) if "loss" in r]


@pytest.fixture(params=["tiny", "real"])
def any_paths(request):
    """The tiny session model and data, then the real stories260k and hh-rlhf pairs (skipped without them)."""
    return request.getfixturevalue(f"{request.param}_paths")


def test_short_training_lowers_the_loss_and_leaves_loadable_checkpoints(any_paths, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    summary = train_reward_model(
        config(any_paths, out, max_pairs=40, dev_fraction=0.2, max_steps=32, save_every=16, eval_every=16)
    )
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 33))
    assert TRL_KEYS <= set(rows[0])
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-6:]) / 6
    assert last < first - 0.05, (first, last)
    assert sum(r["accuracy"] for r in rows[-6:]) / 6 > 0.6
    evals = [r for r in read_metrics(out) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [16, 32]
    assert summary["eval"]["num_pairs"] == summary["dev_pairs"] > 0
    assert 0 <= summary["eval"]["accuracy"] <= 1 and "length_baseline" in summary["eval"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 32
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000016", "step-00000032"]
    for folder in (out, out / "checkpoints" / "step-00000016"):
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        assert model.config.num_labels == 1
    assert json.loads((out / "aam_fast.json").read_text())["final_eval"]["num_pairs"] == summary["dev_pairs"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"grad_accum": 2},
        {"trainable_layers": 2, "cache_trunk": True, "epochs": 2.0, "max_steps": None, "max_pairs": 12},
    ],
    ids=["full-accum", "top2-cached"],
)
def test_resume_continues_the_identical_loss_curve(tiny_paths, tmp_path, overrides):
    settings = {"max_steps": 6, "save_every": 3, "keep_checkpoints": 5, **overrides}
    full = tmp_path / "full"
    train_reward_model(config(tiny_paths, full, **settings))
    checkpoints = list_checkpoints(full / "checkpoints")
    assert checkpoints, "no checkpoint written"
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoints[0], resumed / "checkpoints" / checkpoints[0].name)
    train_reward_model(config(tiny_paths, resumed, resume="auto", **settings))
    start = int(checkpoints[0].name.split("-")[1])
    expected = [r for r in train_rows(full) if r["step"] > start]
    assert expected and train_rows(resumed) == expected  # every metric of every later step, exactly
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


class _NaNAtCall:
    """AAMLoss whose n-th call returns a NaN loss (a diverging run)."""

    def __init__(self, n):
        self.n, self.calls = n, 0
        self.loss_class = rm.AAMLoss

    def __call__(self, **kwargs):
        real = self.loss_class(**kwargs)

        def forward(*args, **kw):
            self.calls += 1
            result = real(*args, **kw)
            if self.calls == self.n:
                result.loss = result.loss * float("nan")
            return result

        return forward


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_paths, tmp_path, monkeypatch):
    monkeypatch.setattr(rm, "AAMLoss", _NaNAtCall(3))
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at step 3 .*step-00000002"):
        train_reward_model(config(tiny_paths, out, max_steps=5, save_every=1, keep_checkpoints=5))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000001", "step-00000002"]
    assert [r["step"] for r in train_rows(out)] == [1, 2]
    from aam_fast.models import load_reward_model

    load_reward_model(out / "checkpoints" / "step-00000002")


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tiny_paths, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = rm.save_reward_model
    calls = {"n": 0}

    def crashing_save(model, tokenizer, folder, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            (folder / "config.json").parent.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text("{")  # half-written
            raise KeyboardInterrupt("killed mid-save")
        return real_save(model, tokenizer, folder, **kwargs)

    monkeypatch.setattr(rm, "save_reward_model", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(config(tiny_paths, out, max_steps=4, save_every=2))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    monkeypatch.setattr(rm, "save_reward_model", real_save)
    summary = train_reward_model(config(tiny_paths, out, max_steps=4, save_every=2, resume="auto"))
    assert summary["steps"] == 4 and [r["step"] for r in train_rows(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize("margin", ["bt", "fixed", "ld", "pr"])
def test_every_margin_trains(tiny_paths, tmp_path, margin):
    pairs = load_preferences(tiny_paths["hh"], limit=8).pairs
    data = tmp_path / "pairs.jsonl"
    with data.open("w") as handle:
        for i, pair in enumerate(pairs):
            record = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, "margin": i / 4}
            handle.write(json.dumps(record) + "\n")
    extra = {"sft_weight": 0.1} if margin == "pr" else {}
    out = tmp_path / margin
    train_reward_model(config(tiny_paths, out, data=str(data), margin=margin, max_steps=2, **extra))
    rows = train_rows(out)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if margin == "bt":
        assert rows[1]["margin/mean"] == 0.0
    elif margin == "fixed":
        # The two steps of epoch 0 see all eight data margins 0, 0.25, ..., 1.75 once.
        assert (rows[0]["margin/mean"] + rows[1]["margin/mean"]) / 2 == pytest.approx(0.875)
    else:
        assert rows[1]["margin/std"] > 0


def test_config_errors(tiny_paths, tmp_path):
    with pytest.raises(ValueError, match="cache_trunk needs trainable_layers"):
        train_reward_model(config(tiny_paths, tmp_path, cache_trunk=True))
    with pytest.raises(ValueError, match="margin='fixed' needs a 'margin' field.*#0"):
        train_reward_model(config(tiny_paths, tmp_path, margin="fixed"))
    with pytest.raises(ValueError, match="margin must be one of"):
        train_reward_model(config(tiny_paths, tmp_path, margin="huge"))


def test_micro_batches_cover_each_epoch_once():
    seen = [micro_batch_indices(10, 3, seed=1, index=i) for i in range(6)]
    epoch0 = sorted(sum((ids for epoch, ids in seen[:3]), []))
    assert [e for e, _ in seen] == [0, 0, 0, 1, 1, 1]
    assert len(epoch0) == 9 and len(set(epoch0)) == 9
    assert seen[:3] != seen[3:]
    assert micro_batch_indices(10, 3, seed=1, index=4) == seen[4]


def _pair(chosen_tokens, rejected_tokens, subset):
    return EncodedPair(
        EncodedSequence([1] * chosen_tokens, 0, chosen_tokens),
        EncodedSequence([1] * rejected_tokens, 0, rejected_tokens),
        subset=subset,
    )


def test_pairwise_report_counts_ties_as_wrong():
    pairs = [_pair(5, 3, "a"), _pair(3, 3, "a"), _pair(2, 4, "b"), _pair(6, 1, "b")]
    chosen = torch.tensor([1.0, 0.5, 0.2, -1.0])
    rejected = torch.tensor([0.0, 0.5, 0.1, 0.0])
    report = pairwise_report(chosen, rejected, pairs)
    assert report["accuracy"] == 0.5 and report["ties"] == 1 and report["num_pairs"] == 4
    assert report["length_baseline"] == 0.5  # longer wins in pairs 0 and 3; the equal-length pair is wrong
    assert report["subsets"]["a"] == {
        "accuracy": 0.5,
        "length_baseline": 0.5,
        "num_pairs": 2,
        "reward_gap_mean": 0.5,
    }
    assert report["subsets"]["b"]["accuracy"] == 0.5 and report["subsets"]["b"]["length_baseline"] == 0.5
    gap = report["reward_gap"]
    assert gap["min"] == -1.0 and gap["max"] == 1.0 and gap["median"] == pytest.approx(0.05)

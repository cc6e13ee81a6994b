"""A resume is the same run (aam_fast/training/trainer_state.py, docs/checkpoints.md): the checkpoint records what the
run trains on by content (data fingerprints, reward sources) and a resume with other content is refused in one line
saying what changed, while a relative and an absolute path to the same data are the same run; trainer_state.json is
validated before anything loads; damaged or missing checkpoint files are one ValueError naming the file. Each
"Silently wrong" resume case and each checkpoint traceback of issue 21 is one test case here."""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from aam_fast import cli
from aam_fast.stages.grpo import GRPOConfig, train_grpo
from aam_fast.stages.rm.config import RMConfig
from aam_fast.stages.rm.trainer import train_reward_model

pytestmark = pytest.mark.usefixtures("single_thread")

HINT = r"resume from an earlier checkpoint with --resume PATH, or start afresh with --overwrite"


def config(model, data, output, **overrides) -> RMConfig:
    values = dict(
        model=model,
        data=str(data),
        output=str(output),
        max_pairs=16,
        dev_fraction=0.0,
        max_length=32,
        batch_size=4,
        lr=3e-3,
        max_steps=2,
        save_every=1,
        progress=False,
        seed=7,
    )
    values.update(overrides)
    return RMConfig(**values)


@pytest.fixture(scope="module")
def base(tiny_paths, tmp_path_factory):
    """A finished 2-step train-rm run with a checkpoint at each step, on its own copy of the session's pairs."""
    folder = tmp_path_factory.mktemp("identity")
    data = folder / "pairs.jsonl"
    shutil.copy(tiny_paths["pairs"], data)
    train_reward_model(config(tiny_paths["model"], data, folder / "run"))
    return {"model": tiny_paths["model"], "data": data, "checkpoint": folder / "run" / "checkpoints" / "checkpoint-1"}


def resume_copy(base, tmp_path, edit_state=None, edit_files=None) -> Path:
    """A new run folder holding a (possibly edited) copy of the base run's checkpoint-1."""
    out = tmp_path / "resumed"
    folder = out / "checkpoints" / "checkpoint-1"
    shutil.copytree(base["checkpoint"], folder)
    if edit_state is not None:
        path = folder / "trainer_state.json"
        state = json.loads(path.read_text())
        edited = edit_state if isinstance(edit_state, str) else edit_state(state)
        path.write_text(edited if isinstance(edited, str) else json.dumps(state if edited is None else edited))
    if edit_files is not None:
        edit_files(folder)
    return out


def test_a_relative_path_to_the_same_data_resumes(base, tmp_path, monkeypatch):
    out = resume_copy(base, tmp_path)
    monkeypatch.chdir(base["data"].parent)
    summary = train_reward_model(config(os.path.relpath(base["model"]), "pairs.jsonl", out, resume="auto"))
    assert summary["steps"] == 2


def _swap_sides(path: Path) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_edited_data_at_the_same_path_is_refused(tiny_paths, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    shutil.copy(tiny_paths["pairs"], data)
    out = tmp_path / "run"
    train_reward_model(config(tiny_paths["model"], data, out, max_steps=1))
    _swap_sides(data)
    capsys.readouterr()
    argv = ["train-rm", "--model", tiny_paths["model"], "--data", str(data), "--output", str(out), "--resume", "auto"]
    argv += ["--max-pairs", "16", "--dev-fraction", "0", "--max-length", "32", "--batch-size", "4", "--lr", "3e-3"]
    argv += ["--max-steps", "1", "--save-every", "1", "--seed", "7", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err
    assert "--data: content changed since the checkpoint (fingerprint " in errors[0]


def test_other_data_at_another_path_is_refused(base, tmp_path):
    other = tmp_path / "other.jsonl"
    shutil.copy(base["data"], other)
    _swap_sides(other)
    out = resume_copy(base, tmp_path)
    with pytest.raises(ValueError, match=r"--data: content changed since the checkpoint \(fingerprint \w+ -> finger"):
        train_reward_model(config(base["model"], other, out, resume="auto"))


def _set(key, value):
    def edit(state):
        state[key] = value

    return edit


def _drop(key):
    return lambda state: state.pop(key) and None


def _schedule(key, value):
    def edit(state):
        state["scheduler"][key] = value

    return edit


STATE_CASES = {
    "step-999": (_set("step", 999), r"step 999 is outside this run's \[0, 2\] steps"),
    "step-negative": (_set("step", -5), r"step -5 is outside this run's \[0, 2\] steps"),
    "step-text": (_set("step", "abc"), r"'step' is 'abc', not a finite int"),
    "step-bool": (_set("step", True), r"'step' is True, not a finite int"),
    "no-scheduler": (_drop("scheduler"), r"no 'scheduler' field"),
    "no-config": (_drop("config"), r"no 'config' field"),
    "no-identity": (_drop("identity"), r"no 'identity' field"),
    "global-batch-text": (_set("global_batch", "4"), r"'global_batch' is '4', not a finite int"),
    "tokens-negative": (_set("num_tokens", -1), r"'num_tokens' is -1, a negative count"),
    "base-lrs-huge": (_schedule("base_lrs", [1e9, 1e9]), r"base learning rates \[1000000000.0, 1000000000.0\] are not"),
    "base-lrs-text": (_schedule("base_lrs", ["x"]), r"base_lrs \['x'\] are not learning rates"),
    "schedule-elsewhere": (_schedule("last_epoch", 5), r"the schedule is at step 5, the checkpoint at step 1"),
    "rm-total-steps": (_set("total_steps", "2"), r"'total_steps' is '2', not a finite int"),
    "not-an-object": (lambda state: [], r"not a JSON object"),
    "truncated": ('{"stage": "rm", "st', r"not a readable checkpoint state"),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_an_edited_trainer_state_is_refused_before_anything_loads(base, tmp_path, case, monkeypatch):
    edit, message = STATE_CASES[case]
    out = resume_copy(base, tmp_path, edit_state=edit)
    from aam_fast.stages.rm import trainer as rm

    def no_weights(*args):
        raise AssertionError("weights loaded before the state was checked")

    if case not in ("base-lrs-huge",):  # the schedule's learning rates are compared once the engine is built
        monkeypatch.setattr(rm.RMTrainer, "load_weights", no_weights)
    with pytest.raises(ValueError, match=message) as caught:
        train_reward_model(config(base["model"], base["data"], out, resume="auto"))
    assert "trainer_state.json" in str(caught.value)


def _truncate(name):
    def edit(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return edit


def _remove(name):
    return lambda folder: (folder / name).unlink()


def _huge_header(folder):
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")


def _wrong_optimizer_shape(folder):
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    name = next(iter(state["state"]))
    state["state"][name]["exp_avg"] = torch.zeros(3)
    torch.save(state, folder / "optimizer.pt")


def _huge_learning_rate(folder):
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    for group in state["param_groups"]:
        group["lr"] = 1e9
    torch.save(state, folder / "optimizer.pt")


def _not_a_pickle(folder):
    (folder / "optimizer.pt").write_bytes(b"not a checkpoint at all")


FILE_CASES = {
    "optimizer-learning-rate": (_huge_learning_rate, "optimizer.pt"),
    "optimizer-truncated": (_truncate("optimizer.pt"), "optimizer.pt"),
    "optimizer-missing": (_remove("optimizer.pt"), "optimizer.pt"),
    "optimizer-garbage": (_not_a_pickle, "optimizer.pt"),
    "optimizer-wrong-shapes": (_wrong_optimizer_shape, "optimizer.pt"),
    "model-truncated": (_truncate("model.safetensors"), r"model\*.safetensors"),
    "model-missing": (_remove("model.safetensors"), r"model\*.safetensors"),
    "model-huge-header": (_huge_header, r"model\*.safetensors"),
    "rank-state-truncated": (_truncate("rank0.pt"), "rank0.pt"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_a_damaged_checkpoint_file_is_one_line_naming_it(base, tmp_path, case):
    edit, name = FILE_CASES[case]
    out = resume_copy(base, tmp_path, edit_files=edit)
    with pytest.raises(ValueError, match=rf"checkpoint-1/{name}: .*; {HINT}"):
        train_reward_model(config(base["model"], base["data"], out, resume="auto"))
    assert not (out / ".aam_fast.lock").exists()


# -- GRPO: the prompts and the reward sources ---------------------------------------------------------------------

PROMPTS = [{"prompt": p} for p in ["Once upon a time", "One day", "Lily was", "The cat"]]
RULES = (
    "def share_of_a(prompts, completions, **columns):\n"
    "    return [c.count('a') / max(len(c), 1) for c in completions]\n"
)


def length_reward(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]


def grpo_config(policy, output, **overrides) -> GRPOConfig:
    values = dict(
        policy=policy,
        prompts=PROMPTS,
        output=str(output),
        num_generations=2,
        max_new_tokens=4,
        batch_size=2,
        lr=1e-3,
        max_steps=2,
        save_every=1,
        progress=False,
        log_completions_every=0,
    )
    values.update(overrides)
    return GRPOConfig(**values)


@pytest.fixture(scope="module")
def grpo_run(tiny_paths, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpo-identity")
    rules = folder / "rules.py"
    rules.write_text(RULES)
    output = folder / "run"
    train_grpo(grpo_config(tiny_paths["model"], output, reward_fns=[f"{rules}:share_of_a"]))
    return {"policy": tiny_paths["model"], "rules": rules, "checkpoint": output / "checkpoints" / "checkpoint-1"}


def _grpo_resume(grpo_run, tmp_path, edit_state=None, **overrides):
    out = tmp_path / "resumed"
    shutil.copytree(grpo_run["checkpoint"], out / "checkpoints" / "checkpoint-1")
    if edit_state is not None:
        path = out / "checkpoints" / "checkpoint-1" / "trainer_state.json"
        state = json.loads(path.read_text())
        edit_state(state)
        path.write_text(json.dumps(state))
    settings = {"reward_fns": [f"{grpo_run['rules']}:share_of_a"], **overrides}
    return train_grpo(grpo_config(grpo_run["policy"], out, resume="auto", **settings))


def test_grpo_resumes_with_the_same_prompts_and_rewards(grpo_run, tmp_path, monkeypatch):
    monkeypatch.chdir(grpo_run["rules"].parent)  # a relative path to the same reward file is the same source
    assert [r["step"] for r in _grpo_resume(grpo_run, tmp_path, reward_fns=["rules.py:share_of_a"])] == [2]


def test_grpo_refuses_an_edited_reward_file(grpo_run, tmp_path):
    edited = tmp_path / "rules.py"
    edited.write_text(RULES.replace("'a'", "'e'"))
    with pytest.raises(ValueError, match=r"--reward-fn: content changed since the checkpoint \(rules.py:share_of_a "):
        _grpo_resume(grpo_run, tmp_path, reward_fns=[f"{edited}:share_of_a"])


def test_grpo_refuses_another_reward_function(grpo_run, tmp_path):
    with pytest.raises(ValueError, match=r"--reward-fn: .*-> test_resume_identity.py:length_reward sha256"):
        _grpo_resume(grpo_run, tmp_path, reward_fns=[length_reward])


def test_grpo_refuses_other_prompts(grpo_run, tmp_path):
    prompts = [{"prompt": p["prompt"] + "!"} for p in PROMPTS]
    with pytest.raises(ValueError, match=r"--prompts: content changed since the checkpoint \(fingerprint "):
        _grpo_resume(grpo_run, tmp_path, prompts=prompts)


def test_grpo_checkpoint_records_the_reward_sources(grpo_run):
    state = json.loads((grpo_run["checkpoint"] / "trainer_state.json").read_text())
    identity = state["identity"]
    assert identity["--reward-fn"].startswith("rules.py:share_of_a sha256 ") and identity["--reward-model"] == "none"
    assert identity["--reward-fn"].endswith(" weight 1.0") and identity["--prompts"].startswith("fingerprint ")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda state: state["data"].update(index=-3), r"'data' \{.*\} is not a position in the prompts"),
        (lambda state: state["data"].update(epoch="x"), r"'data' \{.*\} is not a position in the prompts"),
        (lambda state: state.update(mid_rollout="yes"), r"'mid_rollout' is 'yes', not a finite bool"),
        (lambda state: state.update(step=3), r"step 3 is outside this run's \[0, 2\] steps"),
    ],
    ids=["index-negative", "epoch-text", "mid-rollout-text", "step-past-max-steps"],
)
def test_grpo_an_edited_trainer_state_is_refused(grpo_run, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        _grpo_resume(grpo_run, tmp_path, edit_state=edit)

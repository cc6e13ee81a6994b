"""The run folder (``--output``) as a whole (aam_fast/training/run_folder.py, docs/checkpoints.md): an earlier run is
never replaced without ``--resume`` or ``--overwrite`` (which removes only what a run writes), no input inside it,
one process at a time (a lock naming its holder), nothing written or deleted through a symbolic link, and a kill
during the final evaluation or export resumed without a duplicate row. Each case of issue 21's "Data loss" list is
one test case here."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from aam_fast import cli
from aam_fast.stages.rm import trainer as rm
from aam_fast.stages.rm.config import RMConfig
from aam_fast.stages.rm.trainer import train_reward_model
from aam_fast.training.run_folder import EXPORT_STAGING, LOCK_FILE

pytestmark = pytest.mark.usefixtures("single_thread")


def config(tiny_paths, output, **overrides) -> RMConfig:
    values = dict(
        model=tiny_paths["model"],
        data=tiny_paths["pairs"],
        output=str(output),
        max_pairs=16,
        dev_fraction=0.0,
        max_length=32,
        batch_size=4,
        eval_batch_size=8,
        lr=3e-3,
        max_steps=2,
        progress=False,
        seed=7,
    )
    values.update(overrides)
    return RMConfig(**values)


def argv(tiny_paths, output, *extra) -> list[str]:
    return [
        "train-rm",
        "--model",
        tiny_paths["model"],
        "--data",
        tiny_paths["pairs"],
        "--output",
        str(output),
        "--max-pairs",
        "16",
        "--dev-fraction",
        "0",
        "--max-length",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--no-progress",
        *extra,
    ]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def rows(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_a_finished_run_without_checkpoints_is_not_replaced_without_a_word(tiny_paths, tmp_path, capsys):
    """`train-rm --margin bt --output o`, then `--margin ld --output o`: refused (exit 2, one line); `--overwrite`
    replaces the run's own files and keeps a foreign file."""
    out = tmp_path / "o"
    assert cli.main(argv(tiny_paths, out, "--margin", "bt")) == 0
    first_summary = (out / "summary.json").read_text()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(argv(tiny_paths, out, "--margin", "ld")) == 2
    assert "holds an earlier run (summary.json, model.safetensors" in one_error_line(capsys)
    assert (out / "summary.json").read_text() == first_summary  # untouched
    assert cli.main(argv(tiny_paths, out, "--margin", "ld", "--overwrite")) == 0
    assert json.loads((out / "summary.json").read_text())["margin"] == "ld"
    assert (out / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in rows(out)] == [1, 2]
    assert not (out / LOCK_FILE).exists() and not (out / EXPORT_STAGING).exists()


def test_resume_auto_without_a_checkpoint_refuses_a_finished_run(tiny_paths, tmp_path):
    out = tmp_path / "o"
    train_reward_model(config(tiny_paths, out))
    with pytest.raises(ValueError, match=r"--resume auto: .* holds a finished run .* but no checkpoint"):
        train_reward_model(config(tiny_paths, out, resume="auto"))


def test_an_unfinished_run_without_a_checkpoint_restarts_under_resume_auto(tiny_paths, tmp_path, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setattr(rm.RMTrainer, "evaluate", _raise_once(rm.RMTrainer.evaluate))
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(config(tiny_paths, out))
    assert not (out / LOCK_FILE).exists()  # released on error too
    summary = train_reward_model(config(tiny_paths, out, resume="auto"))
    assert summary["steps"] == 2 and [r["step"] for r in rows(out)] == [1, 2]


@pytest.mark.parametrize(
    "flag, name", [("data", "metrics.jsonl"), ("eval_data", "summary.json"), ("data", "sub/pairs.jsonl")]
)
def test_an_input_inside_the_output_folder_is_refused(tiny_paths, tmp_path, flag, name):
    out = tmp_path / "o"
    (out / name).parent.mkdir(parents=True)
    shutil.copy(tiny_paths["pairs"], out / name)
    before = (out / name).read_bytes()
    spelled = "--" + flag.replace("_", "-")
    with pytest.raises(ValueError, match=rf"{spelled} \S+ is inside --output"):
        train_reward_model(config(tiny_paths, out, **{flag: str(out / name)}, overwrite=True))
    assert (out / name).read_bytes() == before


def test_a_relative_input_path_inside_the_output_folder_is_refused(tiny_paths, tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    shutil.copy(tiny_paths["pairs"], out / "pairs.jsonl")
    monkeypatch.chdir(out)
    with pytest.raises(ValueError, match=r"--data pairs.jsonl is inside --output"):
        train_reward_model(config(tiny_paths, "../o", data="pairs.jsonl"))


def _fake_lock(out, **holder):
    out.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01 00:00:00", **holder}
    (out / LOCK_FILE).write_text(json.dumps(record))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("holder", [{}, {"host": "elsewhere.example"}], ids=["live-pid", "other-host"])
def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tiny_paths, tmp_path, holder, capsys):
    """Two runs at once into one --output, the second with --overwrite: the second is refused, nothing removed."""
    out = tmp_path / "o"
    train_reward_model(config(tiny_paths, out, save_every=1))
    _fake_lock(out, **holder)
    capsys.readouterr()
    assert cli.main(argv(tiny_paths, out, "--overwrite")) == 2
    line = one_error_line(capsys)
    host = holder.get("host", socket.gethostname())
    assert f"is in use by another run (pid {os.getpid()} on {host}, started 2026-01-01 00:00:00)" in line
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and (out / "model.safetensors").is_file()
    assert (out / LOCK_FILE).exists()  # still the holder's


def test_a_stale_lock_is_taken_over_with_a_log_line_and_released(tiny_paths, tmp_path, logged):
    out = tmp_path / "o"
    pid = _dead_pid()
    _fake_lock(out, pid=pid)
    train_reward_model(config(tiny_paths, out))
    assert logged.count(rf"pid {pid} \(started 2026-01-01 00:00:00\) no longer runs; taking its lock over") == 1
    assert not (out / LOCK_FILE).exists()


def test_the_lock_is_held_while_the_run_runs(tiny_paths, tmp_path, monkeypatch):
    out, seen = tmp_path / "o", []

    def train_step(self, real=rm.RMTrainer.train_step):
        seen.append(json.loads((out / LOCK_FILE).read_text())["pid"])
        return real(self)

    monkeypatch.setattr(rm.RMTrainer, "train_step", train_step)
    train_reward_model(config(tiny_paths, out))
    assert seen == [os.getpid()] * 2 and not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json", "model.safetensors"])
def test_a_symlinked_run_file_is_refused_or_replaced_never_written_through(tiny_paths, tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "o"
    out.mkdir()
    (out / name).symlink_to(victim)
    with pytest.raises(ValueError, match=rf"{name} is a symbolic link: a run never writes or deletes through one"):
        train_reward_model(config(tiny_paths, out))
    train_reward_model(config(tiny_paths, out, overwrite=True))
    assert victim.read_text() == "precious"
    assert not (out / name).is_symlink() and (out / name).is_file()


def test_a_symlinked_checkpoints_folder_is_never_deleted_through(tiny_paths, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "checkpoint-1").mkdir(parents=True)
    (elsewhere / "checkpoint-1" / "trainer_state.json").write_text("{}")
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="checkpoints is a symbolic link"):
        train_reward_model(config(tiny_paths, out, resume="auto"))
    train_reward_model(config(tiny_paths, out, overwrite=True, save_every=1))
    assert (elsewhere / "checkpoint-1" / "trainer_state.json").read_text() == "{}"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["checkpoint-1"]
    assert not (out / "checkpoints").is_symlink() and (out / "checkpoints" / "checkpoint-2").is_dir()


def test_a_symlinked_checkpoint_inside_checkpoints_is_refused(tiny_paths, tmp_path):
    out = tmp_path / "o"
    train_reward_model(config(tiny_paths, out, save_every=1))
    shutil.move(out / "checkpoints" / "checkpoint-2", tmp_path / "moved")
    (out / "checkpoints" / "checkpoint-2").symlink_to(tmp_path / "moved")
    with pytest.raises(ValueError, match="checkpoint-2 is a symbolic link"):
        train_reward_model(config(tiny_paths, out, save_every=1, resume="auto"))


def _raise_once(method):
    """``method``, but its first call raises KeyboardInterrupt (a kill); later calls run it."""
    calls = {"n": 0}

    def wrapped(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("killed")
        return method(self, *args, **kwargs)

    return wrapped


def test_a_kill_during_the_export_then_resume_leaves_one_final_eval_row(tiny_paths, tmp_path, monkeypatch):
    settings = dict(dev_fraction=0.3, max_pairs=24, save_every=2, max_steps=2)
    full = tmp_path / "full"
    train_reward_model(config(tiny_paths, full, **settings))
    out = tmp_path / "o"
    monkeypatch.setattr(rm.RMTrainer, "export", _raise_once(rm.RMTrainer.export))
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(config(tiny_paths, out, **settings))
    assert [("eval_accuracy" in r, r["step"]) for r in rows(out)] == [(False, 1), (False, 2), (True, 2)]
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    train_reward_model(config(tiny_paths, out, resume="auto", **settings))
    assert rows(out) == rows(full)  # exactly one final eval row, equal to the uninterrupted run's
    assert not (out / EXPORT_STAGING).exists() and (out / "model.safetensors").is_file()
    assert (out / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()


def test_files_are_written_whole_and_no_temporary_file_remains(tiny_paths, tmp_path):
    out = tmp_path / "o"
    train_reward_model(config(tiny_paths, out, save_every=1))
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == [] and json.loads((out / "summary.json").read_text())["steps"] == 2
    exported = json.loads((out / ".aam_fast-export.json").read_text())
    assert "model.safetensors" in exported and "config.json" in exported


def test_a_reward_function_file_inside_the_output_folder_is_refused(tiny_paths, tmp_path):
    from aam_fast.stages.grpo import GRPOConfig, train_grpo

    out = tmp_path / "o"
    out.mkdir()
    (out / "rules.py").write_text("def r(prompts, completions, **columns):\n    return [0.0] * len(completions)\n")
    cfg = GRPOConfig(
        policy=tiny_paths["model"],
        prompts=[{"prompt": "One day"}],
        output=str(out),
        reward_fns=[f"{out / 'rules.py'}:r"],
        progress=False,
    )
    with pytest.raises(ValueError, match=r"--reward-fn \S+rules.py is inside --output"):
        train_grpo(cfg)


def test_a_run_that_failed_in_its_setup_is_replaced_by_its_retry(tiny_paths, tmp_path, logged):
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        train_reward_model(config(tiny_paths, out, max_length=100_000))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]  # its settings only, and no lock left
    logged.clear()
    assert train_reward_model(config(tiny_paths, out))["steps"] == 2
    assert logged.count(r"replacing the settings of a run that never trained a step \(config.yaml\)") == 1


def _nan_weight(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _nan_optimizer(folder):
    import torch

    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    for values in saved["state"].values():
        for value in values.values():
            if value.dim() > 0:
                value.view(-1)[0] = float("nan")
    torch.save(saved, folder / "optimizer.pt")


def _rng_replaced(folder):
    import torch

    torch.save({"rng": torch.zeros(3, dtype=torch.uint8)}, folder / "rank0.pt")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda folder: (folder / "rank0.pt").unlink(), "rank0.pt: damaged, missing or not this run's checkpoint"),
        (_rng_replaced, "rank0.pt: damaged, missing or not this run's checkpoint file (no dict of RNG states"),
        (_nan_weight, "checkpoint-1: 1 non-finite trainable weights in the checkpoint; resume from an earlier"),
        (_nan_optimizer, "optimizer.pt: 78 non-finite values in the optimizer state; resume from an earlier"),
    ],
    ids=["rank-file-missing", "rng-state-replaced", "nan-weight", "nan-optimizer-state"],
)
def test_a_damaged_checkpoint_of_an_unfinished_run_is_one_line_naming_it(
    tiny_paths, tmp_path, capsys, damage, expected
):
    """The fresh probe, on a run killed after checkpoint-1: a missing rank file resumed without its RNG states, a
    replaced RNG state was an "unexpected IndexError", and NaN weights or optimizer state resumed into a first step
    refused as non-finite that named this very checkpoint as the last finite one."""
    output = tmp_path / "o"
    train_reward_model(config(tiny_paths, output, save_every=1))
    shutil.rmtree(output / "checkpoints" / "checkpoint-2")
    damage(output / "checkpoints" / "checkpoint-1")
    capsys.readouterr()
    resume = ("--save-every", "1", "--lr", "3e-3", "--seed", "7", "--resume", "auto")
    assert cli.main(argv(tiny_paths, output, *resume)) == 2
    line = one_error_line(capsys)
    assert expected in line


@pytest.mark.parametrize("count", [10**6, -1], ids=["too-many", "negative"])
def test_an_edited_metrics_row_count_never_duplicates_a_row(tiny_paths, tmp_path, capsys, count):
    """A checkpoint's ``metrics_rows`` edited above the rows it saw kept the killed run's later rows, so the
    resumed step was logged twice (the probe, on train-grpo: steps [1, 2, 2]); a negative count is refused."""
    output = tmp_path / "o"
    train_reward_model(config(tiny_paths, output, save_every=1))
    expected = [row["step"] for row in rows(output)]
    shutil.rmtree(output / "checkpoints" / "checkpoint-2")  # killed after the last step's rows were written
    state_file = output / "checkpoints" / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["metrics_rows"] = count
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    code = cli.main(argv(tiny_paths, output, "--save-every", "1", "--lr", "3e-3", "--seed", "7", "--resume", "auto"))
    if count < 0:
        assert code == 2 and "'metrics_rows' is -1, a negative count" in one_error_line(capsys)
    else:
        assert code == 0 and [row["step"] for row in rows(output)] == expected

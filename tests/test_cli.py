"""The aam-fast command line: stage registration, train-rm, eval-rm (--json on stdout, logs on stderr), demo data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aam_fast import cli
from aam_fast.data import load_preferences, split_by_prompt
from aam_fast.demo_assets import demo_data_path
from aam_fast.stages.rm.demo import demo_config

ROOT = Path(__file__).resolve().parents[1]
PAIRS = 24  # records in the session's tiny `pairs` file


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained(tiny_paths, tmp_path_factory):
    """A reward model trained for a few steps through `aam-fast train-rm` on the session's tiny Llama, and its data:
    the session's TRL conversational pairs (a system character card, a user turn; a `topic` column, even/odd).
    Trained once for the module, on one intra-op thread; the tests only read it."""
    out = tmp_path_factory.mktemp("cli") / "rm"
    data = Path(tiny_paths["pairs"])
    assert len(load_preferences(data)) == PAIRS
    argv = ["train-rm", "--model", tiny_paths["model"], "--data", str(data), "--output", str(out), "--margin", "ld"]
    argv += ["--max-length", "48", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3", "--dev-fraction", "0.3"]
    argv += ["--subset-field", "topic", "--no-progress"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return out, data


def test_stages_register_their_subcommands():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train-rm", "eval-rm", "demo"} <= set(commands)
    args = parser.parse_args(["train-rm", "--model", "m", "--data", "d", "--output", "o", "--margin", "bt"])
    assert args.margin == "bt" and args.func is not None and args.detach_margin is True
    with pytest.raises(SystemExit):
        parser.parse_args(["train-rm", "--model", "m", "--data", "d", "--output", "o", "--margin", "huge"])


def test_train_rm_writes_model_metrics_and_summary(trained):
    out, _ = trained
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["margin"] == "ld"
    assert set(summary["eval"]["subsets"]) <= {"even", "odd"}


def test_eval_rm_json_on_stdout(trained, capsys):
    out, data = trained
    code = cli.main(["eval-rm", "--model", str(out), "--data", str(data), "--subset-field", "topic", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout holds exactly one JSON object
    assert 0.0 <= report["accuracy"] <= 1.0 and report["num_pairs"] == PAIRS
    assert set(report["subsets"]) == {"even", "odd"}
    assert sum(s["num_pairs"] for s in report["subsets"].values()) == PAIRS
    assert "length_baseline" in report and all("length_baseline" in s for s in report["subsets"].values())
    assert report["max_length"] == 48  # the training max length is the default
    assert {"mean", "std", "median", "p10", "p90"} <= set(report["reward_gap"])
    # --dev-fraction evaluates exactly the pairs train-rm held out.
    cli.main(["eval-rm", "--model", str(out), "--data", str(data), "--dev-fraction", "0.3", "--json"])
    dev = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert dev["num_pairs"] == summary["dev_pairs"]
    assert dev["accuracy"] == pytest.approx(summary["eval"]["accuracy"])


def test_eval_rm_text_report(trained, capsys):
    out, data = trained
    assert cli.main(["eval-rm", "--model", str(out), "--data", str(data), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "length baseline" in text and "reward gap" in text


def test_module_entry_point_in_a_subprocess(trained):
    out, data = trained
    result = subprocess.run(
        [sys.executable, "-m", "aam_fast", "eval-rm", "--model", str(out), "--data", str(data), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(out.parent)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["num_pairs"] == PAIRS
    assert result.stdout.count("\n") == 1  # nothing but the JSON line on stdout


def test_bad_data_file_is_a_clear_error(trained, tmp_path, capsys):
    out, _ = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    assert cli.main(["eval-rm", "--model", str(out), "--data", str(bad), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{bad}: record 0: missing field 'rejected'" in captured.err


def test_demo_data_ships_and_the_demo_config_is_valid(tmp_path):
    path = demo_data_path()
    assert path.is_file(), "aam_fast/demo/roleplay_pairs.jsonl must ship as package data"
    data = load_preferences(path, subset_field="kind")
    assert len(data) >= 120 and all(p.prompt[0]["role"] == "system" for p in data.pairs)
    cfg = demo_config(tmp_path / "model", tmp_path / "out")
    cfg.validate()
    assert cfg.margin == "pr" and cfg.trainable_layers and cfg.cache_trunk
    train, dev = split_by_prompt(data.pairs, cfg.dev_fraction)
    assert len(dev) >= 20 and len(train) >= 80


def _subcommands(parser):
    return parser._subparsers._group_actions[0].choices


@pytest.mark.parametrize("command", ["train-rm", "eval-rm", "train-grpo", "demo", "demo-grpo"])
def test_every_flag_shows_its_meaning_and_default(command):
    parser = _subcommands(cli.build_parser())[command]
    formatter = parser.formatter_class(command)
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings} has no help"
        if not action.required and "(required" not in action.help:  # required: a flag or a --config key
            assert "(default" in formatter._get_help_string(action), f"{command} {action.option_strings}: no default"


def test_a_flag_of_both_stages_is_one_field():
    from aam_fast.stages.grpo.config import GRPOConfig
    from aam_fast.stages.rm.config import RMConfig
    from aam_fast.training.config import TrainingConfig

    commands = _subcommands(cli.build_parser())
    shared = {f.name for f in __import__("dataclasses").fields(TrainingConfig)}
    for stage, config in (("train-rm", RMConfig), ("train-grpo", GRPOConfig)):
        assert issubclass(config, TrainingConfig)
        dests = {a.dest for a in commands[stage]._actions}
        assert shared <= dests, f"{stage} lacks {shared - dests}"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-grad-norm", "-1", "--max-grad-norm must be >= 0.0, got -1.0"),
        ("--score-lr", "-1", "--score-lr must be > 0.0"),
        ("--save-every", "-1", "--save-every must be >= 0"),
        ("--eval-every", "-1", "--eval-every must be >= 0"),
        ("--dev-fraction", "-0.5", "--dev-fraction must be >= 0.0 and < 1.0"),
        ("--max-pairs", "0", "--max-pairs must be >= 1"),
        ("--lr", "nan", "--lr must be > 0.0"),
    ],
)
def test_a_flag_out_of_range_is_one_line_exit_2(flag, value, message, tmp_path, capsys):
    argv = ["train-rm", "--model", "m", "--data", "d", "--output", str(tmp_path / "o"), flag, value]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_eval_rm_batch_size_out_of_range(tmp_path, capsys):
    assert cli.main(["eval-rm", "--model", "m", "--data", "d", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_bad_paths_and_devices_are_one_line_errors(tiny_paths, tmp_path, capsys):
    """Each of these used to end in a traceback (or a misleading hub error); now one line naming what is wrong."""
    model = tiny_paths["model"]
    cases = [
        (["train-rm", "--model", model, "--data", tiny_paths["hh"], "--output", str(tmp_path / "a"), "--device",
          "cuda"], "--device cuda: CUDA is not available"),
        (["train-rm", "--model", str(tmp_path / "missing"), "--data", tiny_paths["hh"], "--output",
          str(tmp_path / "b")], "no such folder"),
        (["eval-rm", "--model", model, "--data", tiny_paths["hh"]], "not a reward model"),
        (["train-grpo", "--policy", str(tmp_path / "missing"), "--prompts", tiny_paths["cards"], "--reward-fn",
          "math:sqrt", "--output", str(tmp_path / "c")], "--policy"),
        (["train-grpo", "--policy", model, "--prompts", tiny_paths["cards"], "--reward-model",
          str(tmp_path / "no-rm"), "--output", str(tmp_path / "d")], "no such folder"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)

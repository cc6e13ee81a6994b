"""`--config FILE`: YAML or JSON settings keyed by field name or flag spelling, converted and checked exactly as the
flags are (one line naming the file and key, exit 2); flags given on the command line override the file; the resolved
config saved as OUTPUT/config.yaml runs the same run again."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from aam_fast import cli
from aam_fast.stages.grpo.config import GRPOConfig
from aam_fast.stages.rm import cli as rm_cli
from aam_fast.stages.rm.compare.config import CompareConfig
from aam_fast.stages.rm.config import RMConfig
from aam_fast.stages.rm.evaluate import EvalConfig
from aam_fast.training.config_file import config_text, read_config_file, save_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def captured_train_rm(monkeypatch):
    """`aam-fast train-rm` resolving its config and stopping there: the RMConfig it would train with."""
    seen = []
    monkeypatch.setattr(rm_cli, "train_reward_model", seen.append)
    return seen


def test_file_values_and_flag_overrides(tmp_path, captured_train_rm):
    """`train-rm --config run.yaml --lr 2e-5`: the file's values, the flag's override, defaults for the rest. A flag
    given with its default value still overrides the file (margin pr, --no-packing)."""
    run = tmp_path / "run.yaml"
    run.write_text(
        "model: m\ndata: d.jsonl\noutput: out\n"
        "lr: 1e-3            # PyYAML reads this as text; it goes through the flag's float()\n"
        "max-grad-norm: 0.5  # the flag spelling\n"
        "margin: ld\npacking: true\nreport_to: tensorboard   # one value for a list flag\n"
        "lora_target_modules: [q_proj, v_proj]\neval_data: none\nmax_steps: null\n"
    )
    assert cli.main(["train-rm", "--config", str(run), "--lr", "2e-5", "--margin", "pr", "--no-packing"]) == 0
    (cfg,) = captured_train_rm
    assert (cfg.model, cfg.data, cfg.output) == ("m", "d.jsonl", "out")
    assert cfg.lr == 2e-5 and cfg.max_grad_norm == 0.5
    assert cfg.margin == "pr" and cfg.packing is False
    assert cfg.report_to == ["tensorboard"] and cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.eval_data is None and cfg.max_steps is None
    assert cfg.batch_size == RMConfig.__dataclass_fields__["batch_size"].default


def test_json_and_repeated_flags(tmp_path):
    """GRPO from a JSON file: --reward-fn is repeatable; given on the command line it replaces the file's list."""
    run = tmp_path / "run.json"
    settings = {"policy": "p", "prompts": "c.jsonl", "reward-fn": ["a:f", "b:g"], "reward_weights": [1, 0.5]}
    run.write_text(json.dumps(settings))
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    args = commands["train-grpo"].parse_args(["--config", str(run)])
    cfg = cli_config(GRPOConfig, args)
    assert cfg.reward_fns == ["a:f", "b:g"] and cfg.reward_weights == [1.0, 0.5] and cfg.policy == "p"
    args = commands["train-grpo"].parse_args(["--config", str(run), "--reward-fn", "c:h", "--reward-weights", "2"])
    cfg = cli_config(GRPOConfig, args)
    assert cfg.reward_fns == ["c:h"] and cfg.reward_weights == [2.0]
    args = commands["train-grpo"].parse_args(["--policy", "p", "--prompts", "c.jsonl"])
    assert cli_config(GRPOConfig, args).reward_fns == []  # no flag, no file: the field's default


def cli_config(config_class, args):
    from aam_fast.training.config import config_from_args

    return config_from_args(config_class, args)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("lr_shedule: linear\n", "unknown key 'lr_shedule' (did you mean lr_schedule?)"),
        ("margin: huge\n", "margin: must be one of bt, fixed, pr, ld, got 'huge'"),
        ("max_grad_norm: -1\n", "max_grad_norm: must be >= 0.0, got -1.0"),
        ("lr: .nan\n", "lr: must be > 0.0 and <= 1.0, got nan"),
        ("lr: fast\n", "lr: must be a number, got 'fast'"),
        ("batch_size: 2.5\n", "batch_size: must be an integer, got 2.5"),
        ("batch_size: true\n", "batch_size: must be an integer, got True"),
        ("packing: 'yes'\n", "packing: must be true or false, got 'yes'"),
        ("data_split: 7\n", "data_split: must be text (quote it), got 7"),
        ("model: null\n", "model: needs a value, not null"),
        ("report_to: []\n", "report_to: needs at least one value"),
        ("report_to: [jsonl, csv]\n", "report_to: must be one of jsonl, tensorboard"),
        ("lr: [1, 2]\n", "lr: must be a single value, got a list"),
        ("lr: 1e-3\nlr: 2e-3\n", "key 'lr' given twice (line 2)"),
        ("max_grad_norm: 1\nmax-grad-norm: 2\n", "max-grad-norm: sets max_grad_norm a second time"),
        ("- lr\n", "must hold settings as 'key: value' lines, got a list"),
        ("lr: [1\n", "not valid YAML"),
        ("overwrite: maybe\n", "overwrite: must be true or false, got 'maybe'"),
    ],
)
def test_a_bad_file_value_is_one_line_naming_file_and_key(content, message, tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text(content)
    argv = ["train-rm", "--model", "m", "--data", "d", "--output", str(tmp_path / "o"), "--config", str(run)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{run}: {message}" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("run.json", '{"lr": 1e-3, "lr": 2e-3}', "key 'lr' given twice"),
        ("run.json", '{"lr": ', "not valid JSON"),
        ("run.toml", "lr = 1", "must be a .yaml, .yml or .json file"),
        ("absent.yaml", None, "no such file"),
    ],
)
def test_bad_config_files(name, content, message, tmp_path, capsys):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert cli.main(["eval-rm", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and err.count("\n") == 1


def test_required_settings_come_from_flags_or_the_file(tmp_path, capsys, captured_train_rm):
    assert cli.main(["train-rm", "--data", "d"]) == 2
    assert "the following arguments are required: --output, --model (as flags or keys of --config FILE)" in (
        capsys.readouterr().err
    )
    run = tmp_path / "run.yml"
    run.write_text("model: m\n")
    assert cli.main(["train-rm", "--config", str(run), "--data", "d", "--output", "o"]) == 0
    assert captured_train_rm[0].model == "m"


def _non_defaults(config_class) -> dict:
    """A value other than the default for every option of ``config_class`` that has an obvious one."""
    changed = {}
    for field in dataclasses.fields(config_class):
        if "help" not in field.metadata or field.name == "overwrite":
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            changed[field.name] = not default
        elif isinstance(default, float):
            changed[field.name] = default / 3 + 0.1  # not a short decimal: the YAML must keep every bit
        elif isinstance(default, int):
            changed[field.name] = default + 3
    return changed


@pytest.mark.parametrize("config_class", [RMConfig, GRPOConfig, CompareConfig, EvalConfig])
def test_the_saved_config_reads_back_equal(config_class, tmp_path):
    required = {"model": "m", "data": "d", "output": "o", "policy": "p", "prompts": "c.jsonl"}
    names = {f.name for f in dataclasses.fields(config_class)}
    values = {k: v for k, v in required.items() if k in names} | _non_defaults(config_class)
    if "report_to" in names:
        values.update(report_to=["jsonl", "tensorboard"], lora_target_modules=["q_proj"], data_split="r: x #1")
    if "opening_turn" in names:
        values.update(opening_turn="你好, 'friend'\n-- yes", reward_fns=["m:f"])
    if "gamma" in names:
        values.update(gamma=-1 / 3)  # no bounds but finiteness: a negative value reads back too
    cfg = config_class(**values)
    path = save_config(cfg, tmp_path)
    assert path == tmp_path / "config.yaml" and not list(tmp_path.glob("*.partial"))
    again = config_class(**read_config_file(config_class, path))
    expected = dataclasses.replace(cfg, overwrite=False) if "overwrite" in names else cfg
    assert again == expected


def test_overwrite_and_python_objects_are_left_out_with_a_reason():
    cfg = GRPOConfig(policy="p", prompts=[{"prompt": "hi"}], reward_fns=[len], overwrite=True)
    text = config_text(cfg)
    assert "# not saved: overwrite: give --overwrite again" in text
    assert "# not saved: prompts: given from Python as a list" in text and "give --prompts" in text
    assert "# not saved: reward_fns:" in text and "give --reward-fn" in text
    keys = {line.split(":")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert not {"prompts", "reward_fns", "overwrite"} & keys and "policy" in keys


def _train_rm(argv):
    assert cli.main(["train-rm", *argv, "--no-progress"]) == 0


def test_the_saved_config_reproduces_the_run(tiny_paths, tmp_path):
    """A tiny train-rm run, then `--config FIRST/config.yaml --output SECOND`: the same metrics and weights."""
    first, second = tmp_path / "first", tmp_path / "second"
    _train_rm(
        ["--model", tiny_paths["model"], "--data", tiny_paths["pairs"], "--output", str(first), "--margin", "ld"]
        + ["--max-length", "48", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3", "--dev-fraction", "0.3"]
        + ["--lora-r", "2", "--lora-target-modules", "q_proj", "v_proj", "--trainable-layers", "1", "--seed", "7"]
    )
    saved = (first / "config.yaml").read_text()
    assert "lora_target_modules: [q_proj, v_proj]" in saved and "seed: 7" in saved
    _train_rm(["--config", str(first / "config.yaml"), "--output", str(second)])
    assert read_config_file(RMConfig, second / "config.yaml") == {
        **read_config_file(RMConfig, first / "config.yaml"),
        "output": str(second),
    }

    def metrics(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if "second" not in k and "time" not in k} for row in rows]

    assert metrics(first) == metrics(second) and len(metrics(first)) >= 3
    weights = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])

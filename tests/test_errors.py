"""Every failure is one line: the error boundary of ``aam-fast`` (exit 2 for bad input, 1 for the rest, ``--debug``
for the traceback), every number flag and loss argument finite and in range, and the tracebacks and silent wrong
results a new user found, each run in-process through ``aam_fast.cli.main`` or the Python API."""

from __future__ import annotations

import argparse
import errno
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from aam_fast import AAMLoss, GRPOLoss, aam_loss, cli, grpo_loss, linear_logprobs
from aam_fast.data import load_preferences, load_prompts
from aam_fast.errors import describe_failure
from aam_fast.modeling import RewardModel, load_causal_lm, load_tokenizer, save_reward_model
from aam_fast.stages.rm.config import RMConfig
from aam_fast.testing import write_jsonl
from aam_fast.training import launch as launch_module

pytestmark = pytest.mark.usefixtures("single_thread")

HUGE = int("9" * 400)  # a 400-digit integer: out of float range


def run(capsys, *argv) -> tuple[int, str]:
    """``aam-fast argv`` in this process: its exit code and its one error line (asserting there is exactly one,
    and no traceback)."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return code, lines[0]


def train_rm(tiny_paths, output, *extra) -> list[str]:
    return [
        "train-rm",
        "--model",
        tiny_paths["model"],
        "--data",
        tiny_paths["pairs"],
        "--output",
        output,
        "--max-length",
        "48",
        "--max-steps",
        "1",
        "--no-progress",
        *extra,
    ]


def train_grpo(tiny_paths, output, *extra) -> list[str]:
    return [
        "train-grpo",
        "--policy",
        tiny_paths["model"],
        "--prompts",
        tiny_paths["cards"],
        "--output",
        output,
        "--max-prompts",
        "2",
        "--batch-size",
        "1",
        "--num-generations",
        "2",
        "--max-new-tokens",
        "3",
        "--max-prompt-length",
        "64",
        "--beta",
        "0",
        "--max-steps",
        "1",
        "--no-progress",
        *extra,
    ]


# -- flags: finite, in range, named ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--margin", "pr", "--gamma", "inf"], "--gamma must be a finite number, got inf"),
        (["--margin", "ld", "--gamma", "nan"], "--gamma must be a finite number, got nan"),
        (["--margin", "pr", "--gamma", "-inf"], "--gamma must be a finite number, got -inf"),
        (["--beta", "inf"], "--beta must be >= 0.0, got inf"),
        (["--margin-clip", "inf"], "--margin-clip must be > 0.0, got inf"),
        (["--sft-weight", "nan"], "--sft-weight must be >= 0.0, got nan"),
        (["--lr", "-1e-3"], "--lr must be > 0.0 and <= 1.0, got -0.001"),
        (["--lr", "-inf"], "--lr must be > 0.0 and <= 1.0, got -inf"),
        (["--weight-decay", "-.5"], "--weight-decay must be >= 0.0, got -0.5"),
        (["--seed", str(2**64)], f"--seed must be >= 0 and <= {2**32 - 1}, got {2**64}"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--threads", "100000"], "--threads must be >= 1 and <= "),
        # the fresh probe: counts that ran for ever or hung before the first step, numbers that overflowed float32
        (["--max-steps", str(10**23)], f"--max-steps must be >= 1 and <= 1000000000, got {10**23}"),
        (["--epochs", "1e300"], "--epochs must be > 0.0 and <= 1000000000, got 1e+300"),
        (["--grad-accum", str(10**12)], "--grad-accum must be >= 1 and <= 4096"),
        (["--lr", "1e300"], "--lr must be > 0.0 and <= 1.0, got 1e+300"),
        (["--score-lr", "2"], "--score-lr must be > 0.0 and <= 1.0, got 2.0"),
        (["--output", ""], "--output is empty: name the run's folder"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_train_rm_flag_out_of_range_is_one_line_naming_it(capsys, tmp_path, extra, expected):
    code, line = run(capsys, "train-rm", "--model", "m", "--data", "d", "--output", tmp_path / "o", *extra)
    assert code == 2
    assert line.startswith("aam-fast train-rm: error: ") and expected in line
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--reward-weights", "nan"], "--reward-weights must be a finite number, got nan"),
        (["--reward-weights", "inf"], "--reward-weights must be a finite number, got inf"),
        (["--temperature", "inf"], "--temperature must be > 0.0, got inf"),
        (["--epsilon", "nan"], "--epsilon must be >= 0.0 and <= 1000000.0, got nan"),
        (["--seed", str(2**64)], "--seed must be >= 0 and <= "),
        # the fresh probe: counts that hung before the first step, clip ranges that overflowed float32
        (["--num-generations", str(10**23)], "--num-generations must be >= 2 and <= 1024"),
        (["--max-steps", str(10**23)], "--max-steps must be >= 1 and <= 1000000000"),
        (["--dynamic-sampling", "--max-resample-rounds", str(10**12)], "--max-resample-rounds must be >= 0 and <= 100"),
        (["--epsilon-high", "1e308"], "--epsilon-high must be >= 0.0 and <= 1000000.0, got 1e+308"),
        (["--delta", "1e308"], "--delta must be > 1.0 and <= 1000000.0, got 1e+308"),
        (["--lr", "10"], "--lr must be > 0.0 and <= 1.0, got 10.0"),
        (["--output", " "], "--output is empty"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_train_grpo_flag_out_of_range_is_one_line_naming_it(capsys, tmp_path, extra, expected):
    argv = ["train-grpo", "--policy", "p", "--prompts", "c.jsonl", "--reward-fn", "m:f", "--output", tmp_path / "o"]
    code, line = run(capsys, *argv, *extra)
    assert code == 2 and line.startswith("aam-fast train-grpo: error: ") and expected in line


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--gammas", "inf"], "--gammas must be a finite number, got inf"),
        (["--gammas", "0", "nan"], "--gammas must be a finite number, got nan"),
        (["--betas", "0.1", "0.1000001"], "two variants would both be named pr-beta0.1"),
        (["--gammas", "1", "1.0000001"], "two variants would both be named pr-gamma1"),
        (["--trunk-memory-gb", "inf"], "--trunk-memory-gb must be > 0.0, got inf"),
        (["--bootstrap", str(10**12)], "--bootstrap must be >= 100 and <= 100000"),  # an allocation failure before
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_compare_sweeps_are_finite_and_their_names_unique(capsys, tmp_path, extra, expected):
    argv = ["compare", "--model", "m", "--data", "d", "--output", tmp_path / "o", "--trainable-layers", "1"]
    code, line = run(capsys, *argv, "--margins", "pr", *extra)
    assert code == 2 and expected in line


def test_distinct_sweep_values_still_make_distinct_variants():
    from aam_fast.stages.rm.compare.config import CompareConfig, expand_variants

    cfg = CompareConfig(model="m", data="d", output="o", trainable_layers=1, margins=["pr"], betas=[0.1, 0.1001])
    cfg.validate()
    assert [v.name for v in expand_variants(cfg)] == ["pr-beta0.1", "pr-beta0.1001"]


def test_config_file_values_get_the_same_number_check(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("gamma: .inf\nmargin: pr\n")
    code, line = run(capsys, "train-rm", "--config", config, "--model", "m", "--data", "d", "--output", tmp_path / "o")
    assert code == 2 and "gamma: must be a finite number, got inf" in line


# -- the error boundary -------------------------------------------------------------------------------------------


def _failing_command(monkeypatch, exc: BaseException) -> None:
    """Make ``eval-rm`` raise ``exc`` (the real parser, the real boundary)."""
    real = cli.build_parser

    def build():
        parser = real()
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]

        def boom(args):
            raise exc

        sub.choices["eval-rm"].set_defaults(func=boom)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)


@pytest.mark.parametrize(
    ("exc", "code", "expected"),
    [
        (ValueError("--data x.jsonl: record 3: bad"), 2, "error: --data x.jsonl: record 3: bad"),
        (OSError(errno.EFBIG, "File too large", "o/model.safetensors"), 1, "o/model.safetensors: the file-size limit"),
        (OSError(errno.ENOSPC, "No space left on device", "o/x"), 1, "o/x: the disk is full"),
        (OSError(errno.EROFS, "Read-only file system", "o/metrics.jsonl"), 1, "o/metrics.jsonl: the file system is"),
        (PermissionError(errno.EACCES, "Permission denied", "o/a"), 1, "o/a: permission denied"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "d.jsonl"), 1, "d.jsonl: no such file"),
        (RuntimeError("boom\nsecond line"), 1, "unexpected RuntimeError: boom | second line -- this is a bug"),
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried"),
            1,
            "error: out of memory: lower --batch-size",
        ),
        (MemoryError(), 1, "error: out of memory"),
        (KeyError("x"), 1, "run again with --debug for the traceback"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
def test_every_failure_is_one_line_with_its_exit_code(capsys, monkeypatch, exc, code, expected):
    _failing_command(monkeypatch, exc)
    got, line = run(capsys, "eval-rm", "--model", "m", "--data", "d")
    assert got == code and line.startswith("aam-fast eval-rm: error: ") and expected in line


def test_damaged_files_read_as_one_line(tmp_path):
    from safetensors import SafetensorError

    code, line = describe_failure(SafetensorError("Error while deserializing header: HeaderTooLarge"))
    assert code == 1 and line.startswith("a damaged safetensors file (Error while deserializing header")
    code, line = describe_failure(SafetensorError("Error while serializing: I/O error: File too large (os error 27)"))
    assert code == 1 and line.startswith("writing a safetensors file failed") and "ulimit -f" in line
    code, line = describe_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
    assert code == 1 and line.startswith("a torch file could not be written or read")
    (tmp_path / "optimizer.pt").write_bytes(b"not a zip" * 10)
    with pytest.raises(Exception) as caught:
        torch.load(tmp_path / "optimizer.pt", weights_only=True)
    code, line = describe_failure(caught.value)
    assert code == 1 and line == "a damaged or refused pickle file: Weights only load failed"


@pytest.mark.parametrize(
    "content",
    [
        b"root:x:0:0:root:/root:/bin/bash\n",  # IndexError (a text file, or a link to one, as rank0.pt)
        b"\x80\x02J",  # struct.error
        b"\x80\x02c\xba8\xcb2p\xf04\x96\xb5\x0c\xe7c\x08;\xa2",  # UnicodeDecodeError
        b"\x80\x02j\x1b\x19\x8f\xe8{yV\xd7\xcc",  # KeyError
    ],
    ids=["text", "struct-error", "unicode-error", "key-error"],
)
def test_a_checkpoint_file_that_is_no_torch_file_names_it(tmp_path, content):
    """A non-zip file is read as a legacy pickle, which failed in ways the boundary took for a bug in aam-fast
    (the fresh probe: rank0.pt linked to /etc/passwd was an "unexpected IndexError")."""
    from aam_fast.training.checkpoints import load_tensors

    path = tmp_path / "rank0.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}: damaged, missing or not this run's checkpoint file")):
        load_tensors(path)


def test_a_chat_template_that_fails_names_the_model_folder(tiny_paths, tmp_path, capsys):
    """A template the jinja sandbox refuses was an "unexpected SecurityError"; the sandbox still holds."""
    model = tmp_path / "model"
    shutil.copytree(tiny_paths["model"], model)
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (model / "chat_template.jinja").write_text(escape)
    argv = train_rm(tiny_paths, tmp_path / "o")
    argv[argv.index("--model") + 1] = str(model)
    code, line = run(capsys, *argv)
    assert code == 2 and f"{model}: its chat template failed (SecurityError: access to attribute '__class__'" in line
    assert "record" in line or "#0" in line


def test_a_file_size_limit_while_saving_is_one_line(tiny_paths, tmp_path, capsys):
    """The real limit (``ulimit -f``), in this process for the length of one tiny run: the export fails to write."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        code, line = run(capsys, *train_rm(tiny_paths, tmp_path / "o"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 1 and "the file-size limit was reached (raise it: ulimit -f)" in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(capsys, monkeypatch, where):
    _failing_command(monkeypatch, RuntimeError("boom"))
    argv = ["eval-rm", "--model", "m", "--data", "d"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(argv)


def test_each_rank_prints_its_own_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, line = run(capsys, "train-rm", "--model", "m", "--data", "d", "--output", tmp_path, "--gamma", "inf")
    assert code == 2 and line.startswith("aam-fast train-rm (rank 1): error: --gamma")


def test_unwritable_output_is_found_before_the_setup(capsys, monkeypatch, tmp_path, tiny_paths):
    """A read-only --output (simulated: the tests may run as root, whom permissions do not stop) fails at the probe
    in launch, before the model is loaded or the data tokenised."""
    calls = []

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(launch_module.tempfile, "mkstemp", read_only)
    monkeypatch.setattr("aam_fast.stages.rm.setup.load_causal_lm", lambda *a, **k: calls.append(a))
    code, line = run(capsys, *train_rm(tiny_paths, tmp_path / "o"))
    assert code == 1 and f"--output {tmp_path / 'o'}: the file system is read-only" in line
    assert calls == []


def test_fsdp2_in_one_process_says_it_has_no_effect(logged, tmp_path):
    cfg = RMConfig(model="m", data="d", output=str(tmp_path / "o"), strategy="fsdp2", device="cpu")
    run_ = launch_module.launch(cfg)
    run_.ctx.close()
    assert logged.count(r"--strategy fsdp2 has no effect in one process") == 1


# -- data: the record named, never a traceback --------------------------------------------------------------------


def test_a_huge_margin_is_a_record_error(tmp_path, tiny_paths):
    """A 400-digit margin (an OverflowError before) is a bad record: named, or skipped under skip_invalid (as
    train-rm and eval-rm read their pairs)."""
    records = [json.loads(line) for line in Path(tiny_paths["pairs"]).read_text().splitlines()]
    records[2]["margin"] = HUGE
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(ValueError, match=r"record 2: 'margin' must be a finite number, got 9999"):
        load_preferences(path)
    assert len(load_preferences(path, skip_invalid=True)) == len(records) - 1


def test_a_huge_margin_through_the_cli(tmp_path, capsys, tiny_paths):
    records = [json.loads(line) for line in Path(tiny_paths["pairs"]).read_text().splitlines()]
    records[2]["margin"] = HUGE
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    argv = train_rm(tiny_paths, tmp_path / "o")
    argv[argv.index("--data") + 1] = str(path)
    code, line = run(capsys, *argv, "--margin", "fixed")
    assert code == 2 and "record 2" in line and "'margin' must be a finite number" in line


@pytest.mark.parametrize("margin", [-1e300, 1e39], ids=["-1e300", "1e39"])
def test_a_margin_beyond_float32_is_a_record_error(tmp_path, tiny_paths, margin):
    """A finite float64 beyond float32's range became +-inf in the loss: -1e300 trained on a loss of 0 without a
    word (the fresh probe); now a bad record, named, or skipped under skip_invalid."""
    records = [json.loads(line) for line in Path(tiny_paths["pairs"]).read_text().splitlines()]
    records[2]["margin"] = margin
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    expected = re.escape(f"record 2: 'margin' must be a finite number, got {margin!r} (beyond float32's")
    with pytest.raises(ValueError, match=expected):
        load_preferences(path)
    assert len(load_preferences(path, skip_invalid=True)) == len(records) - 1
    records[2]["margin"] = 3e38  # within float32: kept
    assert len(load_preferences(write_jsonl(tmp_path / "ok.jsonl", records))) == len(records)


def test_a_lone_surrogate_names_the_file_and_record(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "x\\ud800", "chosen": "a", "rejected": "b"}\n'
    )
    with pytest.raises(
        ValueError, match=r"pairs.jsonl: record 1: prompt holds a lone surrogate '\\ud800' at character 1"
    ):
        load_preferences(pairs)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": [{"role": "user", "content": "\\udfff"}]}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl: record 1: prompt\[0\] holds a lone surrogate"):
        load_prompts(prompts)


def test_an_rpbench_card_id_must_be_text_or_an_integer(tmp_path, tiny_paths, capsys):
    cards = [json.loads(line) for line in Path(tiny_paths["cards"]).read_text().splitlines()]
    cards[1]["id"] = [0]
    path = write_jsonl(tmp_path / "cards.jsonl", cards)
    with pytest.raises(ValueError, match=r"cards.jsonl: record 1: 'id' must be text or an integer, got \[0\]"):
        load_prompts(path)
    with pytest.raises(ValueError, match=r"record 1: 'id' must be text or an integer"):
        load_prompts(path, scenes=tiny_paths["scenes"])
    argv = train_grpo(tiny_paths, tmp_path / "o", "--reward-fn", "math:fsum")
    argv[argv.index("--prompts") + 1] = str(path)
    code, line = run(capsys, *argv)
    assert code == 2 and "record 1: 'id' must be text or an integer" in line


# -- model folders ------------------------------------------------------------------------------------------------


@pytest.fixture
def reward_model_dir(tiny_paths, tmp_path) -> Path:
    """A reward model folder as train-rm writes it (the tiny Llama, an untrained score head)."""
    lm = load_causal_lm(tiny_paths["model"])
    folder = save_reward_model(RewardModel(lm), load_tokenizer(tiny_paths["model"]), tmp_path / "rm")
    return folder


def test_a_weight_map_outside_the_model_folder_is_refused_before_opening(tiny_paths, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_paths["model"], model)
    (model / "model.safetensors").rename(tmp_path / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=r"weight_map\['model.embed_tokens.weight'\] = '../outside.safetensors' is not"
    ):
        load_causal_lm(model)
    argv = train_rm(tiny_paths, tmp_path / "o")
    argv[argv.index("--model") + 1] = str(model)
    code, line = run(capsys, *argv)
    assert code == 2 and "is not a file inside the model folder" in line


@pytest.mark.parametrize("damage", ["truncated", "huge-header"])
def test_a_damaged_safetensors_file_in_the_model_folder_names_it(tiny_paths, tmp_path, capsys, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_paths["model"], model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes((2**60).to_bytes(8, "little") + data[8:])
    argv = train_rm(tiny_paths, tmp_path / "o")
    argv[argv.index("--model") + 1] = str(model)
    code, line = run(capsys, *argv)
    assert code == 2 and f"model {model}: cannot be loaded" in line


def test_eval_rm_skips_a_huge_margin_under_skip_invalid(reward_model_dir, tiny_paths, tmp_path, capsys):
    records = [json.loads(line) for line in Path(tiny_paths["pairs"]).read_text().splitlines()]
    records[2]["margin"] = HUGE
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    argv = ["eval-rm", "--model", reward_model_dir, "--data", path, "--no-progress", "--json"]
    assert cli.main([str(a) for a in [*argv, "--skip-invalid"]]) == 0
    assert "Traceback" not in capsys.readouterr().err
    code, line = run(capsys, *argv)
    assert code == 2 and "record 2: 'margin' must be a finite number" in line


def test_an_unknown_causal_lm_architecture_is_refused(reward_model_dir, tiny_paths, capsys):
    meta = reward_model_dir / "aam_fast.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "causal_lm_architecture": "pipeline"}))
    code, line = run(capsys, "eval-rm", "--model", reward_model_dir, "--data", tiny_paths["pairs"], "--no-progress")
    assert code == 2 and "no causal-LM class known for model_type 'llama' (aam_fast.json names 'pipeline')" in line


def test_eval_lengths_beyond_the_model_positions_are_refused(reward_model_dir, tiny_paths, tmp_path, capsys):
    argv = ["eval-rm", "--model", reward_model_dir, "--data", tiny_paths["pairs"], "--no-progress"]
    code, line = run(capsys, *argv, "--max-length", "100000")
    assert code == 2 and "--max-length 100000 exceeds the model's 512 positions" in line
    grpo = train_grpo(tiny_paths, tmp_path / "o", "--reward-model", reward_model_dir, "--rm-max-length", "100000")
    code, line = run(capsys, *grpo)
    assert code == 2 and "--rm-max-length 100000 exceeds the model's 512 positions" in line


def test_max_new_tokens_within_the_policy_positions(tiny_paths, tmp_path, capsys):
    code, line = run(
        capsys, *train_grpo(tiny_paths, tmp_path / "a", "--reward-fn", "math:fsum"), "--max-new-tokens", "600"
    )
    assert code == 2 and "--max-new-tokens 600 + 1 exceeds the model's 512 positions" in line
    # fits alone, not after the longest prompt: refused at the rollout, naming both flags
    argv = train_grpo(tiny_paths, tmp_path / "b", "--reward-fn", "math:fsum", "--max-new-tokens", "500")
    code, line = run(capsys, *argv)
    assert code == 2 and "--max-new-tokens 500 after a prompt of 64 tokens (--max-prompt-length 64)" in line


def test_remote_code_without_a_reward_model_class_fails_at_load(tiny_paths, monkeypatch, tmp_path, capsys):
    """A model type transformers has no *ForSequenceClassification class for (as remote code has) is refused when
    the model is loaded, not after training, when the export needs it."""
    import transformers.models.auto.modeling_auto as auto

    names = dict(auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    names.pop("llama")
    monkeypatch.setattr(auto, "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", names)
    code, line = run(capsys, *train_rm(tiny_paths, tmp_path / "o"))
    assert code == 2 and "no *ForSequenceClassification class for model_type 'llama'" in line
    assert "could not be saved" in line and not (tmp_path / "o" / "metrics.jsonl").exists()


# -- reward functions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def score(prompts, completions, **kw)\n    return [1.0] * len(prompts)\n", "line 1: syntax error"),
        ("raise RuntimeError('no GPU here')\n", "raised RuntimeError: no GPU here"),
        ("import aam_fast_no_such_module\n", "raised ModuleNotFoundError: No module named 'aam_fast_no_such_module'"),
        (
            "def score(prompts, completions, **kw):\n    return [1.0 / 0 for _ in completions]\n",
            "raised ZeroDivisionError on row 0 of the rollout (prompt '",
        ),
    ],
    ids=["syntax-error", "raises-on-import", "imports-a-missing-module", "raises-when-called"],
)
def test_a_failing_reward_function_is_one_line_naming_it(tiny_paths, tmp_path, capsys, source, expected):
    path = tmp_path / "rewards.py"
    path.write_text(source)
    code, line = run(capsys, *train_grpo(tiny_paths, tmp_path / "o", "--reward-fn", f"{path}:score"))
    assert code == 1 and f"reward function '{path}:score'" in line and expected in line


@pytest.mark.parametrize(
    ("value", "expected"),
    [("10 ** 400", "returned 1000000000000000000000000000000000000..."), ("1e300", "returned 1e+300")],
    ids=["400-digit-int", "beyond-float32"],
)
def test_a_reward_beyond_float32_is_one_line_naming_the_function(tiny_paths, tmp_path, capsys, value, expected):
    """A 400-digit reward was an OverflowError reported as a bug; 1e300 turned into inf in the float32 table."""
    path = tmp_path / "rewards.py"
    path.write_text(f"def score(prompts, completions, **kw):\n    return [{value} for _ in completions]\n")
    code, line = run(capsys, *train_grpo(tiny_paths, tmp_path / "o", "--reward-fn", f"{path}:score"))
    assert code == 2 and "reward function score" in line and expected in line and "for row 0" in line


def test_a_reward_weight_beyond_float32_is_refused(tiny_paths, tmp_path, capsys):
    """--reward-weights 1e300 ran to exit 0 with reward Infinity and reward_std NaN in metrics.jsonl (the probe)."""
    path = tmp_path / "rewards.py"
    path.write_text("def score(prompts, completions, **kw):\n    return [1.0 for _ in completions]\n")
    argv = train_grpo(tiny_paths, tmp_path / "o", "--reward-fn", f"{path}:score", "--reward-weights", "1e300")
    code, line = run(capsys, *argv)
    assert code == 2 and "--reward-weights value 1 must lie within float32's +-3.4e+38" in line and "1e+300" in line
    assert not (tmp_path / "o" / "metrics.jsonl").is_file() or not (tmp_path / "o" / "metrics.jsonl").read_text()


def test_a_lora_rank_beyond_every_layer_is_refused(tiny_paths, tmp_path, capsys):
    """--lora-r 10**9 tried to allocate 256 GB and ended as "unexpected RuntimeError ... a bug" (the probe)."""
    code, line = run(capsys, *train_rm(tiny_paths, tmp_path / "o", "--lora-r", str(10**9)))
    assert code == 2 and f"--lora-r {10**9} exceeds the rank of every targeted layer (at most 64 here)" in line


# -- the API ------------------------------------------------------------------------------------------------------


def _pair_inputs():
    torch.manual_seed(0)
    hidden, weight = torch.randn(4, 5, 8), torch.randn(11, 8)
    targets, rewards = torch.randint(0, 11, (4, 5)), torch.randn(4)
    return hidden, weight, targets, rewards


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(gamma=math.inf), "gamma must be a finite number, got inf"),
        (dict(gamma=math.nan), "gamma must be a finite number, got nan"),
        (dict(beta=math.inf), "beta must be >= 0.0, got inf"),
        (dict(beta=-1.0), "beta must be >= 0.0, got -1.0"),
        (dict(sft_weight=math.nan), "sft_weight must be >= 0.0, got nan"),
        (dict(margin_clip=math.inf), "margin_clip must be > 0.0, got inf"),
        (dict(center_rewards=-0.1), "center_rewards must be >= 0.0"),
        (dict(temperature=math.inf), "temperature must be > 0.0, got inf"),
        (dict(beta="1"), "beta must be a number >= 0.0, got '1'"),
        (dict(gamma=-1e300), "gamma must lie within float32's"),  # the fresh probe: a NaN loss before
        (dict(beta=1e300), "beta must lie within float32's"),  # an inf loss before
    ],
    ids=str,
)
def test_aam_loss_arguments_are_finite_and_in_range(kwargs, expected):
    hidden, weight, targets, rewards = _pair_inputs()
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        aam_loss(hidden, weight, targets, rewards, ref_logps=torch.zeros(4), **kwargs)
    if "temperature" not in kwargs:
        with pytest.raises(ValueError, match=expected):
            AAMLoss(**kwargs)


def test_aam_loss_with_a_finite_gamma_is_unchanged():
    hidden, weight, targets, rewards = _pair_inputs()
    out = aam_loss(hidden, weight, targets, rewards, ref_logps=torch.zeros(4), gamma=2.0)
    assert math.isfinite(out.loss.item()) and out.loss.item() != 0


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(epsilon=math.nan), "epsilon must be >= 0.0 and <= 1000000.0, got nan"),
        (dict(epsilon_high=math.inf), "epsilon_high must be >= 0.0 and <= 1000000.0, got inf"),
        (dict(epsilon_high=1e308), "epsilon_high must be >= 0.0 and <= 1000000.0, got 1e+308"),  # overflowed
        (dict(delta=1e308), "delta must be None or greater than 1 + epsilon_high = 1.2 and at most 1e+06"),
        (dict(beta=math.inf), "beta must be >= 0.0, got inf"),
        (dict(entropy_coef=-1.0), "entropy_coef must be >= 0.0"),
        (dict(beta=1e300), "beta must lie within float32's"),
    ],
    ids=str,
)
def test_grpo_loss_arguments_are_finite_and_in_range(kwargs, expected):
    hidden, weight, targets, _ = _pair_inputs()
    with pytest.raises(ValueError, match=re.escape(expected)):
        grpo_loss(hidden, weight, targets, torch.ones(4), ref_logps=torch.zeros(4, 5), **kwargs)
    with pytest.raises(ValueError, match=re.escape(expected)):
        GRPOLoss(**kwargs)


@pytest.mark.parametrize("name", ["targets", "rewards", "ref_logps", "hidden"])
def test_aam_loss_arguments_that_are_not_tensors_are_refused_by_name(name):
    """A NumPy array or a list (an AttributeError deep in the loss before) is one ValueError naming it."""
    hidden, weight, targets, rewards = _pair_inputs()
    args = dict(hidden=hidden, weight=weight, targets=targets, rewards=rewards, ref_logps=torch.zeros(4))
    args[name] = args[name].numpy() if name == "targets" else args[name].tolist()
    with pytest.raises(ValueError, match=f"{name} must be a torch.Tensor, got"):
        aam_loss(**args)
    if name == "targets":
        with pytest.raises(ValueError, match="targets must be a torch.Tensor, got ndarray"):
            AAMLoss()(hidden, weight, args["targets"], rewards, ref_logps=torch.zeros(4))


@pytest.mark.parametrize("name", ["advantages", "old_logps", "targets"])
def test_grpo_loss_arguments_that_are_not_tensors_are_refused_by_name(name):
    hidden, weight, targets, _ = _pair_inputs()
    args = dict(hidden=hidden, weight=weight, targets=targets, advantages=torch.ones(4), old_logps=torch.zeros(4, 5))
    args[name] = args[name].numpy() if name == "targets" else args[name].tolist()
    with pytest.raises(ValueError, match=f"{name} must be a torch.Tensor, got"):
        grpo_loss(**args)


@pytest.mark.parametrize("shape", [(2, 2), (4, 5), (1, 4)], ids=str)
def test_advantages_of_another_shape_are_refused_with_that_shape(shape):
    """[2, 2] for four rows was flattened and accepted; [4, 5] was reported as "got shape (20,)" (the probe)."""
    hidden, weight, targets, _ = _pair_inputs()
    with pytest.raises(ValueError, match=re.escape(f"advantages must be [B]=[4] (or [B, 1]), got shape {shape}")):
        grpo_loss(hidden, weight, targets, torch.ones(shape))
    assert math.isfinite(grpo_loss(hidden, weight, targets, torch.ones(4, 1)).loss.item())


@pytest.mark.parametrize("length", [0, -3, 2.5, True], ids=str)
def test_a_max_completion_length_that_is_not_a_positive_int_is_refused(length):
    """-3 flipped the Dr. GRPO loss's sign and 2.5 scaled it, without a word (the fresh probe)."""
    hidden, weight, targets, _ = _pair_inputs()
    with pytest.raises(
        ValueError, match=re.escape(f"max_completion_length must be a positive integer or None, got {length!r}")
    ):
        grpo_loss(hidden, weight, targets, torch.ones(4), loss_type="dr_grpo", max_completion_length=length)
    out = grpo_loss(hidden, weight, targets, torch.ones(4), loss_type="dr_grpo", max_completion_length=7)
    assert math.isfinite(out.loss.item())


def test_meta_device_tensors_are_refused_by_name():
    hidden, weight, targets, rewards = _pair_inputs()
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="weight is on the meta device"):
        linear_logprobs(hidden, weight.to(meta), targets)
    with pytest.raises(ValueError, match="rewards is on the meta device"):
        AAMLoss(margin="bt")(None, None, None, rewards.to(meta))
    with pytest.raises(ValueError, match="ref_logps is on the meta device"):
        aam_loss(hidden, weight, targets, rewards, ref_logps=torch.zeros(4, device=meta))
    with pytest.raises(ValueError, match="advantages is on the meta device"):
        GRPOLoss()(hidden, weight, targets, torch.ones(4, device=meta))


def test_a_byte_order_mark_is_read_and_non_utf8_bytes_name_their_line(tmp_path):
    """A JSONL file saved with a UTF-8 BOM was refused as invalid JSON; a Latin-1 byte named only its offset."""
    record = {"prompt": "Hi?", "chosen": "Thank you kindly.", "rejected": "Go away."}
    lines = "\n".join(json.dumps({**record, "prompt": f"Hi {i}?"}) for i in range(3)) + "\n"
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    assert len(load_preferences(tmp_path / "bom.jsonl")) == 3
    (tmp_path / "latin.jsonl").write_bytes(lines.encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(
        ValueError, match=r"latin.jsonl: line 4 is not UTF-8 text: 'utf-8' codec can't decode byte 0xe9"
    ):
        load_preferences(tmp_path / "latin.jsonl")


def test_the_steps_epochs_give_are_bounded_as_max_steps():
    """--epochs within its own bound can still give more than 10**9 steps (here 5 per epoch): refused, not run."""
    from aam_fast.stages.rm.setup import count_steps

    cfg = RMConfig(model="m", data="d", output="o", epochs=1e9)
    with pytest.raises(ValueError, match=r"--epochs 1e\+09 gives 5000000000 optimizer steps, more than 1000000000"):
        count_steps(cfg, n_pairs=20, global_batch=4)
    assert count_steps(RMConfig(model="m", data="d", output="o", epochs=2.0), n_pairs=20, global_batch=4) == (5, 10)

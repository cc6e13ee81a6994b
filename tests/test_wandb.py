"""`--report-to wandb`, offline (WANDB_MODE=offline, the files under tmp_path): the logged metrics and the resolved
config reach the wandb run's history, a resumed run continues the same wandb run id, and without wandb installed the
flag is refused with one line saying how to install it. wandb is an optional extra (`pip install -e .[wandb]`)."""

import importlib.util
import json
import math
import shutil
import struct
import time
from pathlib import Path

import pytest

from aam_fast import cli
from aam_fast.training.metrics import WANDB_RUN_ID_FILE

pytestmark = pytest.mark.usefixtures("single_thread")

needs_wandb = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None,
    reason="wandb is an optional extra (pip install wandb, or -e .[wandb]); not installed here",
)


def wandb_history(run_file: Path) -> tuple[dict, list[dict], bool]:
    """``(config, history rows, whether the exit record is there)`` of an offline run's ``run-ID.wandb`` file:
    wandb's record log (LevelDB's log
    format after a 7-byte ``:W&B`` header: 32 KiB blocks of chunks, each ``crc u32, length u16, type u8``; type 1 a
    whole record, 2/3/4 its first/middle/last piece), each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    pos, record, config, rows, ended = header, b"", {}, [], False
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if kind == 0 or pos + header + length > len(data):  # the end, or a chunk still being written
            break
        chunk, pos = data[pos + header : pos + header + length], pos + header + length
        record = chunk if kind in (1, 2) else record + chunk
        if kind not in (1, 4):
            continue
        parsed = wandb_internal_pb2.Record()
        parsed.ParseFromString(record)
        if parsed.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in parsed.history.item}
            )
        elif parsed.WhichOneof("record_type") == "run":
            config.update({item.key: json.loads(item.value_json) for item in parsed.run.config.update})
        ended |= parsed.WhichOneof("record_type") == "exit"
    return config, rows, ended


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline, every file it writes under tmp_path/wandb-files."""
    folder = tmp_path / "wandb-files"
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "aam-fast-tests")
    monkeypatch.delenv("WANDB_NAME", raising=False)
    folder.mkdir()
    return folder


def offline_runs(folder: Path, run_id: str) -> list[tuple[dict, list[dict]]]:
    """``(config, history)`` of every offline run of ``run_id`` under ``folder``, oldest first. wandb's service may
    still be writing a file when ``finish()`` returns: each is read until it holds its exit record (30 s at most)."""
    paths = sorted(folder.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    deadline = time.monotonic() + 30
    while True:
        runs = [wandb_history(path) for path in paths]
        if all(ended for *_, ended in runs) or time.monotonic() > deadline:
            return [(config, rows) for config, rows, _ in runs]
        time.sleep(0.2)


@needs_wandb
def test_offline_run_holds_the_metrics_and_a_resume_continues_it(tiny_paths, tmp_path, offline_wandb):
    out = tmp_path / "rm"
    argv = ["train-rm", "--model", tiny_paths["model"], "--data", tiny_paths["pairs"], "--output", str(out)]
    argv += ["--max-length", "48", "--batch-size", "4", "--max-steps", "4", "--lr", "1e-3", "--dev-fraction", "0.3"]
    argv += ["--save-every", "2", "--keep-checkpoints", "0", "--report-to", "jsonl", "wandb", "--no-progress"]
    assert cli.main([*argv, "--run-name", "tiny-rm"]) == 0
    run_id = (out / WANDB_RUN_ID_FILE).read_text().strip()
    ((config, history),) = offline_runs(offline_wandb, run_id)
    assert config["lr"] == 1e-3 and config["report_to"] == ["jsonl", "wandb"] and config["run_name"] == "tiny-rm"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [row["step"] for row in logged] == [1, 2, 3, 4, 4]  # 4: final eval
    for row, expected in zip(history, logged, strict=True):
        assert {k: v for k, v in row.items() if not k.startswith("_")} == {
            k: v for k, v in expected.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    shutil.rmtree(out / "checkpoints" / "checkpoint-4")  # as if the run had stopped after step 2's checkpoint
    assert cli.main([*argv, "--run-name", "tiny-rm-resumed", "--resume", "auto"]) == 0
    assert (out / WANDB_RUN_ID_FILE).read_text().strip() == run_id
    first, resumed = offline_runs(offline_wandb, run_id)
    assert [row["step"] for row in resumed[1]] == [3, 4, 4] and resumed[0]["run_name"] == "tiny-rm-resumed"
    assert [row["loss"] for row in resumed[1] if "loss" in row] == [row["loss"] for row in history[2:4]]


def test_wandb_not_installed_is_one_line_saying_pip_install(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    argv = ["train-rm", "--model", "m", "--data", "d", "--output", str(tmp_path / "o"), "--report-to", "wandb"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--report-to wandb needs the wandb package: pip install wandb" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@needs_wandb
def test_the_sinks_get_the_same_values_non_finite_included(tmp_path, offline_wandb, monkeypatch):
    """Without WANDB_DIR the wandb files go under OUTPUT/wandb; a NaN or inf reaches wandb as it reaches the JSONL
    log (no sink filters them); text and None are left to the JSONL log, as TensorBoard leaves them."""
    from aam_fast.stages.rm.config import RMConfig
    from aam_fast.training.metrics import MetricsWriter

    monkeypatch.delenv("WANDB_DIR")
    out = tmp_path / "run"
    out.mkdir()
    cfg = RMConfig(model="m", data="d", output=str(out), report_to=["jsonl", "wandb"])
    writer = MetricsWriter(out, cfg.report_to, None, config=cfg)
    records = [{"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "note": "x", "gap": None, "n": 3}]
    records.append({"step": 2, "loss": 0.5, "grad_norm": 1.0, "n": 4})
    for record in records:
        writer.write(record)
    writer.close()
    run_id = (out / WANDB_RUN_ID_FILE).read_text().strip()
    ((config, history),) = offline_runs(out, run_id)
    assert config["output"] == str(out) and "overwrite" not in config
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in history]
    assert math.isnan(rows[0].pop("loss")) and rows[0] == {"step": 1, "grad_norm": math.inf, "n": 3}
    assert rows[1] == records[1]
    logged = (out / "metrics.jsonl").read_text().splitlines()
    assert "NaN" in logged[0] and "Infinity" in logged[0] and json.loads(logged[1]) == records[1]

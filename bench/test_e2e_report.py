"""bench.e2e.report: the table, the ratios to the TRL case, failed cases, other result shapes, bad input."""

from __future__ import annotations

import json

import pytest

from .e2e.report import load, main, pick_baseline, render_markdown

RM = {
    "device": "Test CPU, 2 cores",
    "date": "2026-12-01",
    "settings": {"model": "/m", "pairs": 32, "steps": 4, "json": "/tmp/x.json", "case": None},
    "results": [
        {"case": "trl-bt", "seconds": 40.0, "setup_seconds": 5.0, "tokens": 4000, "tokens_per_s": 100.0,
         "peak_rss_gib": 8.0, "dev_accuracy": 0.5, "dev_pairs": 64, "trl_eval_accuracy": 0.5},
        {"case": "aam-bt-packing", "seconds": 20.0, "setup_seconds": 2.5, "tokens": 4000, "tokens_per_s": 200.0,
         "peak_rss_gib": 6.0, "dev_accuracy": 0.671875, "dev_pairs": 64},
        {"case": "trl-pr", "error": ["Traceback", "RuntimeError: out of memory"]},
    ],
}  # fmt: skip


def test_rm_table_has_ratios_to_trl_bt():
    text = render_markdown(RM)
    assert "- device: Test CPU, 2 cores" in text and "- date: 2026-12-01" in text
    assert "- settings: model=/m, pairs=32, steps=4" in text  # the output path and the unset case are left out
    assert "| case | train s | setup s | tokens | tokens/s | × trl-bt | peak RSS GiB | × trl-bt |" in text
    assert "| **trl-bt** | 40 | 5 | 4,000 | 100 | 1.00× | 8 | 1.00× | 0.5 | 64 | 0.5 |" in text
    assert "| aam-bt-packing | 20 | 2.5 | 4,000 | 200 | 2.00× | 6 | 0.75× | 0.671875 | 64 |  |" in text
    assert "| trl-pr | failed: Traceback RuntimeError: out of memory |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len({line.count("|") for line in rows}) == 1  # every row has the header's number of cells


def test_other_shapes_and_baselines():
    grpo = {
        "settings": {"steps": 2},
        "results": [
            {"case": "aam-grpo", "seconds_per_step": 3.0, "generation_s": 2.0, "peak_rss_gib": 2.0},
            {"case": "trl-grpo", "seconds_per_step": 6.0, "generation_s": 4.5, "peak_rss_gib": 4.0},
        ],
    }
    text = render_markdown(grpo)
    assert "| case | seconds per step | × trl-grpo | generation s | peak RSS GiB | × trl-grpo |" in text
    assert "| aam-grpo | 3 | 0.50× | 2 | 2 | 0.50× |" in text
    assert "| **aam-grpo** | 3 | 1.00× |" in render_markdown(grpo, baseline="aam-grpo")
    alone = {"settings": {}, "results": [grpo["results"][0]]}
    assert pick_baseline(alone["results"]) is None and "no ratio columns" in render_markdown(alone)
    with pytest.raises(ValueError, match="baseline 'trl-bt' is not a measured case"):
        render_markdown(grpo, baseline="trl-bt")


def test_bad_input_and_the_command_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="no 'settings' dict"):
        render_markdown({"results": []})
    with pytest.raises(ValueError, match="each with a 'case' name"):
        render_markdown({"settings": {}, "results": [{"seconds": 1.0}]})
    with pytest.raises(ValueError, match="not a readable JSON file"):
        load(tmp_path / "missing.json")
    path = tmp_path / "rm.json"
    path.write_text(json.dumps(RM))
    out = tmp_path / "rm.md"
    main([str(path), "--out", str(out)])
    assert capsys.readouterr().out == out.read_text() == render_markdown(RM)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.json")])

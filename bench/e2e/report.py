"""Markdown report of an end-to-end benchmark JSON (bench.e2e.reward_model, bench.e2e.grpo, or any JSON with a
``settings`` dict and a ``results`` list of per-case dicts, each with a ``case`` name).

    python -m bench.e2e.report RESULTS.json [--out REPORT.md] [--baseline CASE]

prints (and with ``--out`` writes) the device, date and note when the JSON has them, the settings, and one table row
per case: every scalar the cases report, in the order they first appear, and beside each throughput (``*_per_s``),
peak memory (``peak_*``) and per-step time (``*_per_step``) its ratio to the baseline case's value: ``--baseline``,
else the first case whose name starts with ``trl`` (TRL's trainer: ``trl-bt`` for the reward-model cases). A case
that failed (an ``error`` entry) gets a row with its error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

LABELS = {
    "seconds": "train s",
    "setup_seconds": "setup s",
    "tokens": "tokens",
    "tokens_per_s": "tokens/s",
    "peak_rss_gib": "peak RSS GiB",
    "dev_accuracy": "dev accuracy",
    "dev_pairs": "dev pairs",
    "trl_eval_accuracy": "TRL eval accuracy",
    "first_loss": "first loss",
    "last_loss": "last loss",
}
HEADER_KEYS = ("device", "date", "note")
# Settings that say where the run's files went, not how it ran.
HIDDEN_SETTINGS = frozenset({"case", "data", "dev", "output", "json", "markdown"})


def is_ratio_key(key: str) -> bool:
    """Whether ``key`` gets a ratio-to-baseline column: throughput, peak memory or time per step."""
    return key.endswith("_per_s") or key.startswith("peak_") or key.endswith("_per_step")


def load(path: str | Path) -> dict[str, Any]:
    """The JSON at ``path``; ValueError unless it has a ``settings`` dict and a ``results`` list of case dicts."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from exc
    check(data, str(path))
    return data


def check(data: Any, source: str = "data") -> None:
    """ValueError naming what is missing from an end-to-end results object."""
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise ValueError(f"{source}: no 'settings' dict; pass the JSON that bench.e2e writes with --json")
    results = data.get("results")
    if not isinstance(results, list) or not all(isinstance(r, dict) and "case" in r for r in results):
        raise ValueError(f"{source}: 'results' must be a list of per-case dicts, each with a 'case' name")


def pick_baseline(results: list[dict[str, Any]], baseline: str | None = None) -> dict[str, Any] | None:
    """The baseline case's result: ``baseline`` by name (ValueError if absent or failed), else the first measured
    case whose name starts with ``trl``, else None."""
    measured = [r for r in results if "error" not in r]
    if baseline is not None:
        found = next((r for r in measured if r["case"] == baseline), None)
        if found is None:
            names = [r["case"] for r in measured]
            raise ValueError(f"baseline {baseline!r} is not a measured case of the results (measured: {names})")
        return found
    return next((r for r in measured if str(r["case"]).startswith("trl")), None)


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value).replace("|", "\\|")


def _ratio(value: Any, base: Any) -> str:
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)) or not base:
        return ""
    return f"{value / base:.2f}×"


def render_markdown(data: dict[str, Any], baseline: str | None = None, title: str | None = None) -> str:
    """The report as markdown text (see the module docstring)."""
    check(data)
    results = data["results"]
    base = pick_baseline(results, baseline)
    lines = [f"# {title or data.get('title') or 'End-to-end benchmark'}", ""]
    for key in HEADER_KEYS:
        if data.get(key):
            lines.append(f"- {key}: {data[key]}")
    settings = {k: v for k, v in data["settings"].items() if k not in HIDDEN_SETTINGS and v is not None}
    if settings:
        lines.append("- settings: " + ", ".join(f"{k}={_format(v)}" for k, v in settings.items()))
    lines.append(
        f"- ratios (×) are to {base['case']}'s value" if base else "- no baseline case measured: no ratio columns"
    )
    lines.append("")

    keys: list[str] = []
    for result in results:
        for key, value in result.items():
            if key not in ("case", "error") and key not in keys and (value is None or isinstance(value, (int, float))):
                keys.append(key)
    header = ["case"]
    for key in keys:
        header.append(LABELS.get(key, key.replace("_", " ")))
        if base is not None and is_ratio_key(key):
            header.append(f"× {base['case']}")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join("---" for _ in header) + " |")
    for result in results:
        name = f"**{result['case']}**" if base is not None and result is base else str(result["case"])
        if "error" in result:
            error = result["error"]
            text = " ".join(error) if isinstance(error, list) else str(error)
            lines.append(f"| {name} | failed: {_format(text)} |" + " |" * (len(header) - 2))
            continue
        cells = [name]
        for key in keys:
            cells.append(_format(result.get(key)))
            if base is not None and is_ratio_key(key):
                cells.append(_ratio(result.get(key), base.get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(data: dict[str, Any], path: str | Path, baseline: str | None = None) -> Path:
    """`render_markdown` written to ``path``; returns it."""
    path = Path(path)
    path.write_text(render_markdown(data, baseline))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="results written by bench.e2e.reward_model / bench.e2e.grpo --json")
    parser.add_argument("--out", "--markdown", dest="out", default=None, help="also write the report here")
    parser.add_argument("--baseline", default=None, help="case the ratios are to (default: the first trl* case)")
    args = parser.parse_args(argv)
    try:
        data = load(args.json)
        text = render_markdown(data, args.baseline)
    except ValueError as exc:
        parser.error(str(exc))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])

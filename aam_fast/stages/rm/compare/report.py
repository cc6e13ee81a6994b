"""The report of ``aam-fast compare``: per eval set (and subset) and variant the accuracy with its bootstrap interval
and, against the baseline (bt when listed), the paired difference with its paired-bootstrap 95% interval and the
exact McNemar p-value; per variant the AAM margin's size, its scale against the reward gap's spread and its
correlation with the gap. Written as ``compare.json``, a markdown table ``compare.md`` and, where matplotlib is
installed, ``compare.png``."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ....training.runtime import log
from ..evaluate import pairwise_report
from .stats import bootstrap_indices, mcnemar_exact, mean_interval, paired_difference


def _section(pairs, scores: dict, baseline: str, samples: int, seed: int) -> dict[str, Any]:
    """Accuracy, interval and the paired comparison with ``baseline`` of every variant on ``pairs``
    (``scores[variant] = (chosen, rejected)`` over exactly these pairs)."""
    indices = bootstrap_indices(len(pairs), samples, seed)
    correct = {name: (chosen - rejected > 0).double() for name, (chosen, rejected) in scores.items()}
    rows, length_baseline = {}, None
    for name, (chosen, rejected) in scores.items():
        report = pairwise_report(chosen, rejected, pairs)
        length_baseline = report["length_baseline"]
        low, high = mean_interval(correct[name], indices)
        row = {"accuracy": report["accuracy"], "accuracy_ci": [low, high], "ties": report["ties"]}
        row["reward_gap_mean"] = report["reward_gap"]["mean"]
        if name != baseline:
            test = mcnemar_exact(correct[name], correct[baseline])
            row["vs_baseline"] = {
                **paired_difference(correct[name], correct[baseline], indices),
                "p_value": test["p_value"],
                "variant_only": test["a_only"],
                "baseline_only": test["b_only"],
            }
        rows[name] = row
    return {"num_pairs": len(pairs), "length_baseline": length_baseline, "variants": rows}


def eval_set_report(pairs, scores: dict, baseline: str, samples: int, seed: int) -> dict[str, Any]:
    """:func:`_section` over all of ``pairs`` and, where pairs carry a subset, over each subset."""
    report = _section(pairs, scores, baseline, samples, seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, pair in enumerate(pairs):
        if pair.subset is not None:
            groups[pair.subset].append(i)
    if groups:
        report["subsets"] = {}
        for number, (subset, idx) in enumerate(sorted(groups.items())):
            sub_scores = {name: (c[idx], r[idx]) for name, (c, r) in scores.items()}
            sub_pairs = [pairs[i] for i in idx]
            report["subsets"][subset] = _section(sub_pairs, sub_scores, baseline, samples, seed + 1 + number)
    return report


def build_report(cfg, shared, results: list[dict[str, Any]], cost: dict[str, float]) -> dict[str, Any]:
    """The whole report: settings, per variant its training and margin summary, per eval set :func:`eval_set_report`."""
    names = [r["variant"].name for r in results]
    baseline = "bt" if "bt" in names else names[0]
    variants = {}
    for result in results:
        variant, summary = result["variant"], result["summary"]
        variants[variant.name] = {
            "margin": variant.margin,
            "beta": variant.beta,
            "gamma": variant.effective_gamma,
            "sft_weight": variant.sft_weight,
            "initial_digest": result["initial_digest"],
            "output": summary["output"],
            "steps": summary["steps"],
            "seconds": summary["seconds"],
            "final_loss": summary["final_train"]["loss"] if summary["final_train"] else None,
            "aam_margin": result["margin"],
        }
    eval_sets = {}
    for eval_set in shared.eval_sets:
        scores = {r["variant"].name: r["scores"][eval_set.name] for r in results}
        eval_sets[eval_set.name] = eval_set_report(eval_set.pairs, scores, baseline, cfg.bootstrap, cfg.seed)
    return {
        "baseline": baseline,
        "train_pairs": len(shared.train),
        "trainable_layers": cfg.trainable_layers,
        "training": training_mode(cfg),
        "bootstrap": cfg.bootstrap,
        "seed": cfg.seed,
        "output": str(cfg.output),
        "variants": variants,
        "eval_sets": eval_sets,
        "cost": {**cost, "train_seconds": {name: v["seconds"] for name, v in variants.items()}},
    }


def training_mode(cfg) -> str:
    """What every variant trains, in words."""
    layers = "every layer" if cfg.trainable_layers is None else f"the top {cfg.trainable_layers} layer(s)"
    if cfg.lora_r:
        return f"LoRA r={cfg.lora_r} on {layers} and the score head"
    if cfg.trainable_layers is None:
        return "full fine-tuning"
    return f"{layers} and the score head, on a cached trunk"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _accuracy_table(section: dict[str, Any], baseline: str) -> list[str]:
    lines = [
        f"| variant | accuracy | 95% CI | diff vs {baseline} | 95% CI | McNemar p | only {baseline} / only variant |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in section["variants"].items():
        low, high = row["accuracy_ci"]
        cells = [name, _pct(row["accuracy"]), f"[{_pct(low)}, {_pct(high)}]"]
        test = row.get("vs_baseline")
        if test is None:
            cells += ["(baseline)", "", "", ""]
        else:
            cells += [f"{100 * test['diff']:+.1f}", f"[{100 * test['ci_low']:+.1f}, {100 * test['ci_high']:+.1f}]"]
            cells += [f"{test['p_value']:.3g}", f"{test['baseline_only']} / {test['variant_only']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _margin_table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| variant | beta | gamma | sft | steps | final loss | mean m | mean abs m | std abs m | p90 abs m | std gap "
        "| abs m / std gap | corr(m, gap) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in report["variants"].items():
        m = v["aam_margin"]
        corr = "n/a" if m["corr_with_gap"] is None else f"{m['corr_with_gap']:.3f}"
        loss = "n/a" if v["final_loss"] is None else f"{v['final_loss']:.4f}"
        gamma = "" if v["gamma"] is None else f"{v['gamma']:g}"
        scale = "n/a" if m["scale_vs_gap"] is None else f"{m['scale_vs_gap']:.4f}"
        cells = [name, f"{v['beta']:g}", gamma, f"{v['sft_weight']:g}", str(v["steps"]), loss, f"{m['mean']:.4f}"]
        cells += [f"{m['abs_mean']:.4f}", f"{m['abs_std']:.4f}", f"{m['abs_p90']:.4f}", f"{m['gap_std']:.4f}"]
        cells += [scale, corr]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _heading(level: str, title: str, section: dict[str, Any]) -> str:
    return f"{level} {title}: {section['num_pairs']} pairs, length baseline {_pct(section['length_baseline'])}"


def format_markdown(report: dict[str, Any]) -> str:
    """``compare.md``: the margin table, then per eval set (and subset) the accuracy table; accuracies in percent."""
    baseline = report["baseline"]
    lines = [
        "# aam-fast compare",
        "",
        f"{report['train_pairs']} training pairs; trained: {report['training']}; "
        f"accuracies in %, 95% intervals from {report['bootstrap']} paired-bootstrap resamples of the pairs; "
        f"McNemar exact two-sided p against {baseline}.",
        "",
        "## AAM margin m during training (every training pair of every step)",
        "",
        *_margin_table(report),
    ]
    for set_name, section in report["eval_sets"].items():
        lines += ["", _heading("##", set_name, section), "", *_accuracy_table(section, baseline)]
        for subset, sub in section.get("subsets", {}).items():
            lines += ["", _heading("###", f"{set_name} / {subset}", sub), "", *_accuracy_table(sub, baseline)]
    return "\n".join(lines) + "\n"


def plot_accuracies(report: dict[str, Any], path: Path) -> bool:
    """``path`` (PNG): one panel per eval set, each variant's accuracy with its 95% interval, the length baseline
    dashed. False (and a logged line) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no compare.png (pip install matplotlib for the plot)")
        return False
    sets = report["eval_sets"]
    figure, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets) + 1, 4), squeeze=False)
    for axis, (set_name, section) in zip(axes[0], sets.items(), strict=True):
        names = list(section["variants"])
        acc = torch.tensor([section["variants"][n]["accuracy"] for n in names])
        ci = torch.tensor([section["variants"][n]["accuracy_ci"] for n in names])
        errors = torch.stack([acc - ci[:, 0], ci[:, 1] - acc]).clamp(min=0)
        axis.errorbar(range(len(names)), acc.tolist(), yerr=errors.tolist(), fmt="o", capsize=4)
        axis.axhline(section["length_baseline"], linestyle="--", color="grey", label="length baseline")
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axis.set_title(f"{set_name} ({section['num_pairs']} pairs)")
        axis.set_ylabel("held-out accuracy")
        axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_outputs(report: dict[str, Any], output: Path) -> None:
    """``compare.json``, ``compare.md`` and (with matplotlib) ``compare.png`` in ``output``; their paths go into
    ``report["files"]``."""
    files = {"json": str(output / "compare.json"), "markdown": str(output / "compare.md"), "png": None}
    if report["eval_sets"] and plot_accuracies(report, output / "compare.png"):
        files["png"] = str(output / "compare.png")
    report["files"] = files
    (output / "compare.md").write_text(format_markdown(report))
    (output / "compare.json").write_text(json.dumps(report, indent=2) + "\n")

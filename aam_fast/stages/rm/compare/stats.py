"""The statistics of ``aam-fast compare``: paired-bootstrap intervals, the exact McNemar test and the AAM margin's
summary.

Two reward models scored on the same ``n`` pairs give per-pair correctness vectors ``a`` and ``b`` (1 when
``r_c > r_r``). The paired bootstrap draws ``n`` pair indices with replacement ``samples`` times (one index matrix,
the same for every statistic of a set) and takes each resample's ``mean(a) - mean(b)``; the 95% interval is the
2.5th and 97.5th percentile of those differences (linear interpolation between order statistics, as
``numpy.percentile`` does). McNemar's exact test looks only at the discordant pairs: ``b01`` (``a`` right, ``b``
wrong) and ``b10`` (``a`` wrong, ``b`` right); under equal accuracy each discordant pair is a fair coin, so the
two-sided p-value is ``min(1, 2 * P[Binomial(b01 + b10, 1/2) <= min(b01, b10)])``, computed in exact integers.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def bootstrap_indices(n: int, samples: int, seed: int) -> torch.Tensor:
    """``[samples, n]`` pair indices drawn uniformly with replacement from a generator seeded by ``seed``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (samples, n), generator=generator)


def percentile_interval(values: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of ``values``: its ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles, with
    linear interpolation between order statistics (position ``q * (len - 1)`` of the sorted values)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if values.numel() == 0:
        raise ValueError("values is empty")
    low, high = torch.quantile(values.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return low.item(), high.item()


def _as_correct(name: str, values) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be a 1-D vector of per-pair correctness, got shape {tuple(tensor.shape)}")
    return tensor.double()


def paired_difference(a, b, indices: torch.Tensor, level: float = 0.95) -> dict[str, float]:
    """``mean(a) - mean(b)`` and its paired-bootstrap interval over the resamples ``indices [samples, n]`` (rows of
    pair indices): ``{"diff", "ci_low", "ci_high"}``."""
    a, b = _as_correct("a", a), _as_correct("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must score the same pairs, got {a.shape[0]} and {b.shape[0]}")
    if indices.dim() != 2 or indices.shape[1] != a.shape[0]:
        raise ValueError(f"indices must be [samples, {a.shape[0]}], got shape {tuple(indices.shape)}")
    delta = a - b
    resampled = delta[indices].mean(-1)
    low, high = percentile_interval(resampled, level)
    return {"diff": delta.mean().item(), "ci_low": low, "ci_high": high}


def mean_interval(a, indices: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """The bootstrap interval of ``mean(a)`` (an accuracy) over the resamples ``indices [samples, n]``."""
    a = _as_correct("a", a)
    if indices.dim() != 2 or indices.shape[1] != a.shape[0]:
        raise ValueError(f"indices must be [samples, {a.shape[0]}], got shape {tuple(indices.shape)}")
    return percentile_interval(a[indices].mean(-1), level)


def mcnemar_exact(a, b) -> dict[str, float | int]:
    """McNemar's exact two-sided test of ``a`` against ``b`` (per-pair correctness): ``{"a_only", "b_only",
    "p_value"}`` with ``p = min(1, 2 * sum_{i <= min(a_only, b_only)} C(n, i) / 2^n)``, ``n`` the discordant pairs
    (``p = 1`` when there are none). Exact rational arithmetic, so any ``n`` is fine."""
    a, b = _as_correct("a", a).bool(), _as_correct("b", b).bool()
    if a.shape != b.shape:
        raise ValueError(f"a and b must score the same pairs, got {a.shape[0]} and {b.shape[0]}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    return {"a_only": a_only, "b_only": b_only, "p_value": binomial_two_sided(a_only, b_only)}


def binomial_two_sided(k1: int, k2: int) -> float:
    """Two-sided exact sign-test p-value of ``k1`` against ``k2`` successes of a fair coin (``n = k1 + k2``)."""
    if k1 < 0 or k2 < 0:
        raise ValueError(f"counts must be >= 0, got {k1} and {k2}")
    n = k1 + k2
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k1, k2) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def margin_summary(margins: torch.Tensor, gaps: torch.Tensor) -> dict[str, float | int | None]:
    """The AAM margin ``m`` over every training pair seen (``margins``, ``gaps`` the reward gaps ``r_c - r_r``, both
    ``[N]``): mean of ``m``, mean, std, 90th percentile and max of ``|m|``, the Pearson correlation of ``m`` with
    the gap (None when either is constant, e.g. ``m = 0`` under bt), the gap's std and the margin's scale against
    it, ``mean |m| / std(gap)`` (None when the gap is constant): near 0 the margin cannot change which pairs the
    loss pushes on."""
    margins, gaps = margins.double().reshape(-1), gaps.double().reshape(-1)
    if margins.shape != gaps.shape or margins.numel() == 0:
        raise ValueError(f"margins and gaps must be equal non-empty vectors, got {margins.numel()} and {gaps.numel()}")
    size = margins.abs()
    m_centered, g_centered = margins - margins.mean(), gaps - gaps.mean()
    denominator = (m_centered.square().sum() * g_centered.square().sum()).sqrt()
    correlation = None if denominator.item() == 0 else ((m_centered * g_centered).sum() / denominator).item()
    gap_std = gaps.std(unbiased=False).item()
    return {
        "pairs": margins.numel(),
        "mean": margins.mean().item(),
        "abs_mean": size.mean().item(),
        "abs_std": size.std(unbiased=False).item(),
        "abs_p90": torch.quantile(size, 0.9).item(),
        "abs_max": size.max().item(),
        "corr_with_gap": correlation,
        "gap_std": gap_std,
        "scale_vs_gap": None if gap_std == 0 else size.mean().item() / gap_std,
    }

"""`bench.check_providers` (the GPU check's correctness step) reports every figure and fails a wrong provider."""

from __future__ import annotations

import torch

from . import check_providers
from .shapes import token_shape


def test_report_has_every_figure_and_passes_exact_providers():
    report = check_providers.check(token_shape(64, 16, 301, "float32"), torch.device("cpu"), ["aam-torch", "naive"])
    for name in ("aam-torch", "naive"):
        entry = report["providers"][name]
        assert entry["ok"] and set(entry["tolerance"]) == {"logp", "d_hidden", "d_weight"}
        assert all(entry[k] <= 1e-5 for k in entry["tolerance"])


def test_a_wrong_provider_fails(monkeypatch):
    provider = check_providers.all_providers()["aam-torch"]
    original = type(provider).token_logprobs
    monkeypatch.setattr(type(provider), "token_logprobs", lambda self, h, w, t: 1.01 * original(self, h, w, t))
    report = check_providers.check(token_shape(64, 16, 301, "float32"), torch.device("cpu"), ["aam-torch"])
    assert report["providers"]["aam-torch"]["ok"] is False

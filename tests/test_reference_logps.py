"""The PR reference's log-probs precomputed before training (`--precompute-ref-logps`, the default): the values the
steps read equal the reference forward they replace, the reference is freed, and whole runs match the per-step
reference — padded, packed and on the top layers alone (which packing now allows)."""

import pytest
import torch
from test_rm import config, train_rows

from aam_fast.stages.rm.reference_logps import ReferenceLogps, response_logps
from aam_fast.stages.rm.setup import pairs_visited
from aam_fast.stages.rm.trainer import RMTrainer, micro_batch_indices, train_reward_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("n_pairs,batch,micro_batches", [(10, 3, 1), (10, 3, 2), (10, 3, 3), (10, 3, 7), (16, 4, 3)])
def test_pairs_visited_are_those_of_the_micro_batches(n_pairs, batch, micro_batches):
    seen = {i for k in range(micro_batches) for i in micro_batch_indices(n_pairs, batch, 5, k)[1]}
    visited = pairs_visited(n_pairs, batch, 5, micro_batches)
    assert visited == sorted(set(visited))
    if micro_batches < n_pairs // batch:
        assert visited == sorted(seen)
    else:  # a whole epoch: every pair (a superset of what is seen: the ragged tail too)
        assert seen <= set(visited) == set(range(n_pairs))


def test_store_gives_sums_or_means_in_chosen_then_rejected_order():
    store = ReferenceLogps(4)
    store.store([3, 1], torch.tensor([-6.0, -2.0, -9.0, -4.0]), torch.tensor([3, 2, 3, 0]))
    assert store.batch([1, 3], "sum").tolist() == [-2.0, -6.0, -4.0, -9.0]
    assert store.batch([1, 3], "mean").tolist() == [-1.0, -2.0, -4.0, -3.0]  # no response token: the sum over 1


@pytest.mark.parametrize(
    "overrides",
    [{}, {"trainable_layers": 2}, {"lora_r": 4}, {"trainable_layers": 1, "lora_r": 4}],
    ids=["full", "top2", "lora", "lora-top1"],
)
def test_precomputed_values_equal_the_reference_forward_they_replace(tiny_paths, tmp_path, overrides):
    per_step = RMTrainer(config(tiny_paths, tmp_path / "a", precompute_ref_logps=False, **overrides))
    precomputed = RMTrainer(config(tiny_paths, tmp_path / "b", **overrides))
    assert per_step.reference is not None and per_step.reference_logps is None
    assert precomputed.reference is None, "the reference is not freed"
    for index in range(per_step.total_steps):
        batch = per_step._micro_batch(index)
        with torch.no_grad():
            out = per_step.model(batch["input_ids"], batch["attention_mask"], reference=per_step.reference)
        sums, counts = response_logps(per_step.reference, out.ref_hidden, batch["labels"], None, "torch")
        _, ids = micro_batch_indices(len(per_step.train_encoded), per_step.global_batch, 7, index)
        for norm, expected in (("sum", sums), ("mean", sums / counts.clamp_min(1))):
            torch.testing.assert_close(precomputed.reference_logps.batch(ids, norm), expected, rtol=1e-5, atol=1e-5)
        assert precomputed._micro_batch(index)["ref_logps"] is not None


@pytest.mark.parametrize(
    "overrides",
    [{}, {"packing": True}, {"trainable_layers": 2}, {"trainable_layers": 2, "packing": True}],
    ids=["padded", "packed", "top2", "top2-packed"],
)
def test_a_precomputed_run_follows_the_per_step_reference_run(tiny_paths, tmp_path, overrides):
    settings = {"max_steps": 6, "margin": "pr", "beta": 4.0, **overrides}
    if overrides.get("packing") and overrides.get("trainable_layers"):
        with pytest.raises(ValueError, match="--packing does not combine"):
            config(tiny_paths, tmp_path / "x", precompute_ref_logps=False, **settings).validate()
        reference_run = {**settings, "packing": False}  # packed top-layer PR needs the precomputed values
    else:
        reference_run = settings
    train_reward_model(config(tiny_paths, tmp_path / "step", precompute_ref_logps=False, **reference_run))
    train_reward_model(config(tiny_paths, tmp_path / "once", **settings))
    per_step, once = train_rows(tmp_path / "step"), train_rows(tmp_path / "once")
    assert len(once) == 6
    for a, b in zip(per_step, once, strict=True):
        for key in ("loss", "aam_margin/mean", "margin"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a["step"])
    assert any(abs(r["aam_margin/mean"]) > 1e-4 for r in once[1:]), "the PR margin never moved: nothing compared"

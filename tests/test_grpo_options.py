"""TRL's GRPO options (issue 23, item 1): each loss option against a float64 formula (loss and gradients), the
truncation mask, the reference sync, DAPO's dynamic sampling, the multi-objective aggregation, and their combination
on the tiny model (runs, resumes exactly, 2 ranks = 1 process)."""

from __future__ import annotations

import pytest
import torch
from reference import reference_logprobs, rel_err
from test_grpo_stage import STORY_PROMPTS, one_thread, untimed  # noqa: F401 (one_thread: an autouse fixture)
from test_grpo_stage import small_config as stage_config
from test_losses import grpo_batch as losses_batch

import aam_fast
from aam_fast.losses import LOSS_TYPES, multi_objective_advantages
from aam_fast.ops import native_backend

BACKENDS = ["torch", "native"]


def needs_backend(backend: str) -> None:
    if backend == "native" and not native_backend.native_available():
        pytest.skip(f"native library not built: {native_backend.BUILD_HINT}")


def grpo_batch(batch=4, seed=0, spread=0.3):
    """test_losses' random inputs, with old log-probs `spread` away from the current ones (some ratios clipped)."""
    hidden, weight, targets, advantages, _, ref = losses_batch(batch=batch, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        base, _ = reference_logprobs(hidden, weight, targets)
    old = (base + spread * torch.randn(base.shape, generator=gen, dtype=torch.float64)).float()
    return hidden, weight, targets, advantages, old, ref


def direct(hidden, weight, targets, advantages, old, ref, *, level, delta, quantile, loss_type, eps=0.2, eps_high=0.28):
    """The loss written out in float64. Sequence level: `s_i = exp(mean_t(ℓ − ℓ_old))`; without the entropy mask
    GSPO's sequence objective (differentiated through the mean, broadcast to its tokens), which equals GSPO-token's
    per-token form when a sequence's tokens are weighted alike; with the mask GSPO-token's `sg[s_i]·exp(ℓ_t −
    sg[ℓ_t])`, whose gradient at a token is `s_i·∇ℓ_t` (the mask makes the two differ)."""
    logp, entropy = reference_logprobs(hidden, weight, targets)
    valid = targets != -100
    mask = valid.double()
    log_ratio = (logp - old.double()) * mask
    if level == "sequence":
        sequence = (log_ratio.sum(-1) / mask.sum(-1))[:, None]
        if quantile < 1:
            sequence = sequence.detach() + logp - logp.detach()
        log_ratio = sequence.expand_as(logp)
    ratio = torch.exp(log_ratio)
    a = advantages.double()[:, None]
    unclipped = ratio if delta is None else ratio.clamp(max=delta)
    policy = -torch.minimum(unclipped * a, ratio.clamp(1 - eps, 1 + eps_high) * a)
    if quantile < 1:
        threshold = torch.quantile(entropy.detach()[valid], 1 - quantile)
        policy = policy * (entropy.detach() >= threshold).double()
    d = logp - ref.double()
    per = (policy + 0.05 * (torch.exp(-d) + d - 1) - 0.01 * entropy) * mask
    if loss_type == "token-mean":
        return per.sum() / mask.sum()
    if loss_type == "seq-mean-token-mean":
        return (per.sum(-1) / mask.sum(-1)).sum() / mask.shape[0]
    return per.sum() / (mask.shape[0] * mask.shape[1])


def fused(hidden, weight, targets, advantages, old, ref, *, backend, loss_type, **options):
    """`grpo_loss` with the same settings as `direct`; `(output, hidden grad, weight grad)`."""
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    settings = dict(epsilon=0.2, epsilon_high=0.28, beta=0.05, entropy_coef=0.01, loss_type=loss_type)
    out = aam_fast.grpo_loss(
        h, w, targets, advantages, old_logps=old, ref_logps=ref, backend=backend, **settings, **options
    )
    out.loss.backward()
    return out, h.grad, w.grad


CASES = [
    dict(importance_sampling_level="sequence"),
    dict(delta=1.5),
    dict(top_entropy_quantile=0.2),
    dict(importance_sampling_level="sequence", delta=1.4, top_entropy_quantile=0.5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options_match_the_float64_formula(backend, loss_type, options):
    needs_backend(backend)
    spread = 0.8 if "delta" in options else 0.3  # ratios far enough from 1 that delta caps some
    inputs = grpo_batch(seed=len(loss_type) + len(options), spread=spread)
    out, h_grad, w_grad = fused(*inputs, backend=backend, loss_type=loss_type, **options)
    h64, w64 = inputs[0].double().requires_grad_(True), inputs[1].double().requires_grad_(True)
    expected = direct(
        h64,
        w64,
        *inputs[2:],
        level=options.get("importance_sampling_level", "token"),
        delta=options.get("delta"),
        quantile=options.get("top_entropy_quantile", 1.0),
        loss_type=loss_type,
    )
    expected.backward()
    assert abs(out.loss.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
    assert rel_err(h_grad, h64.grad) <= 1e-4
    assert rel_err(w_grad, w64.grad) <= 1e-4


def test_options_change_the_loss_where_they_apply():
    """The cases above are not vacuous: delta caps some ratios, the sequence ratio differs from the token ones,
    the entropy quantile drops tokens' policy gradient."""
    inputs = grpo_batch(seed=3, spread=0.8)
    plain, h_plain, _ = fused(*inputs, backend="torch", loss_type="token-mean")
    for options in CASES:
        out, h_grad, _ = fused(*inputs, backend="torch", loss_type="token-mean", **options)
        assert rel_err(h_grad, h_plain) > 1e-3, options


def test_quantile_one_is_the_plain_loss_bit_for_bit():
    inputs = grpo_batch(seed=5)
    plain, h_plain, w_plain = fused(*inputs, backend="torch", loss_type="token-mean")
    same, h_same, w_same = fused(*inputs, backend="torch", loss_type="token-mean", top_entropy_quantile=1.0)
    assert torch.equal(plain.loss, same.loss) and torch.equal(h_plain, h_same) and torch.equal(w_plain, w_same)
    assert torch.equal(plain.logps, same.logps)


def test_sequence_level_clip_statistics_count_the_sequence_ratio():
    """Under GSPO a token counts as clipped when its sequence's ratio is outside the range (on its advantage's
    side): whole sequences are clipped or not."""
    hidden, weight, targets, _, old, ref = grpo_batch(seed=2, spread=0.8)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    out, _, _ = fused(
        hidden, weight, targets, advantages, old, ref, backend="torch", loss_type="token-mean",
        importance_sampling_level="sequence",
    )  # fmt: skip
    valid = targets != -100
    with torch.no_grad():
        logp, _ = reference_logprobs(hidden, weight, targets)
    s = torch.exp(((logp.float() - old) * valid).sum(-1) / valid.sum(-1))
    low = (s < 0.8) & (advantages < 0)
    high = (s > 1.28) & (advantages > 0)
    assert out.stats["clip_low_sum"].item() == (valid.sum(-1) * low).sum().item()
    assert out.stats["clip_high_sum"].item() == (valid.sum(-1) * high).sum().item()


def test_entropy_quantile_over_every_rank():
    """Two halves of a batch, each given the other's entropies by `entropy_gather`, sum to the whole batch's loss
    and gradient (the quantile is over every rank's tokens)."""
    hidden, weight, targets, advantages, old, ref = grpo_batch(batch=6, seed=7)
    options = dict(loss_type="token-mean", top_entropy_quantile=0.3)
    whole, h_whole, w_whole = fused(hidden, weight, targets, advantages, old, ref, backend="torch", **options)
    _, entropy = aam_fast.linear_logprobs(hidden, weight, targets, return_entropy=True)
    valid = targets != -100
    count = valid.sum().item()
    parts, h_parts, w_total = [], [], torch.zeros_like(weight)
    for rows, others in ((slice(0, 3), slice(3, 6)), (slice(3, 6), slice(0, 3))):
        other = entropy[others][valid[others]]

        def gather(values, other=other):
            return torch.cat([values, other])

        h = hidden[rows].clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        out = aam_fast.grpo_loss(
            h, w, targets[rows], advantages[rows], old_logps=old[rows], ref_logps=ref[rows], epsilon=0.2,
            epsilon_high=0.28, beta=0.05, entropy_coef=0.01, backend="torch", normalizer=count,
            entropy_gather=gather, **options,
        )  # fmt: skip
        out.loss.backward()
        parts.append(out.loss.item())
        h_parts.append(h.grad)
        w_total += w.grad
    assert sum(parts) == pytest.approx(whole.loss.item(), rel=1e-6)
    assert rel_err(torch.cat(h_parts), h_whole) <= 1e-6 and rel_err(w_total, w_whole) <= 1e-6


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(importance_sampling_level="word"), "importance_sampling_level must be one of"),
        (dict(delta=1.1), "delta must be None or greater than 1 \\+ epsilon_high"),
        (dict(top_entropy_quantile=0.0), "top_entropy_quantile must be in \\(0, 1\\]"),
        (dict(top_entropy_quantile=1.5), "top_entropy_quantile must be in \\(0, 1\\]"),
    ],
)
def test_option_ranges_are_refused(options, message):
    hidden, weight, targets, advantages, _, _ = grpo_batch()
    with pytest.raises(ValueError, match=message):
        aam_fast.grpo_loss(hidden, weight, targets, advantages, **options)
    with pytest.raises(ValueError, match=message):
        aam_fast.GRPOLoss(**options)


def test_module_and_functional_take_the_options_in_the_same_order():
    import inspect

    functional = list(inspect.signature(aam_fast.grpo_loss).parameters)
    module = list(inspect.signature(aam_fast.GRPOLoss.__init__).parameters)[1:]
    options = ["importance_sampling_level", "delta", "top_entropy_quantile"]
    assert [p for p in functional if p in options] == [p for p in module if p in options] == options
    inputs = grpo_batch(seed=9)
    hidden, weight, targets, advantages, old, ref = inputs
    settings = dict(importance_sampling_level="sequence", delta=1.5, top_entropy_quantile=0.5)
    a = aam_fast.grpo_loss(hidden, weight, targets, advantages, old_logps=old, **settings)
    b = aam_fast.GRPOLoss(**settings)(hidden, weight, targets, advantages, old_logps=old)
    assert torch.equal(a.loss, b.loss)


# -- multi-objective aggregation -------------------------------------------------------------------------------


def test_sum_then_normalize_is_group_advantages_of_the_weighted_sum():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(12, 2, generator=gen)
    table[3, 1] = float("nan")
    weights = torch.tensor([1.0, 0.5])
    total = torch.nansum(table * weights, dim=1)
    for scale in ("group", "batch", "none"):
        expected = aam_fast.group_advantages(total, 4, scale=scale)
        got = multi_objective_advantages(table, weights, 4, scale=scale)
        assert torch.equal(got, expected)


def test_normalize_then_sum_normalises_each_source_in_its_group_then_the_sum_over_the_batch():
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(12, 3, generator=gen) * torch.tensor([1.0, 10.0, 0.1])
    table[5, 2] = float("nan")
    table[8:12, :] = 2.0  # a group where every source is constant: advantage exactly 0
    weights = torch.tensor([1.0, 0.5, 2.0])
    got = multi_objective_advantages(table, weights, 4, aggregation="normalize_then_sum")
    t = table.double().view(3, 4, 3)
    normalised = torch.zeros_like(t)
    for g in range(3):
        for k in range(3):
            column = t[g, :, k]
            present = column[~torch.isnan(column)]
            mean = present.mean()
            std = present.std() if present.numel() > 1 else torch.zeros((), dtype=torch.float64)
            normalised[g, :, k] = (column - mean) / (std + 1e-4)
    summed = torch.nansum(normalised.view(12, 3) * weights.double(), dim=1)
    expected = (summed - summed.mean()) / (summed.std() + 1e-4)
    expected[8:12] = 0.0
    assert torch.allclose(got.double(), expected, atol=1e-5)
    assert torch.equal(got[8:12], torch.zeros(4))
    # the sources' scales no longer matter: source 1 (x10) does not dominate as it does in the plain sum
    scaled = table.clone()
    scaled[:, 1] *= 100.0
    again = multi_objective_advantages(scaled, weights, 4, aggregation="normalize_then_sum")
    assert torch.allclose(again, got, atol=1e-4)


# -- train-grpo on the tiny model ------------------------------------------------------------------------------

FLAT = {"One day", "The cat"}  # prompts whose completions all get the same reward (uninformative groups)


@pytest.fixture(scope="module")
def policy_dir(tiny_paths, tiny_period_id, tmp_path_factory):
    """The session's tiny Llama whose generation config also ends a completion at ".", so that its short
    completions are a mix of EOS-ended and truncated ones."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("period") / "policy"
    shutil.copytree(tiny_paths["model"], folder)
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    eos = config.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    config["eos_token_id"] = [*eos, tiny_period_id]
    path.write_text(json.dumps(config))
    return str(folder)


def share_of_a(prompts, completions, **columns):
    """The fraction of 'a' in the completion; 0.5 for the FLAT prompts (all-equal rewards in their groups)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [0.5 if p in FLAT else t.count("a") / max(len(t), 1) for p, t in zip(prompts, texts, strict=True)]


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def small_config(policy_dir, tmp_path, **overrides):
    """test_grpo_stage's small run, rewarded by this module's `share_of_a` (FLAT prompts: all-equal rewards)."""
    return stage_config(policy_dir, tmp_path, **{"reward_fns": [share_of_a], **overrides})


def test_masked_truncated_completions_get_no_loss_and_are_not_counted(policy_dir, tmp_path):
    """The step's loss is the plain loss of the completions that ended with EOS, over their own count; the
    truncated ones still have rewards and advantages."""
    from aam_fast.modeling.heads import head_inputs, lm_head_of
    from aam_fast.stages.grpo import GRPOTrainer
    from aam_fast.stages.grpo.rollout import completion_hidden

    config = small_config(policy_dir, tmp_path, mask_truncated_completions=True, beta=0.04, max_new_tokens=12)
    trainer = GRPOTrainer(config)
    batches, _ = trainer.make_rollout()
    truncated = torch.cat([b.truncated for b in batches])
    assert 0 < int(truncated.sum()) < truncated.numel()  # the tiny model's 6-token completions: some of each
    assert all(b.advantages is not None and b.rewards.shape == b.truncated.shape for b in batches)
    loss, totals = trainer.accumulate_gradients(batches)
    kept = sum(int(b.mask[~b.truncated].sum()) for b in batches)
    assert totals["tokens"] == kept
    expected = 0.0
    for b in batches:
        rows = ~b.truncated
        with torch.no_grad():  # the same forward as the loss's
            hidden = completion_hidden(trainer.policy, b.input_ids, b.attention_mask, b.prompt_len)
            hidden, weight, bias = head_inputs(hidden, *lm_head_of(trainer.policy), torch.float32)
        out = aam_fast.grpo_loss(
            hidden[rows], weight, b.targets[rows], b.advantages[rows], ref_logps=b.ref_logps[rows], bias=bias,
            normalizer=kept, beta=0.04,
        )  # fmt: skip
        expected += out.loss.item()
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_mix_reference_moves_the_reference_toward_the_policy():
    from aam_fast.modeling.reference import mix_reference

    policy, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    mix_reference(reference, policy, 0.25)
    for name, value in reference.state_dict().items():
        expected = 0.25 * policy.state_dict()[name].double() + 0.75 * before[name].double()
        assert torch.allclose(value.double(), expected, atol=1e-7)
    with pytest.raises(ValueError, match="do not match"):
        mix_reference(torch.nn.Linear(3, 2, bias=False), policy, 0.5)


def test_sync_ref_model_mixes_every_n_steps_and_resumes_exactly(policy_dir, tmp_path):
    """--ref-model-sync-steps 2: the reference moves after steps 2 and 4 only, to alpha·policy + (1−alpha)·ref;
    checkpoints hold it, so a run stopped at step 3 and resumed ends where the uninterrupted one ends."""
    from safetensors.torch import load_file

    from aam_fast.stages.grpo import GRPOTrainer, train_grpo

    common = dict(beta=0.04, sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=2, save_every=1)
    trainer = GRPOTrainer(small_config(policy_dir, tmp_path, output=str(tmp_path / "a"), max_steps=4, **common))
    initial = {k: v.clone() for k, v in trainer.reference.named_parameters()}
    trainer.train_step()
    assert all(torch.equal(v, initial[k]) for k, v in trainer.reference.named_parameters())  # step 1: untouched
    trainer.train_step()
    policy = dict(trainer.policy.named_parameters())
    for name, value in trainer.reference.named_parameters():
        expected = torch.lerp(initial[name], policy[name].detach(), 0.5)
        assert torch.equal(value, expected), name

    full = train_grpo(small_config(policy_dir, tmp_path, output=str(tmp_path / "full"), max_steps=5, **common))
    part = tmp_path / "part"
    train_grpo(small_config(policy_dir, tmp_path, output=str(part), max_steps=3, **common))
    saved = load_file(part / "checkpoints" / "checkpoint-2" / "reference.safetensors")
    assert saved.keys() == dict(trainer.reference.named_parameters()).keys()
    assert not (part / "reference.safetensors").exists()  # the final export is the policy alone
    resumed = train_grpo(small_config(policy_dir, tmp_path, output=str(part), max_steps=5, resume="auto", **common))
    assert untimed(resumed) == untimed(full[3:])
    a, b = load_file(part / "model.safetensors"), load_file(tmp_path / "full" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(delta=1.2), r"--delta 1.2 must exceed 1 \+ --epsilon-high"),
        (dict(sync_ref_model=True, beta=0.0), "--sync-ref-model needs a reference model"),
        (dict(sync_ref_model=True, lora_r=4), "--sync-ref-model cannot run with --lora-r"),
        (dict(top_entropy_quantile=0.0), "--top-entropy-quantile"),
        (dict(ref_model_mixup_alpha=1.5), "--ref-model-mixup-alpha"),
        (dict(max_resample_rounds=-1), "--max-resample-rounds"),
    ],
)
def test_option_settings_are_checked(tmp_path, overrides, message):
    config = small_config("policy", tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_cli_takes_the_options():
    import argparse

    from aam_fast.stages.grpo import GRPOConfig
    from aam_fast.training import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, GRPOConfig)
    flags = "--policy p --prompts q --reward-fn m:f --mask-truncated-completions --importance-sampling-level sequence"
    flags += " --delta 2.0 --top-entropy-quantile 0.2 --sync-ref-model --ref-model-mixup-alpha 0.9"
    flags += " --ref-model-sync-steps 64 --dynamic-sampling --max-resample-rounds 2"
    flags += " --multi-objective-aggregation normalize_then_sum"
    cfg = config_from_args(GRPOConfig, parser.parse_args(flags.split()))
    assert (cfg.mask_truncated_completions, cfg.importance_sampling_level, cfg.delta) == (True, "sequence", 2.0)
    assert (cfg.top_entropy_quantile, cfg.sync_ref_model, cfg.ref_model_mixup_alpha) == (0.2, True, 0.9)
    assert (cfg.ref_model_sync_steps, cfg.dynamic_sampling, cfg.max_resample_rounds) == (64, True, 2)
    assert cfg.multi_objective_aggregation == "normalize_then_sum"
    cfg.validate()


def test_normalize_then_sum_in_the_trainer(policy_dir, tmp_path):
    """Two rule rewards on very different scales: the rollout's advantages are multi_objective_advantages of the
    per-source table."""
    from aam_fast.stages.grpo import GRPOTrainer

    config = small_config(
        policy_dir, tmp_path, reward_fns=[share_of_a, length_reward], reward_weights=[1.0, 0.5], beta=0.0,
        multi_objective_aggregation="normalize_then_sum", grad_accum=2,
    )  # fmt: skip
    trainer = GRPOTrainer(config)
    batches, _ = trainer.make_rollout()
    table = torch.cat([b.reward_table for b in batches])
    expected = multi_objective_advantages(table, torch.tensor([1.0, 0.5]), 4, aggregation="normalize_then_sum")
    assert torch.equal(torch.cat([b.advantages for b in batches]), expected)
    plain = multi_objective_advantages(table, torch.tensor([1.0, 0.5]), 4)
    assert not torch.allclose(expected, plain, atol=1e-3)


def _position(stream) -> int:
    return stream.epoch * len(stream.records) + stream.index


def test_dynamic_sampling_drops_refills_and_counts(policy_dir, tmp_path):
    """Groups with all-equal rewards are replaced by the next prompts of the stream; the step ends with only
    informative groups, and the stream advanced by the refills."""
    from aam_fast.stages.grpo import GRPOTrainer

    trainer = GRPOTrainer(small_config(policy_dir, tmp_path, grad_accum=2, dynamic_sampling=True, beta=0.0))
    start = _position(trainer.stream)
    batches, metrics = trainer.make_rollout()
    dropped, left_out = metrics["dynamic_sampling/groups_dropped"], metrics["dynamic_sampling/groups_left_out"]
    assert dropped >= 1 and left_out == 0 and metrics["dynamic_sampling/rounds"] >= 2
    assert _position(trainer.stream) - start == 4 + dropped  # every dropped group's slot took the next prompt
    for batch in batches:
        groups = batch.rewards.view(-1, 4)
        assert bool((groups.amax(1) > groups.amin(1)).all())  # only informative groups remain
        assert not any(p in FLAT for p in batch.prompts) and not bool(batch.left_out.any())
    assert metrics["frac_reward_zero_std"] == 0.0


def test_dynamic_sampling_is_bounded_then_trains_on_what_there_is(policy_dir, tmp_path, logged):
    """Every reward equal: --max-resample-rounds more rounds, then every group is left out of the loss (nothing
    trained on, the normaliser's floor of 1), with a log line and the metrics."""
    from aam_fast.stages.grpo import GRPOTrainer

    def flat(prompts, completions, **columns):
        return [1.0] * len(prompts)

    config = small_config(
        policy_dir, tmp_path, reward_fns=[flat], dynamic_sampling=True, max_resample_rounds=2, beta=0.04,
        max_steps=1,
    )  # fmt: skip
    trainer = GRPOTrainer(config)
    start = _position(trainer.stream)
    row = trainer.train_step()
    assert row["dynamic_sampling/rounds"] == 3 and row["dynamic_sampling/groups_left_out"] == 2
    assert row["dynamic_sampling/groups_dropped"] == 6 and _position(trainer.stream) - start == 2 + 4
    assert row["loss"] == 0.0 and row["grad_norm"] == 0.0
    assert logged.count("2 groups with all-equal rewards left out of the loss after 3 sampling rounds") == 1


def test_dynamic_sampling_off_keeps_every_group(policy_dir, tmp_path):
    from aam_fast.stages.grpo import GRPOTrainer

    trainer = GRPOTrainer(small_config(policy_dir, tmp_path, grad_accum=2, beta=0.0))
    batches, metrics = trainer.make_rollout()
    assert not any(k.startswith("dynamic_sampling/") for k in metrics)
    assert _position(trainer.stream) == 4 and sum(p in FLAT for b in batches for p in b.prompts) > 0


def test_merged_slots_score_as_their_parts(policy_dir, tmp_path):
    """Groups of two rounds (other prompt and completion widths) merged into one micro-batch: the same token
    log-probs as each part alone, through the shared-prefix and the whole-row passes."""
    from aam_fast.stages.grpo import GRPOTrainer
    from aam_fast.stages.grpo.dynamic import SlotGroup, merge_groups

    trainer = GRPOTrainer(small_config(policy_dir, tmp_path, max_new_tokens=12))
    pairs_a = [(0, {"prompt": "Once upon a time there was"}), (1, {"prompt": "One day"})]
    part_a, _, _ = trainer._sample_part(trainer.policy, pairs_a, 0)
    part_b, _, _ = trainer._sample_part(
        trainer.policy, [(0, {"prompt": "Tom and his big red dog ran to the park with"})], 1
    )
    assert part_a.prompt_len != part_b.prompt_len
    merged = merge_groups([SlotGroup(part_b, 0, False), SlotGroup(part_a, 1, True)], 4, trainer.tokenizer.pad_token_id)
    assert merged.prompts == part_b.prompts + part_a.prompts[4:]
    assert merged.left_out.tolist() == [False] * 4 + [True] * 4
    for copies in (4, None):
        from aam_fast.stages.grpo.rollout import token_logprobs

        got = token_logprobs(trainer.policy, merged, 1.0, copies=copies)
        b = token_logprobs(trainer.policy, part_b, 1.0, copies=copies)
        a = token_logprobs(trainer.policy, part_a, 1.0, copies=copies)[4:]
        assert torch.allclose(got[:4, : b.shape[1]], b, atol=1e-5)
        assert torch.allclose(got[4:, : a.shape[1]], a, atol=1e-5)
        assert torch.equal(merged.targets[4:, : a.shape[1]], part_a.targets[4:])


COMBINATION = dict(
    mask_truncated_completions=True,
    importance_sampling_level="sequence",
    top_entropy_quantile=0.2,
    dynamic_sampling=True,
)


def test_the_combination_runs_and_resumes_exactly(policy_dir, tmp_path):
    """--mask-truncated-completions --importance-sampling-level sequence --top-entropy-quantile 0.2
    --dynamic-sampling, with reused rollouts (old log-probs differ from the current ones): stopped at step 3 (mid
    rollout) and resumed, it ends where the uninterrupted run ends (metrics, completions, weights)."""
    from safetensors.torch import load_file

    from aam_fast.stages.grpo import train_grpo

    common = dict(**COMBINATION, grad_accum=2, num_iterations=2, beta=0.04, save_every=3, max_new_tokens=12, seed=1)
    full = train_grpo(small_config(policy_dir, tmp_path, output=str(tmp_path / "full"), max_steps=5, **common))
    assert sum(r["dynamic_sampling/groups_dropped"] for r in full) > 0
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in full)
    part = tmp_path / "part"
    train_grpo(small_config(policy_dir, tmp_path, output=str(part), max_steps=3, **common))
    resumed = train_grpo(small_config(policy_dir, tmp_path, output=str(part), max_steps=5, resume="auto", **common))
    assert untimed(resumed) == untimed(full[3:])
    assert (part / "completions.jsonl").read_text() == (tmp_path / "full" / "completions.jsonl").read_text()
    a, b = load_file(part / "model.safetensors"), load_file(tmp_path / "full" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="--top-entropy-quantile 0.2 -> 0.5"):
        train_grpo(small_config(
            policy_dir, tmp_path, output=str(part), max_steps=6, resume="auto",
            **{**common, "top_entropy_quantile": 0.5},
        ))  # fmt: skip


REWARD_SOURCE = """
FLAT = {"One day", "The cat"}


def share_of_a(prompts, completions, **columns):
    return [0.5 if p in FLAT else c.count("a") / max(len(c), 1) for p, c in zip(prompts, completions)]
"""


@pytest.mark.parametrize(
    "strategy, extra",
    [("ddp", {}), ("fsdp2", dict(sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=1))],
    ids=["ddp", "fsdp2-sync-ref"],
)
def test_the_combination_on_two_ranks_matches_one_process(policy_dir, tmp_path, strategy, extra):
    """The combination under torchrun (2 ranks, 1 prompt each per micro-batch; DDP, and FSDP2 with the reference
    mixed toward the sharded policy every step) ends as one process with 2 prompts per micro-batch: the same
    completions, metrics (dynamic sampling's too) and weights."""
    import json

    from test_distributed import assert_same_weights, run_two_ranks

    from aam_fast.stages.grpo import train_grpo

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in STORY_PROMPTS))
    (tmp_path / "reward.py").write_text(REWARD_SOURCE)
    settings = dict(
        policy=policy_dir, prompts=str(tmp_path / "prompts.jsonl"), reward_fns=[f"{tmp_path / 'reward.py'}:share_of_a"],
        num_generations=4, max_new_tokens=12, beta=0.04, grad_accum=2, num_iterations=2, lr=1e-4, max_steps=2,
        seed=1, progress=False, **COMBINATION, **extra,
    )  # fmt: skip
    train_grpo(small_config(policy_dir, tmp_path, **settings, batch_size=2, output=str(tmp_path / "one")))
    cli = ["train-grpo", "--no-progress", "--output", str(tmp_path / "two"), "--batch-size", "1"]
    cli += ["--strategy", strategy]
    for key, value in settings.items():
        flag = "--" + ("reward-fn" if key == "reward_fns" else key.replace("_", "-"))
        if value is True:
            cli.append(flag)
        elif value is not False:
            cli += [flag, str(value[0] if isinstance(value, list) else value)]
    run_two_ranks(cli)
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]  # fmt: skip
    assert len(rows[0]) == len(rows[1]) == 2
    for one, two in zip(*rows, strict=True):
        for key in ("reward", "loss", "kl", "grad_norm", "entropy", "completions/mean_length"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
        for key in ("dynamic_sampling/groups_dropped", "dynamic_sampling/rounds", "num_tokens"):
            assert two[key] == one[key], key
    assert sum(r["dynamic_sampling/groups_dropped"] for r in rows[0]) > 0
    completions = [(tmp_path / run / "completions.jsonl").read_text().splitlines() for run in ("one", "two")]
    pairs = [[(json.loads(r)["prompt"], json.loads(r)["completion"]) for r in c] for c in completions]
    assert pairs[0] == pairs[1]
    assert_same_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("setting", [dict(packing=True), dict(lora_r=4, lora_alpha=8.0)], ids=["packing", "lora"])
def test_the_combination_with_packing_and_lora(policy_dir, tmp_path, setting):
    """Packing computes the same loss (up to rounding); LoRA trains its adapters under the options."""
    from aam_fast.stages.grpo import train_grpo

    common = dict(**COMBINATION, grad_accum=2, num_iterations=2, beta=0.04, max_new_tokens=12, seed=1, max_steps=2)
    plain = train_grpo(small_config(policy_dir, tmp_path, output=str(tmp_path / "plain"), **common))
    rows = train_grpo(small_config(policy_dir, tmp_path, output=str(tmp_path / "with"), **common, **setting))
    assert rows[0]["reward"] == plain[0]["reward"]  # the same completions
    if "packing" in setting:
        for key in ("loss", "kl", "grad_norm", "entropy"):
            assert rows[1][key] == pytest.approx(plain[1][key], rel=1e-4, abs=1e-6), key
    else:
        assert rows[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-4, abs=1e-6)  # adapters start at 0
        assert (tmp_path / "with" / "adapter_model.safetensors").is_file() and rows[1]["grad_norm"] > 0

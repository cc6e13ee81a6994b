"""The AAM pairwise loss ("pr" margin, reference log-probs given): margin detached (the policy log-probs are
forward-only, gradients reach the rewards) and trained through (detach_margin=False, sft_weight=0.1)."""

from .runner import run_case


def test_aam_detached_margin(benchmark, bench_env, pair_shape, provider_name):
    run_case(benchmark, bench_env, "aam-detached", provider_name, pair_shape)


def test_aam_trained_margin(benchmark, bench_env, pair_shape, provider_name):
    run_case(benchmark, bench_env, "aam-trained", provider_name, pair_shape)

"""The GRPO token loss (token-mean, ε = 0.2, k3 KL with β = 0.04, off-policy old log-probs), forward+backward."""

from .runner import run_case


def test_grpo_loss(benchmark, bench_env, grpo_shape, provider_name):
    run_case(benchmark, bench_env, "grpo", provider_name, grpo_shape)

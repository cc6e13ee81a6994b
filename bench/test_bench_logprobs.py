"""Token log-probs: forward only (no_grad) and forward+backward with an arbitrary upstream gradient."""

from .runner import run_case


def test_logprobs_forward(benchmark, bench_env, token_shape, provider_name):
    run_case(benchmark, bench_env, "logprobs-fwd", provider_name, token_shape)


def test_logprobs_forward_backward(benchmark, bench_env, token_shape, provider_name):
    run_case(benchmark, bench_env, "logprobs-fwdbwd", provider_name, token_shape)

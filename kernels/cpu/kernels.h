// The native CPU kernels of the fused linear log-prob op (the contract of aam_fast/ops/torch_backend.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace aam_fast::cpu {

// (lse [N] float64, target_logit [N] float32, mean_z [N] float64 or [0]) for z = (hidden W^T + bias) * inv_t:
// lse = logsumexp_v z, target_logit = z[y], mean_z = sum_v softmax(z)_v z_v (only with `with_entropy`), so that
// the entropy lse - mean_z is formed in float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_temperature, bool with_entropy, int64_t block_rows, int64_t tile_width,
    int64_t vocab_chunks);

// Gradients of sum_t g_t logp_t + e_t H_t, given lse and mean_z as the forward returns them (read as float64):
// (d_hidden [N, D] in hidden's dtype, d_weight [V, D] float32, d_bias [V] float32), each an empty [0] tensor when
// not asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const std::optional<at::Tensor>& mean_z,
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy, double inv_temperature,
    bool needs_hidden_grad, bool needs_weight_grad, bool needs_bias_grad, int64_t block_rows, int64_t tile_width,
    int64_t vocab_chunks);

// Throws a c10::Error naming the argument when the inputs do not fit the contract.
void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& targets);

}  // namespace aam_fast::cpu

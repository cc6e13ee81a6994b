// The torch.ops.aam_fast.* schemas and their CPU kernels; loaded from Python with torch.ops.load_library.
#include <torch/library.h>

#include "kernels.h"

namespace aam_fast::cpu {

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& targets) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "the native backend runs on CPU tensors, got hidden on ", hidden.device());
  TORCH_CHECK(hidden.dim() == 2, "hidden must be [N, D], got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), "weight must be [V, D] with D=",
              hidden.size(1), ", got ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0 || hidden.size(0) == 0, "weight must have at least one row (V >= 1)");
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "hidden must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype, "weight dtype ", weight.scalar_type(), " differs from hidden's ",
              dtype);
  TORCH_CHECK(hidden.stride(1) == 1 || hidden.size(1) <= 1, "hidden's rows must be unit-strided");
  TORCH_CHECK(weight.stride(1) == 1 || weight.size(1) <= 1, "weight's rows must be unit-strided");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == hidden.size(0),
              "targets must be int64 [N] with N=", hidden.size(0), ", got ", targets.scalar_type(), " ",
              targets.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [V]=[", weight.size(0),
                "], got ", bias->sizes());
  }
}

TORCH_LIBRARY(aam_fast, m) {
  m.def(
      "linear_logprobs_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float inv_temperature, "
      "bool with_entropy, int block_rows=0, int tile_width=0, int vocab_chunks=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_logprobs_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, "
      "Tensor? mean_z, Tensor grad_logp, Tensor? grad_entropy, float inv_temperature, bool needs_hidden_grad, "
      "bool needs_weight_grad, bool needs_bias_grad, int block_rows=0, int tile_width=0, int vocab_chunks=0) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aam_fast, CPU, m) {
  m.impl("linear_logprobs_forward", &linear_logprobs_forward);
  m.impl("linear_logprobs_backward", &linear_logprobs_backward);
}

}  // namespace aam_fast::cpu

// Forward: per token block, one matrix product per vocabulary tile into a cache-sized buffer, then the tile's
// max and exp sums fold into each row's online logsumexp before the next tile overwrites it.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "row_ops.h"
#include "tiling.h"

namespace aam_fast::cpu {
namespace {

// One row's running logsumexp: max m, S = sum_v exp(z_v - m) and A = sum_v exp(z_v - m) (z_v - m) (every term <= 0)
// in float64 across tiles (float32 within a tile). mean_z = m + A / S, so the entropy lse - mean_z = log S - A / S
// is as exact as the sums.
struct RowStats {
  float max = -std::numeric_limits<float>::infinity();
  double sum = 0.0;
  double shift = 0.0;
};

// Re-base (S, A) from max `from` onto max `to` >= from: A's old terms (z - from) become (z - from) + (from - to).
void rebase(double& sum, double& shift, float from, float to) {
  if (sum == 0.0) return;  // nothing folded yet (from = -inf): keep 0, not -inf * 0
  const double delta = static_cast<double>(from) - static_cast<double>(to);
  const double rescale = std::exp(delta);
  shift = (shift + delta * sum) * rescale;
  sum *= rescale;
}

void fold_tile_row(RowStats& st, float* z, int64_t cols, const float* bias, float scale, bool with_entropy) {
  const float tile_max = bias_scale_max(z, cols, bias, scale);
  if (tile_max > st.max) {
    rebase(st.sum, st.shift, st.max, tile_max);
    st.max = tile_max;
  }
  float sum, shift;
  // while every entry so far is -inf (a masked head of the vocabulary), shift by 0: -inf - (-inf) would be NaN
  exp_sums(z, cols, std::isinf(st.max) && st.max < 0 ? 0.0f : st.max, with_entropy, sum, shift);
  st.sum += sum;
  st.shift += shift;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_forward(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& targets_in, double inv_temperature, bool with_entropy, int64_t block_rows, int64_t tile_width,
    int64_t vocab_chunks) {
  check_inputs(hidden_in, weight_in, bias_in, targets_in);
  const at::Tensor hidden = hidden_in.detach();
  const at::Tensor weight = weight_in.detach();
  const at::Tensor targets = targets_in.contiguous();
  const int64_t n = hidden.size(0), dim = hidden.size(1), vocab = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);

  at::Tensor lse = at::empty({n}, f32.dtype(at::kDouble));
  at::Tensor target_logit = at::empty({n}, f32);
  at::Tensor mean_z = at::empty({with_entropy ? n : 0}, f32.dtype(at::kDouble));
  if (n == 0) return {lse, target_logit, mean_z};

  at::Tensor bias32;
  if (bias_in.has_value() && bias_in->defined()) bias32 = bias_in->detach().to(at::kFloat).contiguous();
  const float* bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  const float scale = static_cast<float>(inv_temperature);
  const int64_t* y = targets.data_ptr<int64_t>();
  float* picked = target_logit.data_ptr<float>();

  const TilePlan plan = make_plan(n, vocab, dim, block_rows, tile_width, vocab_chunks);
  // Row statistics of each vocabulary chunk, merged after all tasks (one chunk: merged in place).
  std::vector<RowStats> stats(static_cast<size_t>(plan.chunks * n));

  std::vector<TileWorkspace> spaces(static_cast<size_t>(plan.threads));
  const bool low_precision = hidden.scalar_type() != at::kFloat;

  run_tasks(plan.tasks(), plan.threads, [&](int64_t task, int worker) {
    TileWorkspace& ws = spaces[static_cast<size_t>(worker)];
    ws.ensure(plan, f32, low_precision);
    const int64_t block = plan.block_of(task), chunk = plan.chunk_of(task);
    const int64_t r0 = block * plan.rows, nr = std::min(plan.rows, n - r0);
    const at::Tensor h = float_rows(hidden, r0, nr, ws.hidden32);
    RowStats* row_stats = stats.data() + chunk * n + r0;
    const int64_t first = plan.chunk_first_tile(chunk), last = plan.chunk_first_tile(chunk + 1);
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t v0 = tile * plan.width, cols = std::min(plan.width, vocab - v0);
      const at::Tensor w = float_rows(weight, v0, cols, ws.weight32);
      at::Tensor z = ws.logits.narrow(0, 0, nr * cols).view({nr, cols});
      at::mm_out(z, h, w.t());
      float* zp = z.data_ptr<float>();
      for (int64_t r = 0; r < nr; ++r) {
        float* row = zp + r * cols;
        fold_tile_row(row_stats[r], row, cols, bias != nullptr ? bias + v0 : nullptr, scale, with_entropy);
        const int64_t col = y[r0 + r] - v0;
        if (col >= 0 && col < cols) picked[r0 + r] = row[col];
      }
    }
  });

  double* lse_out = lse.data_ptr<double>();
  double* mean_z_out = with_entropy ? mean_z.data_ptr<double>() : nullptr;
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < plan.chunks; ++c) top = std::max(top, stats[c * n + t].max);
      double sum = 0.0, shift = 0.0;
      for (int64_t c = 0; c < plan.chunks; ++c) {
        RowStats st = stats[c * n + t];
        rebase(st.sum, st.shift, st.max, top);
        sum += st.sum;
        shift += st.shift;
      }
      lse_out[t] = static_cast<double>(top) + std::log(sum);
      if (mean_z_out != nullptr) mean_z_out[t] = static_cast<double>(top) + shift / sum;
    }
  });
  return {lse, target_logit, mean_z};
}

}  // namespace aam_fast::cpu

// Backward: recompute each logits tile of a token block, turn it into the logits' gradient in place while it is in
// cache, and apply it with two matrix products: d_hidden[block] += dZ W[tile] (the block is the task's own; the
// products are formed fresh, then added) and d_weight[tile] += dZ^T H[block] (under the tile's lock). Blocks start
// their vocabulary sweep at spread-out tiles, so concurrent tasks rarely want the same lock; d_weight is written,
// not zero-filled, by a tile's first product. No per-thread copy of d_weight exists; d_bias is summed in float64
// under the same lock, rounded once.
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <memory>
#include <mutex>
#include <vector>

#include "kernels.h"
#include "row_ops.h"
#include "tiling.h"

namespace aam_fast::cpu {
namespace {

// First tile (within its chunk) of a block's sweep: the block index times the golden ratio, modulo the chunk, so
// any few blocks running at once start far apart.
int64_t sweep_offset(int64_t block, int64_t chunk_tiles) {
  const double frac = std::fmod(static_cast<double>(block) * 0.6180339887498949, 1.0);
  return std::min(chunk_tiles - 1, static_cast<int64_t>(frac * static_cast<double>(chunk_tiles)));
}

// The most vocabulary columns one float32 sum of the hidden gradient runs over (the rest add up tile by tile).
constexpr int64_t kReduceWidth = 512;

struct TileLocks {
  explicit TileLocks(int64_t tiles) : locks(new std::mutex[tiles]), written(static_cast<size_t>(tiles), 0) {}
  std::unique_ptr<std::mutex[]> locks;
  std::vector<char> written;  // guarded by the tile's lock
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_backward(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& targets_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& mean_z_in,
    const at::Tensor& grad_logp_in, const std::optional<at::Tensor>& grad_entropy_in, double inv_temperature,
    bool needs_hidden_grad, bool needs_weight_grad, bool needs_bias_grad, int64_t block_rows, int64_t tile_width,
    int64_t vocab_chunks) {
  check_inputs(hidden_in, weight_in, bias_in, targets_in);
  const at::Tensor hidden = hidden_in.detach();
  const at::Tensor weight = weight_in.detach();
  const at::Tensor targets = targets_in.contiguous();
  const int64_t n = hidden.size(0), dim = hidden.size(1), vocab = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const bool entropy = grad_entropy_in.has_value() && grad_entropy_in->defined();
  TORCH_CHECK(lse_in.numel() == n, "lse must have N=", n, " entries, got ", lse_in.numel());
  TORCH_CHECK(grad_logp_in.numel() == n, "grad_logp must have N=", n, " entries, got ", grad_logp_in.numel());
  TORCH_CHECK(!entropy || grad_entropy_in->numel() == n, "grad_entropy must have N=", n, " entries");
  TORCH_CHECK(!entropy || (mean_z_in.has_value() && mean_z_in->numel() == n),
              "grad_entropy needs mean_z with N=", n, " entries (run the forward with_entropy)");

  at::Tensor d_hidden32 = needs_hidden_grad ? at::empty({n, dim}, f32) : at::Tensor();
  at::Tensor d_weight = needs_weight_grad ? at::empty({vocab, dim}, f32) : at::empty({0}, f32);
  at::Tensor d_bias64 = needs_bias_grad ? at::zeros({vocab}, f32.dtype(at::kDouble)) : at::Tensor();
  auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    at::Tensor dh = needs_hidden_grad ? d_hidden32.to(hidden.scalar_type()) : at::empty({0}, hidden.options());
    return {dh, d_weight, needs_bias_grad ? d_bias64.to(at::kFloat) : at::empty({0}, f32)};
  };
  if (n == 0 || !(needs_hidden_grad || needs_weight_grad || needs_bias_grad)) {
    if (needs_hidden_grad) d_hidden32.zero_();
    if (needs_weight_grad) d_weight.zero_();
    return finish();
  }

  at::Tensor bias32;
  if (bias_in.has_value() && bias_in->defined()) bias32 = bias_in->detach().to(at::kFloat).contiguous();
  const float* bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  const float scale = static_cast<float>(inv_temperature);
  // the chain through z = (h W^T + b) * s scales every upstream gradient by s
  const at::Tensor g_buf = grad_logp_in.detach().to(at::kFloat).mul(inv_temperature).contiguous();
  const at::Tensor e_buf = entropy ? grad_entropy_in->detach().to(at::kFloat).mul(inv_temperature).contiguous()
                                 : at::Tensor();
  const at::Tensor lse_buf = lse_in.detach().to(at::kDouble).contiguous();
  const double* lse64 = lse_buf.data_ptr<double>();
  // Per row: the float64 lse as float32 hi + lo (log p = (z - hi) - lo keeps z - lse's rounding only), and the
  // entropy H = lse - mean_z formed in float64 before its one rounding to float32.
  std::vector<float> lse_hi(static_cast<size_t>(n)), lse_lo(static_cast<size_t>(n));
  std::vector<double> entropy64(entropy ? static_cast<size_t>(n) : 0);
  std::vector<float> entropy32(entropy ? static_cast<size_t>(n) : 0);
  {
    const at::Tensor mz_buf = entropy ? mean_z_in->detach().to(at::kDouble).contiguous() : at::Tensor();
    const double* mz = entropy ? mz_buf.data_ptr<double>() : nullptr;
    for (int64_t t = 0; t < n; ++t) {
      const size_t i = static_cast<size_t>(t);
      lse_hi[i] = static_cast<float>(lse64[t]);
      lse_lo[i] = static_cast<float>(lse64[t] - static_cast<double>(lse_hi[i]));
      if (entropy) {
        entropy64[i] = lse64[t] - mz[t];
        entropy32[i] = static_cast<float>(entropy64[i]);
      }
    }
  }
  const float* g = g_buf.data_ptr<float>();
  const float* e = entropy ? e_buf.data_ptr<float>() : nullptr;
  const int64_t* y = targets.data_ptr<int64_t>();

  const TilePlan plan = make_plan(n, vocab, dim, block_rows, tile_width, vocab_chunks);
  // With several vocabulary chunks a block's hidden gradient has one partial sum per chunk, added at the end.
  at::Tensor dh_parts = (needs_hidden_grad && plan.chunks > 1) ? at::empty({plan.chunks, n, dim}, f32) : at::Tensor();
  TileLocks locks(plan.tiles);

  std::vector<TileWorkspace> spaces(static_cast<size_t>(plan.threads));
  const bool low_precision = hidden.scalar_type() != at::kFloat;

  run_tasks(plan.tasks(), plan.threads, [&](int64_t task, int worker) {
    TileWorkspace& ws = spaces[static_cast<size_t>(worker)];
    ws.ensure(plan, f32, low_precision);
    if (needs_hidden_grad && !ws.product.defined()) ws.product = at::empty({plan.rows, plan.dim}, f32);
    const int64_t block = plan.block_of(task), chunk = plan.chunk_of(task);
    const int64_t r0 = block * plan.rows, nr = std::min(plan.rows, n - r0);
    const at::Tensor h = float_rows(hidden, r0, nr, ws.hidden32);
    at::Tensor dh;
    if (needs_hidden_grad) dh = plan.chunks > 1 ? dh_parts[chunk].narrow(0, r0, nr) : d_hidden32.narrow(0, r0, nr);
    bool dh_written = false;

    const int64_t first = plan.chunk_first_tile(chunk), count = plan.chunk_first_tile(chunk + 1) - first;
    const int64_t offset = sweep_offset(block, count);
    for (int64_t k = 0; k < count; ++k) {
      const int64_t tile = first + (offset + k) % count;
      const int64_t v0 = tile * plan.width, cols = std::min(plan.width, vocab - v0);
      const float* tile_bias = bias != nullptr ? bias + v0 : nullptr;
      const at::Tensor w = float_rows(weight, v0, cols, ws.weight32);
      at::Tensor z = ws.logits.narrow(0, 0, nr * cols).view({nr, cols});
      at::mm_out(z, h, w.t());
      float* zp = z.data_ptr<float>();
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t t = r0 + r;
        float* row = zp + r * cols;
        const int64_t col = y[t] - v0;
        const bool has_target = col >= 0 && col < cols;
        // the target logit as the row pass forms it, before the row becomes its gradient
        const float z_y = !has_target ? 0.0f
                          : tile_bias != nullptr ? (row[col] + tile_bias[col]) * scale
                                                 : row[col] * scale;
        const size_t i = static_cast<size_t>(t);
        const float e_row = entropy ? e[t] : 0.0f, h_row = entropy ? entropy32[i] : 0.0f;
        logit_grad_row(row, cols, tile_bias, scale, lse_hi[i], lse_lo[i], g[t], entropy, e_row, h_row);
        if (has_target) {
          // dz_y = g (1 - p_y) - e p_y (log p_y + H), with 1 - p_y = -expm1(z_y - lse) exact when p_y ~ 1
          const double log_p = static_cast<double>(z_y) - lse64[t];
          double dz = -static_cast<double>(g[t]) * std::expm1(log_p);
          if (entropy) dz -= static_cast<double>(e_row) * std::exp(log_p) * (log_p + entropy64[i]);
          row[col] = static_cast<float>(dz);
        }
      }
      if (needs_hidden_grad) {
        // fresh products of at most kReduceWidth columns, added: never dh.addmm_. MKL's sgemm sums the rows of a
        // product with few rows (a last block of under 4) serially into its output, so accumulating in place runs
        // one float32 sum over the whole vocabulary (~10x naive autograd's error at V = 65,536)
        if (!dh_written) {
          dh.zero_();
          dh_written = true;
        }
        at::Tensor part = ws.product.narrow(0, 0, nr);
        for (int64_t c0 = 0; c0 < cols; c0 += kReduceWidth) {
          const int64_t piece = std::min(kReduceWidth, cols - c0);
          at::mm_out(part, z.narrow(1, c0, piece), w.narrow(0, c0, piece));
          dh.add_(part);
        }
      }
      if (needs_weight_grad || needs_bias_grad) {
        std::lock_guard<std::mutex> guard(locks.locks[tile]);
        if (needs_weight_grad) {
          at::Tensor dw = d_weight.narrow(0, v0, cols);
          if (locks.written[static_cast<size_t>(tile)]) {
            dw.addmm_(z.t(), h);
          } else {
            at::mm_out(dw, z.t(), h);
            locks.written[static_cast<size_t>(tile)] = 1;
          }
        }
        if (needs_bias_grad) {
          // float64 running sums: N rows add up with no float32 rounding per row (a serial float32 sum
          // grows its error with N; naive autograd's column sum is pairwise)
          double* db = d_bias64.data_ptr<double>() + v0;
          for (int64_t r = 0; r < nr; ++r) {
            const float* row = zp + r * cols;
            for (int64_t j = 0; j < cols; ++j) db[j] += static_cast<double>(row[j]);
          }
        }
      }
    }
  });

  if (needs_hidden_grad && plan.chunks > 1) at::sum_out(d_hidden32, dh_parts, {0});
  return finish();
}

}  // namespace aam_fast::cpu

#include "tiling.h"

#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <atomic>

namespace aam_fast::cpu {
namespace {

// A 256 x 256 float32 tile is 256 KiB: it stays in a 1 MiB L2 between its matrix product and the passes over it.
constexpr int64_t kDefaultRows = 256;
constexpr int64_t kMinRows = 64;
constexpr int64_t kDefaultWidth = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

TilePlan make_plan(int64_t n, int64_t vocab, int64_t dim, int64_t block_rows, int64_t tile_width,
                   int64_t vocab_chunks) {
  TilePlan plan;
  plan.n = n;
  plan.vocab = vocab;
  plan.dim = dim;
  plan.threads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  plan.width = std::max<int64_t>(1, std::min(vocab, tile_width > 0 ? tile_width : kDefaultWidth));
  if (block_rows > 0) {
    plan.rows = block_rows;
  } else {
    plan.rows = std::clamp(ceil_div(n, plan.threads), kMinRows, kDefaultRows);
  }
  plan.rows = std::max<int64_t>(1, std::min(plan.rows, n));
  plan.blocks = ceil_div(n, plan.rows);
  plan.tiles = ceil_div(vocab, plan.width);
  int64_t chunks = vocab_chunks > 0 ? vocab_chunks
                                    : (plan.blocks >= plan.threads ? 1 : ceil_div(plan.threads, plan.blocks));
  plan.chunks = std::max<int64_t>(1, std::min(chunks, plan.tiles));
  return plan;
}

void run_tasks(int64_t tasks, int threads, const std::function<void(int64_t, int)>& task) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, tasks));
  if (workers == 1) {
    c10::NoGradGuard no_grad;
    for (int64_t t = 0; t < tasks; ++t) task(t, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    c10::NoGradGuard no_grad;
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) task(t, static_cast<int>(worker));
    }
  });
}

at::Tensor float_rows(const at::Tensor& src, int64_t start, int64_t count, at::Tensor& scratch) {
  at::Tensor rows = src.narrow(0, start, count);
  if (src.scalar_type() == at::kFloat) return rows;
  at::Tensor out = scratch.narrow(0, 0, count);
  out.copy_(rows);
  return out;
}

}  // namespace aam_fast::cpu

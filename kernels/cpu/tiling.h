// How the native kernels split the work: token blocks x vocabulary tiles, and the tasks the threads take.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <functional>

namespace aam_fast::cpu {

// Token blocks of `rows` rows and vocabulary tiles of `width` columns. A task is one token block over one
// vocabulary chunk (a run of whole tiles); the vocabulary is split into `chunks` > 1 only when there are fewer
// token blocks than threads, so that a few tokens still use every thread and read each weight row once.
struct TilePlan {
  int64_t n = 0, vocab = 0, dim = 0;
  int64_t rows = 0, width = 0;
  int64_t blocks = 0, tiles = 0, chunks = 1;
  int threads = 1;

  int64_t tasks() const { return blocks * chunks; }
  int64_t block_of(int64_t task) const { return task / chunks; }
  int64_t chunk_of(int64_t task) const { return task % chunks; }
  int64_t chunk_first_tile(int64_t chunk) const { return chunk * tiles / chunks; }
};

// One worker's float32 buffers, allocated on its first task and reused: the logits tile, and for 16-bit inputs the
// converted hidden rows and weight tile.
struct TileWorkspace {
  at::Tensor logits, hidden32, weight32;
  at::Tensor product;  // [rows, D] float32: a tile's d_hidden product (backward only, allocated there)

  void ensure(const TilePlan& plan, const at::TensorOptions& f32, bool low_precision) {
    if (logits.defined()) return;
    logits = at::empty({plan.rows * plan.width}, f32);
    if (low_precision) {
      hidden32 = at::empty({plan.rows, plan.dim}, f32);
      weight32 = at::empty({plan.width, plan.dim}, f32);
    }
  }
};

// `block_rows`, `tile_width`, `vocab_chunks` <= 0 pick the defaults (tiles sized for the L2 cache).
TilePlan make_plan(int64_t n, int64_t vocab, int64_t dim, int64_t block_rows, int64_t tile_width,
                   int64_t vocab_chunks);

// Runs task(t, worker) for t in [0, tasks) on up to plan.threads workers that take the next task as they finish
// (a loaded machine stalls one thread without leaving the other idle). Inside each worker ATen runs serially and
// records no autograd graph; a single worker runs on the calling thread, where ATen may use every thread.
void run_tasks(int64_t tasks, int threads, const std::function<void(int64_t, int)>& task);

// A float32 view of rows [start, start + count) of `src` ([R, D]): the rows themselves for float32, else a
// conversion into `scratch` ([>= count, D] float32).
at::Tensor float_rows(const at::Tensor& src, int64_t start, int64_t count, at::Tensor& scratch);

}  // namespace aam_fast::cpu

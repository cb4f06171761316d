// Prefetching of the next key block's K and V rows into L2 from inside the softmax's exp pass.
// A key block's K and V (64-128 KB per head at 256 keys) come from L3 or memory: a tile's pass
// over a long cache does not fit L2, and each query tile of a head reads them again. Read cold,
// the bf16 prefill's V packing took 11% of the step and the tile loads of K waited too (perf, AMX
// Xeon). The exp pass is compute-bound, so its loop issues the next block's prefetches a few lines
// at a time: the memory traffic runs under the arithmetic instead of after it.
#pragma once

#include <cstdint>

namespace beacon_cpu {

class BlockPrefetch {
 public:
  // Adds `rows` rows of `row_bytes` at `rows_begin`, `stride_bytes` apart; only contiguous rows
  // (stride = row size) are taken (a strided view would prefetch the bytes between them too).
  void add(const void* rows_begin, int64_t rows, int64_t row_bytes, int64_t stride_bytes) {
    if (n_ == 2 || rows <= 0 || stride_bytes != row_bytes) return;
    next_[n_] = static_cast<const char*>(rows_begin);
    end_[n_] = next_[n_] + rows * row_bytes;
    ++n_;
  }
  // The caller's loop will call step() `steps` times: each call issues an equal share.
  void spread_over(int steps) {
    int64_t lines = 0;
    for (int i = 0; i < n_; ++i) lines = (end_[i] - next_[i] + 63) / 64 > lines ? (end_[i] - next_[i] + 63) / 64 : lines;
    per_step_ = steps > 0 ? static_cast<int>((lines + steps - 1) / steps) : 0;
  }
  // Prefetches the next share of lines of each range into L2.
  inline __attribute__((always_inline)) void step() {
    for (int i = 0; i < n_; ++i)
      for (int l = 0; l < per_step_ && next_[i] < end_[i]; ++l, next_[i] += 64) __builtin_prefetch(next_[i], 0, 2);
  }

 private:
  const char* next_[2] = {nullptr, nullptr};
  const char* end_[2] = {nullptr, nullptr};
  int n_ = 0;
  int per_step_ = 0;
};

}  // namespace beacon_cpu

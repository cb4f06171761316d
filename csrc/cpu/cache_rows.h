// Row kernels of the CPU cache ops: rotate rows of head_dim elements by one RoPE angle set,
// computed in fp32 and rounded once. Pair layout and the rotation formula come from rope.h.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

#include "rope.h"

namespace beacon::rows {

// Rotate the fp32 row x[0..2*half) in place; sin is multiplied by sin_sign (+1 or -1, exact).
template <bool kInterleaved>
inline void rotate_fp32(float* __restrict x, const float* __restrict c, const float* __restrict s,
                        float sin_sign, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const int i0 = pair_first(static_cast<int>(i), static_cast<int>(half), kInterleaved);
    const int i1 = pair_second(static_cast<int>(i), static_cast<int>(half), kInterleaved);
    float x0 = x[i0], x1 = x[i1];
    rotate_pair(x0, x1, c[i], sin_sign * s[i]);
    x[i0] = x0;
    x[i1] = x1;
  }
}

template <typename T>
inline void load_fp32(const T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void store_fp32(const float* __restrict src, T* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// dst row i <- src row i rotated, for i = 0..nrows-1 in increasing order. Each row is read
// completely before it is written, so src == dst (in place) and dst below src with overlapping
// ranges (the carried-raw shift of compaction) are both safe.
template <typename T>
inline void rotate_rows(const T* src, T* dst, int64_t nrows, int64_t D, const float* cos_row,
                        const float* sin_row, float sin_sign, bool interleaved) {
  constexpr int64_t kStack = 512;
  float stack_buf[kStack];
  std::vector<float> heap_buf;
  float* buf = stack_buf;
  if (D > kStack) {
    heap_buf.resize(D);
    buf = heap_buf.data();
  }
  const int64_t half = D / 2;
  for (int64_t r = 0; r < nrows; ++r) {
    load_fp32(src + r * D, buf, D);
    if (interleaved) {
      rotate_fp32<true>(buf, cos_row, sin_row, sin_sign, half);
    } else {
      rotate_fp32<false>(buf, cos_row, sin_row, sin_sign, half);
    }
    store_fp32(buf, dst + r * D, D);
  }
}

}  // namespace beacon::rows

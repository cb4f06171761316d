// RoPE rotation by a position or by a position difference, written once for the CPU and CUDA
// kernels: which elements pair up, the rotation of a pair, and table lookups. Which position a
// token has is positions.h; which keys compaction moves is compaction.h.
#pragma once

#include "beacon_mask.h"  // BEACON_HD

namespace beacon {

// Element indices of rotation pair i (0 <= i < head_dim / 2).
// rotate-half (Hugging Face checkpoints): (i, i + D/2); interleaved (GGUF / Meta): (2i, 2i + 1).
BEACON_HD int pair_first(int i, int half, bool interleaved) { return interleaved ? 2 * i : i; }
BEACON_HD int pair_second(int i, int half, bool interleaved) { return interleaved ? 2 * i + 1 : i + half; }

// (x0, x1) <- rotation by the angle whose cosine and sine are (c, s).
// On the GPU the products and sums are rounded separately (no FMA contraction), so the CUDA
// kernels give bit-identical results to the CPU ones, which compile to plain mul/sub/add.
BEACON_HD void rotate_pair(float& x0, float& x1, float c, float s) {
#if defined(__CUDA_ARCH__)
  const float y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
  const float y1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
#else
  const float y0 = x0 * c - x1 * s;
  const float y1 = x1 * c + x0 * s;
#endif
  x0 = y0;
  x1 = y1;
}

// cos/sin of pair i at a signed position difference d, from tables indexed by |d|
// (cos is even, sin is odd). Tables are fp32 [max_pos, D/2], row-major.
BEACON_HD void cos_sin_at(const float* cos_t, const float* sin_t, int half, int d, int i,
                          float* c, float* s) {
  const int a = d < 0 ? -d : d;
  *c = cos_t[a * half + i];
  const float sv = sin_t[a * half + i];
  *s = d < 0 ? -sv : sv;
}

}  // namespace beacon

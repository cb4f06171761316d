// RoPE positions of the condensed cache (spec section 4) and rotation by a position or by a
// position difference, written once for the CPU and CUDA kernels. Mirrors
// beacon_ops/positions.py.
//
// Positions restart every window: memory slot i has position i, raw token t of the window has
// position M + t (so both equal their slot index), beacon j of the window has
//   segmentation M + r,   step-expansion M + (j + 1) * r,   full-coverage M + W.
// Keys are cached rotated; when compaction moves a key, it is rotated by (new - old) position,
// which composes with the rotation already applied (RoPE is a rotation).
#pragma once

#include "beacon_mask.h"

namespace beacon {

BEACON_HD int beacon_position(int mem, int j, int ratio, int window, Mode mode) {
  switch (mode) {
    case Mode::kSegmentation: return mem + ratio;
    case Mode::kStepExpansion: return mem + (j + 1) * ratio;
    default: return mem + window;
  }
}

// Position of the token in cache slot `slot` of a sequence with M memory and R raw slots.
BEACON_HD int slot_position(int slot, int mem, int raw, int ratio, int window, Mode mode) {
  return slot < mem + raw ? slot : beacon_position(mem, slot - mem - raw, ratio, window, mode);
}

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

// The moves of one sequence's compaction (spec section 5), for a full window with r > 0:
//   beacon j (0 <= j < B):   slot M + W + j      -> M + j,             rotated by its delta;
//   carried raw t (S <= t < W): slot M + t       -> M + B + (t - S),   rotated by B - S.
// With r = 0 nothing moves: memory absorbs the first S raw slots in place, and carried raw
// tokens keep both their slots and positions. Destinations never lie above their sources, and
// only the carried-raw moves overlap each other (a shift down by S - B): copying in increasing
// slot order, or in rounds of S - B slots, is race-free.
struct CompactionPlan {
  int num_beacons;  // B = S / r (0 for r = 0)
  int num_carried;  // W - S
  int new_mem;      // M + B (r > 0) or M + S (r = 0)
};

BEACON_HD CompactionPlan compaction_plan(int mem, int window, int stride, int ratio) {
  CompactionPlan p;
  p.num_beacons = ratio > 0 ? stride / ratio : 0;
  p.num_carried = window - stride;
  p.new_mem = mem + (ratio > 0 ? p.num_beacons : stride);
  return p;
}

// Source slot, destination slot and rotation delta of move m (0 <= m < B + W - S) for r > 0:
// moves 0..B-1 are the beacons, then the carried raw tokens in order.
BEACON_HD void compaction_move(int m, int mem, int window, int stride, int ratio, Mode mode,
                               int* src, int* dst, int* delta) {
  const int B = stride / ratio;
  if (m < B) {
    *src = mem + window + m;
    *dst = mem + m;
    *delta = *dst - beacon_position(mem, m, ratio, window, mode);
  } else {
    const int t = stride + (m - B);
    *src = mem + t;
    *dst = mem + B + (t - stride);
    *delta = B - stride;
  }
}

}  // namespace beacon

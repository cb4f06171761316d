// The moves of one sequence's compaction (spec section 5), written once for the CPU and CUDA
// kernels. Keys are cached rotated; a moved key is rotated by (new - old) position, which
// composes with the rotation already applied (RoPE is a rotation; see rope.h).
//
// For a full window with r > 0:
//   beacon j (0 <= j < B):   slot M + W + j      -> M + j,             rotated by its delta;
//   carried raw t (S <= t < W): slot M + t       -> M + B + (t - S),   rotated by B - S.
// With r = 0 nothing moves: memory absorbs the first S raw slots in place, and carried raw
// tokens keep both their slots and positions. Destinations never lie above their sources, and
// only the carried-raw moves overlap each other (a shift down by S - B): copying in increasing
// slot order, or in rounds of S - B slots, is race-free.
#pragma once

#include "positions.h"

namespace beacon {

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

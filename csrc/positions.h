// RoPE positions of the condensed cache (spec section 4), written once for the CPU and CUDA
// kernels. Mirrors beacon_ops/positions.py.
//
// Positions restart every window: memory slot i has position i, raw token t of the window has
// position M + t (so both equal their slot index), beacon j of the window has
//   segmentation M + r,   step-expansion M + (j + 1) * r,   full-coverage M + W,
// and, under the newer variant's rules, the next consecutive slot after the raw tokens and the
// earlier beacons:   causal M + W + j,   step-causal M + (j + 1) * r + j.
// Callers keep (j + 1) * r <= stride (the ops check that r divides the stride), so no int
// arithmetic here overflows.
#pragma once

#include "beacon_mask.h"

namespace beacon {

BEACON_HD int beacon_position(int mem, int j, int ratio, int window, Mode mode) {
  switch (mode) {
    case Mode::kSegmentation: return mem + ratio;
    case Mode::kStepExpansion: return mem + (j + 1) * ratio;
    case Mode::kCausal: return mem + window + j;
    case Mode::kStepCausal: return mem + (j + 1) * ratio + j;
    default: return mem + window;
  }
}

// Position of the token in cache slot `slot` of a sequence with M memory and R raw slots.
BEACON_HD int slot_position(int slot, int mem, int raw, int ratio, int window, Mode mode) {
  return slot < mem + raw ? slot : beacon_position(mem, slot - mem - raw, ratio, window, mode);
}

}  // namespace beacon

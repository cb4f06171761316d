// Which keys a query row of an Activation Beacon step sees (spec section 3), written once for
// the CPU and CUDA kernels (__host__ __device__). Keys of a sequence are laid out
// [memory 0..M-1 | raw 0..R-1 | beacons 0..B-1]; its queries are the step's new raw tokens
// followed by its B beacons (B = beacon_len, 0 unless the step completes the window).
//
// Every row sees a union of at most three key intervals, in increasing key order:
//   [0, head_end)            memory, and for raw rows and contiguous beacon ranges the raw keys
//   [mid_begin, mid_end)     a beacon's raw range when it is not contiguous with the head
//   [self_key, self_key + 1) a beacon row's own key (-1: none)
// A row whose three pieces are empty sees nothing: out = 0, lse = +inf.
//
// Mask kinds: the paper's three modes (the original rules), and two rules of the newer variant
// (the released beacon models), in which the memory is always visible and attend_previous plays
// no part:
//   kCausal      every row sees every key up to its own (full-coverage of the newer variant; also
//                serves interleaved windows, whose beacons are among the raw keys)
//   kStepCausal  beacon j sees the memory, raw [0, (j+1) r) and beacons 0..j (step-expansion of
//                the newer variant with attend_previous; without it, the newer rule is
//                kStepExpansion with the memory visible)
#pragma once

#if defined(__CUDACC__)
#define BEACON_HD __host__ __device__ __forceinline__
#else
#define BEACON_HD inline
#endif

namespace beacon {

enum class Mode : int {
  kSegmentation = 0,
  kStepExpansion = 1,
  kFullCoverage = 2,
  kCausal = 3,
  kStepCausal = 4,
};

// Lengths of one sequence at attention time (after the step's keys were appended).
struct SeqLens {
  int mem;     // M: memory slots
  int raw;     // R: raw tokens of the current window in the cache (this step's included)
  int beacon;  // B: beacons of the current window in the cache = the step's last B queries
  int ratio;   // r: raw tokens per beacon (0: no beacons)
};

struct RowSpans {
  int head_end;
  int mid_begin, mid_end;
  int self_key;
};

BEACON_HD int imin(int a, int b) { return a < b ? a : b; }
BEACON_HD int imax(int a, int b) { return a > b ? a : b; }

// Number of keys of the sequence: M + R + B.
BEACON_HD int num_keys(const SeqLens& L) { return L.mem + L.raw + L.beacon; }

// Beacon j's raw range [lo, hi) within the window (raw indices), for the mode. The products
// j * r can exceed int for any ratio the op accepts (its window is not an op argument), so they
// are formed in 64 bits and clipped to R before narrowing.
BEACON_HD void beacon_raw_range(const SeqLens& L, int j, Mode mode, int* lo, int* hi) {
  const long long r = L.ratio, raw = L.raw;
  long long l = 0, h = raw;  // full coverage: the whole window
  switch (mode) {
    case Mode::kSegmentation: l = j * r; h = (j + 1) * r; break;
    case Mode::kStepExpansion:
    case Mode::kStepCausal: h = (j + 1) * r; break;
    default: break;
  }
  h = h < raw ? h : raw;
  l = l < h ? l : h;
  *lo = static_cast<int>(l);
  *hi = static_cast<int>(h);
}

// Spans of local query row q (0 <= q < n_q) of a sequence with n_q queries this step.
BEACON_HD RowSpans row_spans(const SeqLens& L, int n_q, int q, Mode mode, bool attend_previous) {
  RowSpans s{0, 0, 0, -1};
  const int n_raw_q = n_q - L.beacon;
  if (q < n_raw_q) {
    // Raw token t of the window: memory + raw 0..t (causal, aligned bottom-right).
    const int t = L.raw - n_raw_q + q;
    s.head_end = L.mem + t + 1;
    return s;
  }
  const int j = q - n_raw_q;
  if (mode == Mode::kCausal) {
    s.head_end = L.mem + L.raw + j + 1;  // everything up to the beacon's own key
    return s;
  }
  int lo, hi;
  beacon_raw_range(L, j, mode, &lo, &hi);
  s.self_key = L.mem + L.raw + j;
  if (mode == Mode::kStepCausal) {
    s.head_end = L.mem + hi;  // memory and raw [0, (j+1) r)
    if (j > 0) {              // the earlier beacons of the window (an empty span stays 0, 0)
      s.mid_begin = L.mem + L.raw;
      s.mid_end = L.mem + L.raw + j;
    }
    return s;
  }
  if (attend_previous && lo == 0) {
    s.head_end = L.mem + hi;  // memory and raw range are contiguous
  } else {
    s.head_end = attend_previous ? L.mem : 0;
    if (hi > lo) {
      s.mid_begin = L.mem + lo;
      s.mid_end = L.mem + hi;
    }
  }
  return s;
}

BEACON_HD bool key_visible(const RowSpans& s, int k) {
  return k < s.head_end || (k >= s.mid_begin && k < s.mid_end) || k == s.self_key;
}

// Number of keys the row sees (exact work for FLOP counting).
BEACON_HD int visible_count(const RowSpans& s) {
  return s.head_end + (s.mid_end - s.mid_begin) + (s.self_key >= 0 ? 1 : 0);
}

// One past the last key the row sees (0 when it sees none).
BEACON_HD int key_end(const RowSpans& s) {
  return imax(imax(s.head_end, s.mid_end), s.self_key + 1);
}

// How a key block [k0, k1) looks to one row.
enum class BlockKind : int { kSkip = 0, kPartial = 1, kFull = 2 };

BEACON_HD BlockKind classify_block(const RowSpans& s, int k0, int k1) {
  if (k1 <= s.head_end || (k0 >= s.mid_begin && k1 <= s.mid_end)) return BlockKind::kFull;
  const bool touches = k0 < s.head_end || (k0 < s.mid_end && k1 > s.mid_begin) ||
                       (s.self_key >= k0 && s.self_key < k1);
  if (!touches) return BlockKind::kSkip;
  if (k1 - k0 == 1) return BlockKind::kFull;  // a touched single key is visible
  return BlockKind::kPartial;
}

// Combine the kinds of the rows of a query tile: skip only if every row skips, full only if
// every row sees the whole block.
BEACON_HD BlockKind combine_kinds(BlockKind a, BlockKind b) {
  if (a == b) return a;
  return BlockKind::kPartial;
}

}  // namespace beacon

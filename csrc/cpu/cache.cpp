// CPU kernels of the condensed-cache ops: rope_ (rotate queries in place), append_kv (write a
// step's keys, rotated, and values into each sequence's last slots) and compact_ (in-place
// compaction of all layers after a full window, spec section 5).
//
// Positions, rotation pairs and compaction moves come from positions.h, rope.h and
// compaction.h; this file only validates (op_checks.h, then the length values), schedules
// (at::parallel_for over tokens, or over (layer, sequence, head) planes) and moves rows
// (csrc/cpu/cache_rows.h: vectorised rotation, chosen at run time for the CPU).
// Every check runs before the first write, so a call that raises leaves caches and lengths as
// they were. Rotations are computed in fp32 and rounded once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "compaction.h"
#include "cpu/cache_rows.h"
#include "op_checks.h"
#include "rope.h"

namespace beacon {
namespace {

// The CPU kernels index rows of these tensors as dense arrays (the shared checks only require
// head_dim to be contiguous).
void check_contiguous(const char* op, std::initializer_list<checks::Arg> args) {
  for (const checks::Arg& a : args)
    TORCH_CHECK_VALUE(a.t.is_contiguous(), op, ": ", a.name, " must be contiguous for the CPU kernel, got strides ",
                      a.t.strides());
}

// ------------------------------------------------------------------------------------------------
// rope_
void rope_cpu(at::Tensor x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
              bool interleaved) {
  constexpr const char* op = "beacon.rope_";
  checks::check_rope(op, x, positions, cos, sin);
  check_contiguous(op, {{x, "x"}});
  const int64_t n = x.size(0), heads = x.size(1), D = x.size(2);
  const int32_t* pos = positions.data_ptr<int32_t>();
  const int64_t rows = cos.size(0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(pos[i] >= 0 && pos[i] < rows, op, ": positions[", i, "] = ", pos[i],
                      " is outside the cos/sin tables [0, ", rows, ")");
  }
  if (n == 0 || heads == 0 || D == 0) return;
  const float* cos_t = cos.data_ptr<float>();
  const float* sin_t = sin.data_ptr<float>();
  const int64_t half = D / 2;
  BEACON_DISPATCH_CACHE_TYPES(x.scalar_type(), "rope_cpu", [&] {
    scalar_t* base = x.data_ptr<scalar_t>();
    const int64_t row = heads * D;  // one token: all its heads share the position
    const int64_t grain = std::max<int64_t>(1, 16384 / row);
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const rows::Angles angles{cos_t, sin_t, half, nullptr, pos[t]};
        rows::rotate_rows(base + t * row, D, base + t * row, D, heads, D, angles, interleaved);
      }
    });
  });
}

// ------------------------------------------------------------------------------------------------
// append_kv
void append_kv_cpu(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                   const at::Tensor& cu_seqlens, const at::Tensor& mem_len, const at::Tensor& raw_len,
                   const at::Tensor& beacon_len, const at::Tensor& positions, const at::Tensor& cos,
                   const at::Tensor& sin, bool interleaved) {
  constexpr const char* op = "beacon.append_kv";
  checks::check_append_kv(op, k_cache, v_cache, k_new, v_new, cu_seqlens, mem_len, raw_len, beacon_len, positions,
                          cos, sin);
  check_contiguous(op, {{k_cache, "k_cache"}, {v_cache, "v_cache"}, {k_new, "k_new"}, {v_new, "v_new"}});
  const int64_t batch = k_cache.size(0), heads = k_cache.size(1), cap = k_cache.size(2), D = k_cache.size(3);
  const int64_t total = k_new.size(0);

  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int32_t* mem = mem_len.data_ptr<int32_t>();
  const int32_t* raw = raw_len.data_ptr<int32_t>();
  const int32_t* bea = beacon_len.data_ptr<int32_t>();
  const int32_t* pos = positions.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(cu[0] == 0, op, ": cu_seqlens[0] must be 0, got ", cu[0]);
  TORCH_CHECK_VALUE(cu[batch] == total, op, ": cu_seqlens[", batch, "] = ", cu[batch],
                    " must equal the number of new tokens ", total);
  std::vector<int64_t> first_slot(batch);  // slot of each sequence's first new token
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = static_cast<int64_t>(cu[b + 1]) - cu[b];
    TORCH_CHECK_VALUE(n >= 0, op, ": cu_seqlens must be non-decreasing, got cu_seqlens[", b, "] = ", cu[b],
                      " > cu_seqlens[", b + 1, "] = ", cu[b + 1]);
    TORCH_CHECK_VALUE(mem[b] >= 0, op, ": mem_len[", b, "] = ", mem[b], " must be >= 0");
    TORCH_CHECK_VALUE(raw[b] >= 0, op, ": raw_len[", b, "] = ", raw[b], " must be >= 0");
    TORCH_CHECK_VALUE(bea[b] >= 0, op, ": beacon_len[", b, "] = ", bea[b], " must be >= 0");
    const int64_t end = static_cast<int64_t>(mem[b]) + raw[b] + bea[b];
    TORCH_CHECK_VALUE(end <= cap, op, ": sequence ", b, " needs ", end,
                      " slots (mem_len + raw_len + beacon_len) but k_cache has capacity ", cap);
    TORCH_CHECK_VALUE(n <= static_cast<int64_t>(raw[b]) + bea[b], op, ": cu_seqlens gives sequence ", b, " ",
                      n, " new tokens, more than its raw_len + beacon_len = ", raw[b] + bea[b],
                      " (lengths must already count the step's tokens)");
    first_slot[b] = end - n;
  }
  const int64_t rows_available = cos.size(0);
  for (int64_t i = 0; i < total; ++i) {
    TORCH_CHECK_INDEX(pos[i] >= 0 && pos[i] < rows_available, op, ": positions[", i, "] = ", pos[i],
                      " is outside the cos/sin tables [0, ", rows_available, ")");
  }
  if (total == 0 || heads == 0 || D == 0) return;

  // Sequence of every packed token (tokens of a sequence are contiguous).
  std::vector<int32_t> seq_of(total);
  for (int64_t b = 0; b < batch; ++b) std::fill(seq_of.begin() + cu[b], seq_of.begin() + cu[b + 1], b);

  const float* cos_t = cos.data_ptr<float>();
  const float* sin_t = sin.data_ptr<float>();
  const int64_t half = D / 2;
  BEACON_DISPATCH_CACHE_TYPES(k_cache.scalar_type(), "append_kv_cpu", [&] {
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    const scalar_t* kn = k_new.data_ptr<scalar_t>();
    const scalar_t* vn = v_new.data_ptr<scalar_t>();
    const int64_t row = heads * D;
    const int64_t grain = std::max<int64_t>(1, 16384 / row);
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = seq_of[t];
        const int64_t slot = first_slot[b] + (t - cu[b]);
        const int64_t dst = (b * heads * cap + slot) * D;  // head 0; heads are cap * D apart
        const rows::Angles angles{cos_t, sin_t, half, nullptr, pos[t]};
        rows::rotate_rows(kn + t * row, D, kc + dst, cap * D, heads, D, angles, interleaved);
        for (int64_t h = 0; h < heads; ++h) {
          std::memcpy(vc + dst + h * cap * D, vn + t * row + h * D, D * sizeof(scalar_t));
        }
      }
    });
  });
}

// ------------------------------------------------------------------------------------------------
// compact_
struct SeqCompaction {
  int64_t b;
  int mem, ratio;
  std::vector<int> beacon_deltas;  // rotation of beacon j to its memory slot (rope.h)
  int carried_delta;               // rotation of every carried raw token
};

void compact_cpu(at::Tensor k_cache, at::Tensor v_cache, at::Tensor mem_len, at::Tensor raw_len,
                 at::Tensor beacon_len, const at::Tensor& ratio, const at::Tensor& cos, const at::Tensor& sin,
                 int64_t window, int64_t stride, c10::string_view mode_str, bool interleaved) {
  constexpr const char* op = "beacon.compact_";
  const Mode mode = checks::check_compact(op, k_cache, v_cache, mem_len, raw_len, beacon_len, ratio, cos, sin,
                                         window, stride, mode_str);
  check_contiguous(op, {{k_cache, "k_cache"}, {v_cache, "v_cache"}});
  const int64_t layers = k_cache.size(0), batch = k_cache.size(1), heads = k_cache.size(2);
  const int64_t cap = k_cache.size(3), D = k_cache.size(4);
  const int W = static_cast<int>(window), S = static_cast<int>(stride);

  int32_t* mem = mem_len.data_ptr<int32_t>();
  int32_t* raw = raw_len.data_ptr<int32_t>();
  int32_t* bea = beacon_len.data_ptr<int32_t>();
  const int32_t* rat = ratio.data_ptr<int32_t>();
  std::vector<SeqCompaction> work;
  int64_t max_delta = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(mem[b] >= 0, op, ": mem_len[", b, "] = ", mem[b], " must be >= 0");
    TORCH_CHECK_VALUE(raw[b] >= 0 && raw[b] <= W, op, ": raw_len[", b, "] = ", raw[b], " must be in [0, window = ",
                      W, "]");
    TORCH_CHECK_VALUE(bea[b] >= 0, op, ": beacon_len[", b, "] = ", bea[b], " must be >= 0");
    TORCH_CHECK_VALUE(rat[b] >= 0, op, ": ratio[", b, "] = ", rat[b], " must be >= 0");
    TORCH_CHECK_VALUE(rat[b] == 0 || S % rat[b] == 0, op, ": ratio[", b, "] = ", rat[b],
                      " must divide stride = ", S);
    const int64_t end = static_cast<int64_t>(mem[b]) + raw[b] + bea[b];
    TORCH_CHECK_VALUE(end <= cap, op, ": sequence ", b, " has ", end,
                      " slots in use (mem_len + raw_len + beacon_len) but the cache capacity is ", cap);
    const bool full = raw[b] == W;
    const int expected_beacons = full && rat[b] > 0 ? S / rat[b] : 0;
    TORCH_CHECK_VALUE(bea[b] == expected_beacons, op, ": beacon_len[", b, "] = ", bea[b], " is inconsistent: ",
                      full ? (rat[b] > 0 ? "a full window with ratio r > 0 holds stride / r = "
                                         : "a full window with ratio 0 holds ")
                           : "a window that is not full (raw_len < window) holds ",
                      expected_beacons, " beacons");
    if (!full) continue;
    SeqCompaction sc{b, mem[b], rat[b], {}, 0};
    if (rat[b] > 0) {
      const CompactionPlan plan = compaction_plan(mem[b], W, S, rat[b]);
      for (int m = 0; m < plan.num_beacons + plan.num_carried; ++m) {
        int src, dst, delta;
        compaction_move(m, mem[b], W, S, rat[b], mode, &src, &dst, &delta);
        if (m < plan.num_beacons) sc.beacon_deltas.push_back(delta);
        else sc.carried_delta = delta;
        max_delta = std::max<int64_t>(max_delta, std::abs(delta));
      }
    }
    work.push_back(std::move(sc));
  }
  TORCH_CHECK_INDEX(work.empty() || max_delta < cos.size(0), op, ": the cos/sin tables have ", cos.size(0),
                    " rows but compaction rotates keys by position differences up to ", max_delta);
  if (work.empty()) return;

  // Data first (all layers, sequences, heads in parallel), then the lengths.
  const int64_t half = D / 2;
  const float* cos_t = cos.data_ptr<float>();
  const float* sin_t = sin.data_ptr<float>();
  const int64_t num_work = static_cast<int64_t>(work.size());
  if (heads > 0 && D > 0) {
    BEACON_DISPATCH_CACHE_TYPES(k_cache.scalar_type(), "compact_cpu", [&] {
      scalar_t* kc = k_cache.data_ptr<scalar_t>();
      scalar_t* vc = v_cache.data_ptr<scalar_t>();
      at::parallel_for(0, layers * num_work * heads, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t h = item % heads;
          const int64_t w = (item / heads) % num_work;
          const int64_t l = item / (heads * num_work);
          const SeqCompaction& s = work[w];
          if (s.ratio == 0) continue;  // r = 0: memory absorbs the first S raw slots in place
          const int64_t plane = ((l * batch + s.b) * heads + h) * cap * D;
          scalar_t* kp = kc + plane;
          scalar_t* vp = vc + plane;
          const CompactionPlan plan = compaction_plan(s.mem, W, S, s.ratio);
          int src, dst, delta;
          // Beacons: slots M + W + j -> M + j, each with its own delta (no overlap: B = S / r <= W).
          compaction_move(0, s.mem, W, S, s.ratio, mode, &src, &dst, &delta);
          const rows::Angles beacon_angles{cos_t, sin_t, half, s.beacon_deltas.data(), 0};
          rows::rotate_rows(kp + src * D, D, kp + dst * D, D, plan.num_beacons, D, beacon_angles, interleaved);
          std::memcpy(vp + dst * D, vp + src * D, plan.num_beacons * D * sizeof(scalar_t));
          // Carried raw tokens: one shift down by S - B with one delta, in increasing slot order
          // (memmove-safe; rows are read before they are written).
          if (plan.num_carried > 0) {
            compaction_move(plan.num_beacons, s.mem, W, S, s.ratio, mode, &src, &dst, &delta);
            const rows::Angles carried_angles{cos_t, sin_t, half, nullptr, s.carried_delta};
            rows::rotate_rows(kp + src * D, D, kp + dst * D, D, plan.num_carried, D, carried_angles, interleaved);
            std::memmove(vp + static_cast<int64_t>(dst) * D, vp + static_cast<int64_t>(src) * D,
                         plan.num_carried * D * sizeof(scalar_t));
          }
        }
      });
    });
  }
  for (const SeqCompaction& s : work) {
    const CompactionPlan plan = compaction_plan(s.mem, W, S, s.ratio);
    mem[s.b] = plan.new_mem;
    raw[s.b] = plan.num_carried;
    bea[s.b] = 0;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(beacon, CPU, m) {
  m.impl("rope_", &rope_cpu);
  m.impl("append_kv", &append_kv_cpu);
  m.impl("compact_", &compact_cpu);
}

}  // namespace beacon

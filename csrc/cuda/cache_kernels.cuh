// The kernels of the condensed-cache ops (rope_, append_kv, compact_); their host code, checks
// and launches are in cache.cu. Semantics: the schemas in csrc/beacon_ops.cpp, README.md's
// contract, and the moves of compaction.h (compaction_plan / compaction_move); positions come
// only from positions.h, rotation pairs only from rope.h. Rotations are computed in fp32 and rounded once (round to
// nearest even), without FMA contraction, and position / delta 0 is an exact copy, so the
// results are bit-identical to the CPU kernels. The kernels read the lengths and protect memory
// themselves (see cache.cu). No torch headers here: T is float, c10::Half or c10::BFloat16 (their
// conversions are plain C++), so the kernels also compile for the host emulation.
#pragma once

#include <cstdint>

#include "cuda/backend.h"
#include "compaction.h"
#include "rope.h"

namespace beacon {
namespace cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// A row of D values is processed in units of 2N values = N rotation pairs (pairs c*N .. c*N+N-1
// of unit c): rotate-half pairs (i, i + D/2) -> the unit is [cN, cN+N) and [D/2+cN, D/2+cN+N);
// interleaved pairs (2i, 2i+1) -> the unit is [2cN, 2cN+2N). Units cover the row exactly once.
template <int N>
__device__ __forceinline__ void unit_offsets(int c, int half, bool interleaved, int* o0, int* o1) {
  *o0 = pair_first(c * N, half, interleaved);
  *o1 = interleaved ? *o0 + N : pair_second(c * N, half, interleaved);
}

template <typename T, int N>
struct Unit {
  // rotate() pairs interleaved values within a and within b, which needs N even (or the one
  // pair (a, b) of N = 1); cache.cu launches N = 16 / sizeof(T) or 1.
  static_assert(N == 1 || N % 2 == 0, "a unit holds whole interleaved pairs: N is 1 or even");
  Vec<T, N> a, b;

  __device__ __forceinline__ void load(const T* row, int o0, int o1) {
    BEACON_GLOBAL_READ(row + o0, sizeof(a));
    BEACON_GLOBAL_READ(row + o1, sizeof(b));
    a = *reinterpret_cast<const Vec<T, N>*>(row + o0);
    b = *reinterpret_cast<const Vec<T, N>*>(row + o1);
  }
  __device__ __forceinline__ void store(T* row, int o0, int o1) const {
    BEACON_GLOBAL_WRITE(row + o0, sizeof(a));
    BEACON_GLOBAL_WRITE(row + o1, sizeof(b));
    *reinterpret_cast<Vec<T, N>*>(row + o0) = a;
    *reinterpret_cast<Vec<T, N>*>(row + o1) = b;
  }
  // Rotate by the signed position difference `delta` (tables hold |delta|, sin is odd).
  __device__ __forceinline__ void rotate(int c, int half, int delta, const float* cos_t, const float* sin_t,
                                         bool interleaved) {
    // Loops with compile-time element indices, so the unit stays in registers. Interleaved
    // pair e is values (2e, 2e+1) of the unit: both in a for e < N/2, both in b after; with
    // N = 1 the one pair is (a, b), as for rotate-half.
    if constexpr (N % 2 == 0) {
      if (interleaved) {
#pragma unroll
        for (int e = 0; e < N / 2; ++e) rotate_one(c, half, delta, cos_t, sin_t, e, a.v[2 * e], a.v[2 * e + 1]);
#pragma unroll
        for (int e = 0; e < N / 2; ++e)
          rotate_one(c, half, delta, cos_t, sin_t, N / 2 + e, b.v[2 * e], b.v[2 * e + 1]);
        return;
      }
    }
#pragma unroll
    for (int e = 0; e < N; ++e) rotate_one(c, half, delta, cos_t, sin_t, e, a.v[e], b.v[e]);
  }
  __device__ __forceinline__ void rotate_one(int c, int half, int delta, const float* cos_t, const float* sin_t,
                                             int e, T& v0, T& v1) {
    float cf, sf;
    cos_sin_at(cos_t, sin_t, half, delta, c * N + e, &cf, &sf);
    float x0 = static_cast<float>(v0), x1 = static_cast<float>(v1);
    rotate_pair(x0, x1, cf, sf);
    v0 = static_cast<T>(x0);
    v1 = static_cast<T>(x1);
  }
  __device__ __forceinline__ void fill_nan() {
#pragma unroll
    for (int i = 0; i < N; ++i) a.v[i] = b.v[i] = static_cast<T>(NAN);
  }
};

// ------------------------------------------------------------------------------------------------
// rope_
template <typename T, int N>
__global__ void rope_kernel(T* x, int64_t n, int heads, int half, int64_t s0, int64_t s1, const int* pos,
                            const float* cos_t, const float* sin_t, int table_rows, bool interleaved) {
  const int units = half / N;
  const int64_t total = n * heads * units;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % units);
    const int64_t th = idx / units;
    const int h = static_cast<int>(th % heads);
    const int64_t t = th / heads;
    T* row = x + t * s0 + h * s1;
    int o0, o1;
    unit_offsets<N>(c, half, interleaved, &o0, &o1);
    Unit<T, N> u;
    u.load(row, o0, o1);
    const int p = pos[t];
    if (p < 0 || p >= table_rows) {
      u.fill_nan();
    } else if (p != 0) {  // position 0: an exact copy, as on the CPU (keeps -0.0 and inf)
      u.rotate(c, half, p, cos_t, sin_t, interleaved);
    }
    u.store(row, o0, o1);
  }
}

// ------------------------------------------------------------------------------------------------
// append_kv
struct AppendArgs {
  int64_t total;
  int heads, half, capacity, batch, table_rows;
  bool interleaved;
  int64_t kc_b, kc_h, kc_s, vc_b, vc_h, vc_s;  // cache strides (batch, head, slot)
  int64_t kn_t, kn_h, vn_t, vn_h;              // new-token strides (token, head)
  const int *cu, *mem, *raw, *bea, *pos;
  const float *cos_t, *sin_t;
};

// Largest b with cu[b] <= t (tokens of a sequence are contiguous; empty sequences are skipped).
__device__ __forceinline__ int sequence_of(const int* cu, int batch, int64_t t) {
  int lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T, int N>
__global__ void append_kv_kernel(T* kc, T* vc, const T* kn, const T* vn, const AppendArgs a) {
  const int units = a.half / N;
  const int64_t total = a.total * a.heads * units;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % units);
    const int64_t th = idx / units;
    const int h = static_cast<int>(th % a.heads);
    const int64_t t = th / a.heads;
    const int b = sequence_of(a.cu, a.batch, t);
    const int first = a.cu[b];
    const int n = a.cu[b + 1] - first;
    if (t < first || t >= first + n) continue;  // inconsistent cu_seqlens: write nothing
    const int64_t end = static_cast<int64_t>(a.mem[b]) + a.raw[b] + a.bea[b];
    const int64_t slot = end - n + (t - first);
    if (slot < 0 || slot >= a.capacity) continue;
    int o0, o1;
    unit_offsets<N>(c, a.half, a.interleaved, &o0, &o1);
    Unit<T, N> u;
    u.load(kn + t * a.kn_t + h * a.kn_h, o0, o1);
    const int p = a.pos[t];
    if (p < 0 || p >= a.table_rows) {
      u.fill_nan();
    } else if (p != 0) {  // position 0: an exact copy, as on the CPU
      u.rotate(c, a.half, p, a.cos_t, a.sin_t, a.interleaved);
    }
    u.store(kc + b * a.kc_b + h * a.kc_h + slot * a.kc_s, o0, o1);
    u.load(vn + t * a.vn_t + h * a.vn_h, o0, o1);
    u.store(vc + b * a.vc_b + h * a.vc_h + slot * a.vc_s, o0, o1);
  }
}

// ------------------------------------------------------------------------------------------------
// compact_
struct CompactArgs {
  int layers, batch, heads, half, capacity, window, stride, table_rows;
  int mode;
  bool interleaved;
  int64_t k_l, k_b, k_h, k_s, v_l, v_b, v_h, v_s;  // cache strides (layer, batch, head, slot)
  int *mem, *raw, *bea;
  const int* ratio;
  const float *cos_t, *sin_t;
};

// Whether sequence b's window is full and its lengths are consistent (the CPU op raises on
// inconsistent lengths; on the GPU they are left untouched). Read identically by both kernels.
__device__ __forceinline__ bool compaction_applies(const CompactArgs& a, int b) {
  const int M = a.mem[b], R = a.raw[b], B = a.bea[b], r = a.ratio[b];
  if (R != a.window || M < 0 || r < 0) return false;
  if (r > 0 && a.stride % r != 0) return false;
  if (B != (r > 0 ? a.stride / r : 0)) return false;
  return static_cast<int64_t>(M) + R + B <= a.capacity;
}

// One block per (layer, sequence, head) row (grid-stride over rows), all moves of rope.h's
// compaction_move for that row. Race-freedom of the in-place moves (B = S / r beacons,
// r >= 1, so B <= S; shift = S - B):
//   - beacon j: slot M + W + j -> M + j. Beacon destinations [M, M + B) lie below every carried
//     source [M + S, M + W) (B <= S) and beacon sources [M + W, M + W + B) lie above every
//     carried destination [M + B, M + B + W - S) (its end M + W - shift <= M + W). Beacon
//     sources and destinations are disjoint (B <= S <= W).
//   - carried raw t (S <= t < W): slot M + t -> M + t - shift, all shifted down by `shift`.
//     They overlap when W - S > shift. Round q moves carried indices
//     [q * shift, (q + 1) * shift): its sources are [M + S + q shift, M + S + (q + 1) shift) and
//     its destinations [M + S + (q - 1) shift, M + S + q shift) = exactly the sources of round
//     q - 1, which every thread finished reading before the __syncthreads() ending round q - 1
//     (the barrier also orders global memory within the block). Within a round, destinations
//     and sources are disjoint, and sources of later rounds lie above both. A thread reads a
//     source unit and writes the same unit of its destination, and rotation pairs never cross
//     units, so no two threads of a round touch the same address with one of them writing.
//   - shift == 0 (r == 1) leaves carried tokens in place with delta 0: nothing to do.
//   - r == 0: nothing moves (memory absorbs the first S raw slots in place).
// So the result equals the sequential in-order copy of the CPU kernel. The lengths are updated
// by a second kernel, after every block has read them.
template <typename T, int N>
__global__ void compact_move_kernel(T* kc, T* vc, const CompactArgs a) {
  const int units = a.half / N;
  const int64_t rows = static_cast<int64_t>(a.layers) * a.batch * a.heads;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int h = static_cast<int>(row % a.heads);
    const int b = static_cast<int>((row / a.heads) % a.batch);
    const int64_t l = row / (static_cast<int64_t>(a.heads) * a.batch);
    if (!compaction_applies(a, b)) continue;  // uniform over the block
    const int M = a.mem[b], r = a.ratio[b];
    if (r == 0) continue;
    const CompactionPlan plan = compaction_plan(M, a.window, a.stride, r);
    const int nb = plan.num_beacons;
    const int shift = a.stride - nb;
    const int nc = shift > 0 ? plan.num_carried : 0;
    const int rounds = nc > 0 ? (nc + shift - 1) / shift : 1;
    T* krow = kc + l * a.k_l + b * a.k_b + h * a.k_h;
    T* vrow = vc + l * a.v_l + b * a.v_b + h * a.v_h;
    const Mode mode = static_cast<Mode>(a.mode);
    for (int q = 0; q < rounds; ++q) {
      const int c_begin = q * shift;
      const int n_carried = nc > 0 ? imin(nc, c_begin + shift) - c_begin : 0;
      const int n_beacons = q == 0 ? nb : 0;
      const int items = (n_beacons + n_carried) * units;
      for (int idx = threadIdx.x; idx < items; idx += blockDim.x) {
        const int mv = idx / units, c = idx % units;
        const int m = mv < n_beacons ? mv : nb + c_begin + (mv - n_beacons);
        int src, dst, delta;
        compaction_move(m, M, a.window, a.stride, r, mode, &src, &dst, &delta);
        int o0, o1;
        unit_offsets<N>(c, a.half, a.interleaved, &o0, &o1);
        Unit<T, N> u;
        u.load(krow + src * a.k_s, o0, o1);
        if (delta != 0) u.rotate(c, a.half, delta, a.cos_t, a.sin_t, a.interleaved);
        u.store(krow + dst * a.k_s, o0, o1);
        u.load(vrow + src * a.v_s, o0, o1);
        u.store(vrow + dst * a.v_s, o0, o1);
      }
      __syncthreads();
    }
  }
}

__global__ void compact_lengths_kernel(const CompactArgs a) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= a.batch || !compaction_applies(a, b)) return;
  const CompactionPlan plan = compaction_plan(a.mem[b], a.window, a.stride, a.ratio[b]);
  a.mem[b] = plan.new_mem;
  a.raw[b] = plan.num_carried;
  a.bea[b] = 0;
}

}  // namespace cuda
}  // namespace beacon

// The condensed-cache ops on CUDA: rope_ (rotate in place), append_kv (write a step's keys,
// rotated, and values into each sequence's last slots) and compact_ (all layers, after a full
// window). Semantics: the schemas in csrc/beacon_ops.cpp, README.md's contract, and the moves of
// compaction.h (compaction_plan / compaction_move); positions and rotation pairs come only from
// positions.h and rope.h. Caches and rotated tensors are float32, float16 or bfloat16 (as on
// the CPU). Rotations are computed in fp32 and rounded once (round to nearest even), without
// FMA contraction, so the results are bit-identical to the CPU kernels.
//
// Host-side validation checks shapes, dtypes, devices and strides only; it never reads the
// lengths (they live on the device: no synchronisation, CUDA-graph capturable). The kernels read
// the lengths and protect memory themselves:
//   - a position outside the cos/sin tables writes NaN (loud, never an out-of-bounds read);
//   - an append slot outside [0, capacity) is not written;
//   - compaction does nothing for a sequence whose window is not full (raw_len != window) or
//     whose lengths are inconsistent (beacon_len != stride / ratio, ratio not dividing stride,
//     slots past the capacity); lengths are validated on the host by CondensedKVCache.
// Data movement uses 16-byte vectors when the head dim and strides allow it (a scalar fallback
// otherwise), with grid-stride loops.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "compaction.h"
#include "op_checks.h"
#include "rope.h"

namespace beacon {
namespace cuda {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// BEACON_DISPATCH_CACHE_TYPES (float32, float16, bfloat16) comes from op_checks.h.

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
  Vec<T, N> a, b;

  __device__ __forceinline__ void load(const T* row, int o0, int o1) {
    a = *reinterpret_cast<const Vec<T, N>*>(row + o0);
    b = *reinterpret_cast<const Vec<T, N>*>(row + o1);
  }
  __device__ __forceinline__ void store(T* row, int o0, int o1) const {
    *reinterpret_cast<Vec<T, N>*>(row + o0) = a;
    *reinterpret_cast<Vec<T, N>*>(row + o1) = b;
  }
  __device__ __forceinline__ T& at(int i) { return i < N ? a.v[i] : b.v[i - N]; }

  // Rotate by the signed position difference `delta` (tables hold |delta|, sin is odd).
  __device__ __forceinline__ void rotate(int c, int half, int delta, const float* cos_t, const float* sin_t,
                                         bool interleaved) {
    // Two loops with compile-time element indices, so the unit stays in registers.
    if (interleaved) {
#pragma unroll
      for (int e = 0; e < N; ++e) rotate_one(c, half, delta, cos_t, sin_t, e, 2 * e, 2 * e + 1);
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) rotate_one(c, half, delta, cos_t, sin_t, e, e, N + e);
    }
  }
  __device__ __forceinline__ void rotate_one(int c, int half, int delta, const float* cos_t, const float* sin_t,
                                             int e, int i0, int i1) {
    float cf, sf;
    cos_sin_at(cos_t, sin_t, half, delta, c * N + e, &cf, &sf);
    float x0 = static_cast<float>(at(i0)), x1 = static_cast<float>(at(i1));
    rotate_pair(x0, x1, cf, sf);
    at(i0) = static_cast<T>(x0);
    at(i1) = static_cast<T>(x1);
  }
  __device__ __forceinline__ void fill_nan() {
#pragma unroll
    for (int i = 0; i < 2 * N; ++i) at(i) = static_cast<T>(NAN);
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
    } else {
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
    } else {
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
      const int n_carried = nc > 0 ? min(nc, c_begin + shift) - c_begin : 0;
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

// ------------------------------------------------------------------------------------------------
// Host side.
using checks::check_no_overlap;

void check_on(const char* op, const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the cache, got ", t.device());
}

void check_int_vector(const char* op, const at::Tensor& t, const char* name, int64_t n, const at::Device& device) {
  checks::check_int_vector_shape(op, t, name, n);
  check_on(op, t, name, device);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// cos/sin tables: the shared dtype and shape rules, then device, contiguity and int32 rows.
void check_tables(const char* op, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim,
                  const at::Device& device) {
  checks::check_tables_shape(op, cos, sin, head_dim);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{cos, "cos"}, {sin, "sin"}}) {
    check_on(op, t, name, device);
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK_VALUE(cos.size(0) < (int64_t{1} << 31), op, ": cos has too many rows");
}

// Whether every given tensor allows 16-byte vectors of N elements (pointer and strides).
template <int N, typename T>
bool vector_ok(int64_t half, std::initializer_list<const at::Tensor*> ts) {
  if (half % N != 0) return false;
  for (const at::Tensor* t : ts) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % (sizeof(T) * N) != 0) return false;
    for (int i = 0; i + 1 < t->dim(); ++i) {
      if (t->size(i) > 1 && t->stride(i) % N != 0) return false;
    }
  }
  return true;
}

unsigned grid_for(int64_t items, int threads) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{sms} * 16)));
}

void rope_cuda(at::Tensor x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
               bool interleaved) {
  constexpr const char* op = "beacon.rope_";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  checks::check_rope_input(op, x);
  TORCH_CHECK(x.stride(2) == 1, op, ": x must be contiguous in head_dim");
  const at::Device device = x.device();
  const int64_t n = x.size(0), heads = x.size(1), D = x.size(2);
  check_int_vector(op, positions, "positions", n, device);
  check_tables(op, cos, sin, D, device);
  check_no_overlap(op, x, "x", cos, "cos");
  check_no_overlap(op, x, "x", sin, "sin");
  if (n == 0 || heads == 0 || D == 0) return;
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t half = D / 2;
  BEACON_DISPATCH_CACHE_TYPES(x.scalar_type(), "rope_cuda", [&] {
    constexpr int kN = 16 / sizeof(scalar_t);
    auto launch = [&](auto vec) {
      constexpr int N = decltype(vec)::value;
      const int threads = 256;
      rope_kernel<scalar_t, N><<<grid_for(n * heads * (half / N), threads), threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), n, static_cast<int>(heads), static_cast<int>(half), x.stride(0), x.stride(1),
          positions.data_ptr<int>(), cos.data_ptr<float>(), sin.data_ptr<float>(), static_cast<int>(cos.size(0)),
          interleaved);
    };
    if (vector_ok<kN, scalar_t>(half, {&x})) {
      launch(std::integral_constant<int, kN>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A (k_cache, v_cache) pair of the given rank on one CUDA device, contiguous in head_dim.
void check_cache_pair(const char* op, const at::Tensor& k, const at::Tensor& v, int64_t rank) {
  TORCH_CHECK(k.is_cuda(), op, ": k_cache must be a CUDA tensor, got ", k.device());
  checks::check_cache_pair(op, k, v, rank);
  check_on(op, v, "v_cache", k.device());
  TORCH_CHECK(k.stride(rank - 1) == 1, op, ": k_cache must be contiguous in head_dim");
  TORCH_CHECK(v.stride(rank - 1) == 1, op, ": v_cache must be contiguous in head_dim");
  check_no_overlap(op, k, "k_cache", v, "v_cache");
}

void append_kv_cuda(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                    const at::Tensor& cu_seqlens, const at::Tensor& mem_len, const at::Tensor& raw_len,
                    const at::Tensor& beacon_len, const at::Tensor& positions, const at::Tensor& cos,
                    const at::Tensor& sin, bool interleaved) {
  constexpr const char* op = "beacon.append_kv";
  check_cache_pair(op, k_cache, v_cache, 4);
  const at::Device device = k_cache.device();
  const int64_t batch = k_cache.size(0), heads = k_cache.size(1), cap = k_cache.size(2), D = k_cache.size(3);
  check_on(op, k_new, "k_new", device);
  check_on(op, v_new, "v_new", device);
  TORCH_CHECK(k_new.stride(-1) == 1 && v_new.stride(-1) == 1, op, ": k_new and v_new must be contiguous in head_dim");
  checks::check_new_kv(op, k_cache, v_cache, k_new, v_new);
  checks::check_new_kv_no_alias(op, k_cache, v_cache, k_new, v_new);
  const int64_t total = k_new.size(0);
  check_int_vector(op, cu_seqlens, "cu_seqlens", batch + 1, device);
  check_int_vector(op, mem_len, "mem_len", batch, device);
  check_int_vector(op, raw_len, "raw_len", batch, device);
  check_int_vector(op, beacon_len, "beacon_len", batch, device);
  check_int_vector(op, positions, "positions", total, device);
  check_tables(op, cos, sin, D, device);
  TORCH_CHECK_VALUE(cap < (int64_t{1} << 31) && total < (int64_t{1} << 31), op,
                    ": capacity and the token count must fit in int32");
  if (total == 0 || heads == 0 || D == 0 || batch == 0) return;
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AppendArgs a{};
  a.total = total;
  a.heads = static_cast<int>(heads);
  a.half = static_cast<int>(D / 2);
  a.capacity = static_cast<int>(cap);
  a.batch = static_cast<int>(batch);
  a.table_rows = static_cast<int>(cos.size(0));
  a.interleaved = interleaved;
  a.kc_b = k_cache.stride(0); a.kc_h = k_cache.stride(1); a.kc_s = k_cache.stride(2);
  a.vc_b = v_cache.stride(0); a.vc_h = v_cache.stride(1); a.vc_s = v_cache.stride(2);
  a.kn_t = k_new.stride(0); a.kn_h = k_new.stride(1);
  a.vn_t = v_new.stride(0); a.vn_h = v_new.stride(1);
  a.cu = cu_seqlens.data_ptr<int>();
  a.mem = mem_len.data_ptr<int>();
  a.raw = raw_len.data_ptr<int>();
  a.bea = beacon_len.data_ptr<int>();
  a.pos = positions.data_ptr<int>();
  a.cos_t = cos.data_ptr<float>();
  a.sin_t = sin.data_ptr<float>();
  BEACON_DISPATCH_CACHE_TYPES(k_cache.scalar_type(), "append_kv_cuda", [&] {
    constexpr int kN = 16 / sizeof(scalar_t);
    auto launch = [&](auto vec) {
      constexpr int N = decltype(vec)::value;
      const int threads = 256;
      append_kv_kernel<scalar_t, N><<<grid_for(total * heads * (a.half / N), threads), threads, 0, stream>>>(
          k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), k_new.data_ptr<scalar_t>(),
          v_new.data_ptr<scalar_t>(), a);
    };
    if (vector_ok<kN, scalar_t>(a.half, {&k_cache, &v_cache, &k_new, &v_new})) {
      launch(std::integral_constant<int, kN>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void compact_cuda(at::Tensor k_cache, at::Tensor v_cache, at::Tensor mem_len, at::Tensor raw_len,
                  at::Tensor beacon_len, const at::Tensor& ratio, const at::Tensor& cos, const at::Tensor& sin,
                  int64_t window, int64_t stride, c10::string_view mode_str, bool interleaved) {
  constexpr const char* op = "beacon.compact_";
  const Mode mode = checks::parse_mode(mode_str, op);
  check_cache_pair(op, k_cache, v_cache, 5);
  const at::Device device = k_cache.device();
  const int64_t layers = k_cache.size(0), batch = k_cache.size(1), heads = k_cache.size(2);
  const int64_t cap = k_cache.size(3), D = k_cache.size(4);
  check_int_vector(op, mem_len, "mem_len", batch, device);
  check_int_vector(op, raw_len, "raw_len", batch, device);
  check_int_vector(op, beacon_len, "beacon_len", batch, device);
  check_int_vector(op, ratio, "ratio", batch, device);
  check_tables(op, cos, sin, D, device);
  checks::check_compact_args(op, mem_len, raw_len, beacon_len, window, stride);
  // Compaction rotates by position differences up to the window (full-coverage beacons).
  TORCH_CHECK_INDEX(cos.size(0) > window, op, ": the cos/sin tables need more than window = ", window,
                    " rows (compaction rotates keys by position differences up to the window), got ", cos.size(0));
  TORCH_CHECK_VALUE(cap < (int64_t{1} << 31), op, ": capacity must fit in int32");
  if (batch == 0) return;
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  CompactArgs a{};
  a.layers = static_cast<int>(layers);
  a.batch = static_cast<int>(batch);
  a.heads = static_cast<int>(heads);
  a.half = static_cast<int>(D / 2);
  a.capacity = static_cast<int>(cap);
  a.window = static_cast<int>(window);
  a.stride = static_cast<int>(stride);
  a.table_rows = static_cast<int>(cos.size(0));
  a.mode = static_cast<int>(mode);
  a.interleaved = interleaved;
  a.k_l = k_cache.stride(0); a.k_b = k_cache.stride(1); a.k_h = k_cache.stride(2); a.k_s = k_cache.stride(3);
  a.v_l = v_cache.stride(0); a.v_b = v_cache.stride(1); a.v_h = v_cache.stride(2); a.v_s = v_cache.stride(3);
  a.mem = mem_len.data_ptr<int>();
  a.raw = raw_len.data_ptr<int>();
  a.bea = beacon_len.data_ptr<int>();
  a.ratio = ratio.data_ptr<int>();
  a.cos_t = cos.data_ptr<float>();
  a.sin_t = sin.data_ptr<float>();
  if (layers > 0 && heads > 0 && D > 0) {
    BEACON_DISPATCH_CACHE_TYPES(k_cache.scalar_type(), "compact_cuda", [&] {
      constexpr int kN = 16 / sizeof(scalar_t);
      auto launch = [&](auto vec) {
        constexpr int N = decltype(vec)::value;
        const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        const int64_t rows = layers * batch * heads;
        const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(rows, int64_t{sms} * 8));
        compact_move_kernel<scalar_t, N><<<blocks, 256, 0, stream>>>(k_cache.data_ptr<scalar_t>(),
                                                                     v_cache.data_ptr<scalar_t>(), a);
      };
      if (vector_ok<kN, scalar_t>(a.half, {&k_cache, &v_cache})) {
        launch(std::integral_constant<int, kN>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  compact_lengths_kernel<<<static_cast<unsigned>((batch + 127) / 128), 128, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace beacon

TORCH_LIBRARY_IMPL(beacon, CUDA, m) {
  m.impl("rope_", &beacon::cuda::rope_cuda);
  m.impl("append_kv", &beacon::cuda::append_kv_cuda);
  m.impl("compact_", &beacon::cuda::compact_cuda);
}

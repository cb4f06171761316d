// The condensed-cache ops on CUDA, host side: rope_ (rotate in place), append_kv (write a step's
// keys, rotated, and values into each sequence's last slots) and compact_ (all layers, after a
// full window); the kernels are in cache_kernels.cuh. Semantics: the schemas in
// csrc/beacon_ops.cpp, README.md's contract, and the moves of compaction.h (compaction_plan /
// compaction_move); positions and rotation pairs come only from positions.h and rope.h. Caches
// and rotated tensors are float32, float16 or bfloat16 (as on the CPU). Rotations are computed
// in fp32 and rounded once (round to nearest even), without FMA contraction, so the results are
// bit-identical to the CPU kernels.
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
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "compaction.h"
#include "cuda/cache_kernels.cuh"
#include "cuda/device_runtime.h"
#include "op_checks.h"

namespace beacon {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// Host side.
// The device-independent checks are op_checks.h's, shared with the CPU and meta kernels; here
// only what is CUDA's own: the tensors live on a CUDA device.
void check_on_device(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(rt::is_device_tensor(t), op, ": ", name, " must be a CUDA tensor, got ", t.device());
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
  const int sms = rt::sm_count();
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{sms} * 16)));
}

void rope_cuda(at::Tensor x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
               bool interleaved) {
  constexpr const char* op = "beacon.rope_";
  checks::check_rope(op, x, positions, cos, sin);
  check_on_device(op, x, "x");
  const at::Device device = x.device();
  const int64_t n = x.size(0), heads = x.size(1), D = x.size(2);
  if (n == 0 || heads == 0 || D == 0) return;
  rt::DeviceGuard guard(device);
  cudaStream_t stream = rt::current_stream();
  const int64_t half = D / 2;
  BEACON_DISPATCH_CACHE_TYPES(x.scalar_type(), "rope_cuda", [&] {
    constexpr int kN = 16 / sizeof(scalar_t);
    auto launch = [&](auto vec) {
      constexpr int N = decltype(vec)::value;
      const int threads = 256;
      auto kernel = &rope_kernel<scalar_t, N>;
      BEACON_LAUNCH(kernel, grid_for(n * heads * (half / N), threads), threads, 0, stream)(
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
  BEACON_CUDA_LAUNCH_CHECK();
}

void append_kv_cuda(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                    const at::Tensor& cu_seqlens, const at::Tensor& mem_len, const at::Tensor& raw_len,
                    const at::Tensor& beacon_len, const at::Tensor& positions, const at::Tensor& cos,
                    const at::Tensor& sin, bool interleaved) {
  constexpr const char* op = "beacon.append_kv";
  checks::check_append_kv(op, k_cache, v_cache, k_new, v_new, cu_seqlens, mem_len, raw_len, beacon_len,
                          positions, cos, sin);
  check_on_device(op, k_cache, "k_cache");
  const at::Device device = k_cache.device();
  const int64_t batch = k_cache.size(0), heads = k_cache.size(1), cap = k_cache.size(2), D = k_cache.size(3);
  const int64_t total = k_new.size(0);
  TORCH_CHECK_VALUE(cap < (int64_t{1} << 31) && total < (int64_t{1} << 31), op,
                    ": capacity and the token count must fit in int32");
  if (total == 0 || heads == 0 || D == 0 || batch == 0) return;
  rt::DeviceGuard guard(device);
  cudaStream_t stream = rt::current_stream();
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
      auto kernel = &append_kv_kernel<scalar_t, N>;
      BEACON_LAUNCH(kernel, grid_for(total * heads * (a.half / N), threads), threads, 0, stream)(
          k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), k_new.data_ptr<scalar_t>(),
          v_new.data_ptr<scalar_t>(), a);
    };
    if (vector_ok<kN, scalar_t>(a.half, {&k_cache, &v_cache, &k_new, &v_new})) {
      launch(std::integral_constant<int, kN>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  BEACON_CUDA_LAUNCH_CHECK();
}

void compact_cuda(at::Tensor k_cache, at::Tensor v_cache, at::Tensor mem_len, at::Tensor raw_len,
                  at::Tensor beacon_len, const at::Tensor& ratio, const at::Tensor& cos, const at::Tensor& sin,
                  int64_t window, int64_t stride, c10::string_view mode_str, bool interleaved) {
  constexpr const char* op = "beacon.compact_";
  const Mode mode = checks::check_compact(op, k_cache, v_cache, mem_len, raw_len, beacon_len, ratio, cos, sin,
                                          window, stride, mode_str);
  check_on_device(op, k_cache, "k_cache");
  const at::Device device = k_cache.device();
  const int64_t layers = k_cache.size(0), batch = k_cache.size(1), heads = k_cache.size(2);
  const int64_t cap = k_cache.size(3), D = k_cache.size(4);
  // Compaction rotates by position differences up to the window (full-coverage beacons).
  TORCH_CHECK_INDEX(cos.size(0) > window, op, ": the cos/sin tables need more than window = ", window,
                    " rows (compaction rotates keys by position differences up to the window), got ", cos.size(0));
  TORCH_CHECK_VALUE(cap < (int64_t{1} << 31), op, ": capacity must fit in int32");
  if (batch == 0) return;
  rt::DeviceGuard guard(device);
  cudaStream_t stream = rt::current_stream();
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
        const int sms = rt::sm_count();
        const int64_t rows = layers * batch * heads;
        const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(rows, int64_t{sms} * 8));
        auto kernel = &compact_move_kernel<scalar_t, N>;
        BEACON_LAUNCH(kernel, blocks, 256, 0, stream)(k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), a);
      };
      if (vector_ok<kN, scalar_t>(a.half, {&k_cache, &v_cache})) {
        launch(std::integral_constant<int, kN>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
    });
    BEACON_CUDA_LAUNCH_CHECK();
  }
  BEACON_LAUNCH(compact_lengths_kernel, static_cast<unsigned>((batch + 127) / 128), 128, 0, stream)(a);
  BEACON_CUDA_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace beacon

BEACON_CUDA_LIBRARY_IMPL(m) {
  m.impl("rope_", &beacon::cuda::rope_cuda);
  m.impl("append_kv", &beacon::cuda::append_kv_cuda);
  m.impl("compact_", &beacon::cuda::compact_cuda);
}

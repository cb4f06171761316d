// The simple CUDA path of beacon attention: one warp per (query, head) on CUDA cores, fp32
// accumulation. Used for fp32 inputs and for head dims without a tensor-core instantiation
// (any head_dim <= 256), so the CUDA op accepts what the CPU op accepts. Correct, not fast: the
// tensor-core kernels (attention_fwd.cuh, decode_splitkv.cuh) serve bf16/fp16 with head_dim 64
// and 128.
//
// The keys a row sees are the (disjoint, increasing) intervals of beacon_mask.h's row_spans:
// [0, head_end), [mid_begin, mid_end) and the row's own key; only those keys are read. Lane l
// holds elements l, l + 32, ... of q, the output and each K/V row (coalesced loads).
// No torch headers here (compile time).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "beacon_mask.h"
#include "cuda/backend.h"
#include "cuda/params.h"
#include "cuda/ptx.h"

namespace beacon {
namespace cuda {
namespace {

constexpr int kMaxPerLane = 8;  // head_dim <= 256

template <typename T>
__device__ __forceinline__ float load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return *p;
  } else {
    return to_float<T>(*p);
  }
}

template <typename T>
__device__ __forceinline__ void store_f(T* p, float x) {
  if constexpr (std::is_same_v<T, float>) {
    *p = x;
  } else {
    *p = from_float<T>(x);
  }
}

template <typename T>
__global__ void __launch_bounds__(128) beacon_attention_generic_kernel(const AttnParams p) {
  const int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (item >= static_cast<int64_t>(p.total_q) * p.num_heads) return;  // whole warps
  const int token = static_cast<int>(item / p.num_heads);
  const int head = static_cast<int>(item % p.num_heads);
  const int D = p.head_dim;

  // The sequence of this token: the largest b with cu[b] <= token.
  int lo = 0, hi = p.batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.cu_seqlens_q[mid] <= token) lo = mid; else hi = mid - 1;
  }
  const int b = lo;
  const int q0 = p.cu_seqlens_q[b];
  const int nq = p.cu_seqlens_q[b + 1] - q0;

  T* o = static_cast<T*>(p.out) + token * p.o_row_stride + head * p.o_head_stride;
  float* lse = p.lse + item;
  RowSpans s{0, 0, 0, -1};  // a token outside every sequence (inconsistent cu_seqlens) sees nothing
  int nk = 0;
  if (token >= q0 && token < q0 + nq) {
    const SeqLens L{p.mem_len[b], p.raw_len[b], p.beacon_len[b], p.ratio[b]};
    s = row_spans(L, nq, token - q0, static_cast<Mode>(p.mode), p.attend_previous);
    nk = imax(0, imin(num_keys(L), p.capacity));
  }

  const int kv_head = head / p.group;
  const T* qr = static_cast<const T*>(p.q) + token * p.q_row_stride + head * p.q_head_stride;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_batch_stride + kv_head * p.k_head_stride;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_batch_stride + kv_head * p.v_head_stride;
  float q[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int e = lane + 32 * i;
    q[i] = e < D ? load_f(qr + e) * p.scale_log2 : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;  // running max (scaled by log2 e) and sum

  // Keys [k_begin, k_end) of one interval, online softmax.
  auto visit = [&](int k_begin, int k_end) {
    k_end = imin(k_end, nk);
    for (int k = imax(k_begin, 0); k < k_end; ++k) {
      const T* kr = kb + k * p.k_row_stride;
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < kMaxPerLane; ++i) {
        const int e = lane + 32 * i;
        if (e < D) dot += q[i] * load_f(kr + e);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      const float m_new = fmaxf(m, dot);
      const float alpha = exp2f(m - m_new);
      const float pk = exp2f(dot - m_new);
      l = l * alpha + pk;
      m = m_new;
      const T* vr = vb + k * p.v_row_stride;
#pragma unroll
      for (int i = 0; i < kMaxPerLane; ++i) {
        const int e = lane + 32 * i;
        acc[i] = acc[i] * alpha + (e < D ? pk * load_f(vr + e) : 0.f);
      }
    }
  };
  visit(0, s.head_end);
  visit(s.mid_begin, s.mid_end);
  if (s.self_key >= 0) visit(s.self_key, s.self_key + 1);

  const bool seen = l > 0.f;
  const float inv = seen ? 1.f / l : 0.f;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int e = lane + 32 * i;
    if (e < D) store_f(o + e, acc[i] * inv);
  }
  if (lane == 0) *lse = seen ? (m + log2f(l)) * 0.6931471805599453f : INFINITY;
}

}  // namespace

template <typename T>
void run_attention_generic(const AttnParams& p, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(p.total_q) * p.num_heads;
  const int threads = 128;
  const int64_t blocks = (warps * 32 + threads - 1) / threads;
  auto kernel = &beacon_attention_generic_kernel<T>;
  BEACON_LAUNCH(kernel, static_cast<unsigned>(blocks), threads, 0, stream)(p);
}

template void run_attention_generic<float>(const AttnParams&, cudaStream_t);
template void run_attention_generic<__half>(const AttnParams&, cudaStream_t);
template void run_attention_generic<__nv_bfloat16>(const AttnParams&, cudaStream_t);

}  // namespace cuda
}  // namespace beacon

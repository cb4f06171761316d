// Split-KV decode (flash-decoding) for steps where every sequence has at most one query.
//
// Pass 1 is the forward kernel of attention_fwd.cuh with DecodeTraits (one warp, 16 packed rows
// = the query heads of one GQA group, so a K/V tile is loaded once for the whole group) and
// kSplit = true: the key tiles of a sequence are divided among num_splits blocks, each writing a
// normalised partial output and its log-sum-exp (-inf when it saw no key) to fp32 buffers.
// Pass 2 (below) combines the partials of every (token, head) by their LSE:
//   lse = log(sum_s exp(lse_s)),  out = sum_s exp(lse_s - lse) * out_s,
// and writes out = 0, lse = +inf for a row no split saw a key for.
#pragma once

#include "cuda/attention_fwd.cuh"

namespace beacon {
namespace cuda {

// One warp per (token, head); lanes own kHeadDim / 32 consecutive output values.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(128) beacon_splitkv_combine_kernel(const AttnParams p) {
  constexpr int kPerLane = kHeadDim / 32;
  const int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  const int64_t n_items = static_cast<int64_t>(p.total_q) * p.num_heads;
  if (item >= n_items) return;
  const int64_t split_stride = n_items;  // partials are [num_splits, total_q, num_heads(, D)]

  float max_lse = -INFINITY;
  for (int s = lane; s < p.num_splits; s += 32) max_lse = fmaxf(max_lse, p.lse_accum[s * split_stride + item]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, off));

  const int token = static_cast<int>(item / p.num_heads);
  const int head = static_cast<int>(item % p.num_heads);
  T* o = static_cast<T*>(p.out) + token * p.o_row_stride + head * p.o_head_stride + lane * kPerLane;
  if (max_lse == -INFINITY) {  // no split saw a key
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) o[e] = from_float<T>(0.f);
    if (lane == 0) p.lse[item] = INFINITY;
    return;
  }
  float acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) acc[e] = 0.f;
  float sum = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    const float w = __expf(p.lse_accum[s * split_stride + item] - max_lse);  // 0 for empty splits
    sum += w;
    const float* part = p.out_accum + (s * split_stride + item) * kHeadDim + lane * kPerLane;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[e] += w * part[e];
  }
  const float inv = 1.f / sum;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) o[e] = from_float<T>(acc[e] * inv);
  if (lane == 0) p.lse[item] = max_lse + __logf(sum);
}

template <typename T, int kHeadDim>
void run_attention_decode(const AttnParams& p, cudaStream_t stream) {
  using Kt = DecodeTraits<kHeadDim, T>;
  const int64_t rows = static_cast<int64_t>(p.max_seqlen_q) * p.group;
  const int num_m_blocks = static_cast<int>((rows + Kt::kBlockM - 1) / Kt::kBlockM);
  launch_attention_fwd<Kt, true>(p, num_m_blocks, stream);
  const int64_t n_items = static_cast<int64_t>(p.total_q) * p.num_heads;
  const int threads = 128;
  const int64_t blocks = (n_items * 32 + threads - 1) / threads;
  auto combine = &beacon_splitkv_combine_kernel<T, kHeadDim>;
  BEACON_LAUNCH(combine, static_cast<unsigned>(blocks), threads, 0, stream)(p);
}

}  // namespace cuda
}  // namespace beacon

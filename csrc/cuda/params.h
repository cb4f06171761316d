// The plain parameter struct of the CUDA beacon attention kernels (FlashAttention-2's
// Flash_fwd_params idea): everything a kernel needs, filled once on the host by
// attention_api.cu and passed by value. No torch types here, so the kernel instantiation files
// compile without the torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace beacon {
namespace cuda {

struct AttnParams {
  // q [total_q, num_heads, head_dim], out like q (last dim contiguous; strides in elements).
  const void* q;
  void* out;
  int64_t q_row_stride, q_head_stride;
  int64_t o_row_stride, o_head_stride;
  // One layer's cache [batch, num_kv_heads, capacity, head_dim] (last dim contiguous).
  const void* k;
  const void* v;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  // lse fp32 [total_q, num_heads], contiguous.
  float* lse;

  // Device int32 metadata (read inside the kernels: no host sync, CUDA-graph capturable).
  const int* cu_seqlens_q;  // [batch + 1]
  const int* mem_len;       // [batch]
  const int* raw_len;       // [batch]
  const int* beacon_len;    // [batch]
  const int* ratio;         // [batch]

  int batch;
  int num_heads;     // Hq
  int num_kv_heads;  // Hkv
  int group;         // Hq / Hkv: query heads sharing one KV head (any value, no template)
  int head_dim;
  int capacity;      // cache slots per (sequence, kv head)
  int total_q;
  int max_seqlen_q;  // grid size only; every sequence must have at most this many queries
  int mode;          // beacon::Mode
  bool attend_previous;
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e): scores are exponentiated with exp2

  // Split-KV (decode): partial results [num_splits, total_q, num_heads, head_dim] and
  // [num_splits, total_q, num_heads], combined by LSE in a second kernel.
  int num_splits;
  float* out_accum;
  float* lse_accum;
};

// The backward (attention_bwd.cuh): the forward's parameters (q, k, v, out, lse, lengths,
// sizes; out and lse are read) plus the incoming gradient and the outputs.
struct AttnBwdParams : AttnParams {
  const void* dout;  // like q
  int64_t do_row_stride, do_head_stride;
  void* dq;          // like q
  int64_t dq_row_stride, dq_head_stride;
  void* dk;          // dk and dv [batch, num_kv_heads, capacity, head_dim], the same strides
  void* dv;
  int64_t dkv_batch_stride, dkv_head_stride, dkv_row_stride;
  void* delta;       // [total_q, num_heads] rowsum(dout * out), fp32 (fp64 for fp64 inputs)
};

// Launchers, one explicit instantiation per (dtype, head dim) in csrc/cuda/instantiations/.
// T is __nv_bfloat16 or __half.
template <typename T, int kHeadDim>
void run_attention_prefill(const AttnParams& params, cudaStream_t stream);

// Split-KV decode (every sequence has at most one query): params.num_splits, out_accum and
// lse_accum must be set.
template <typename T, int kHeadDim>
void run_attention_decode(const AttnParams& params, cudaStream_t stream);

// The simple path (one warp per (query, head), CUDA cores; attention_generic.cu): fp32 inputs
// and head dims without a tensor-core instantiation (head_dim <= 256). T is float, __half or
// __nv_bfloat16.
template <typename T>
void run_attention_generic(const AttnParams& params, cudaStream_t stream);

// Backward (attention_bwd.cuh): the compiled (dtype, head dim) instantiations, and the generic
// path for the rest (T float, double, __half or __nv_bfloat16; head_dim <= 256). dq, dk and dv
// must be zero-filled; delta must hold total_q * num_heads accumulators.
template <typename T, int kHeadDim>
void run_attention_backward(const AttnBwdParams& params, cudaStream_t stream);
template <typename T>
void run_attention_backward_generic(const AttnBwdParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace beacon

// The host-side parameters of one attention call (sizes, strides, mode, scale), filled in one
// place for the CPU forward, the CPU backward and the CUDA kernels (which copy them into their
// own torch-free AttnParams, csrc/cuda/params.h). Call after checks::check_attention.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "beacon_mask.h"
#include "op_checks.h"

namespace beacon {

struct HostAttnParams {
  int64_t total_q, heads, head_dim;      // q [total_q, heads, head_dim]
  int64_t batch, kv_heads, capacity;     // k_cache / v_cache [batch, kv_heads, capacity, head_dim]
  int64_t group;                         // heads / kv_heads (0 when q has no heads)
  int64_t max_seqlen_q;                  // clipped to total_q (an upper bound is allowed)
  Mode mode;
  bool attend_previous;
  float scale;                           // softmax scale (the default resolved)
  int64_t q_row_stride, q_head_stride;   // in elements; head_dim is contiguous
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
};

inline HostAttnParams fill_attn_params(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       int64_t max_seqlen_q, Mode mode, bool attend_previous,
                                       double softmax_scale) {
  HostAttnParams p;
  p.total_q = q.size(0);
  p.heads = q.size(1);
  p.head_dim = q.size(2);
  p.batch = k_cache.size(0);
  p.kv_heads = k_cache.size(1);
  p.capacity = k_cache.size(2);
  p.group = p.heads / p.kv_heads;  // kv_heads >= 1 (checked)
  p.max_seqlen_q = std::min(max_seqlen_q, p.total_q);
  p.mode = mode;
  p.attend_previous = attend_previous;
  p.scale = checks::resolve_softmax_scale(softmax_scale, p.head_dim);
  p.q_row_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_batch_stride = k_cache.stride(0);
  p.k_head_stride = k_cache.stride(1);
  p.k_row_stride = k_cache.stride(2);
  p.v_batch_stride = v_cache.stride(0);
  p.v_head_stride = v_cache.stride(1);
  p.v_row_stride = v_cache.stride(2);
  return p;
}

}  // namespace beacon

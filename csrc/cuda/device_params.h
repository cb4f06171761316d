// The host side of the CUDA kernels' AttnParams, shared by the forward and the backward op:
// the size limits of the kernels' indexing, and the filling of the parameter struct from the
// checked tensors (device pointers, strides, sizes, mode, scale).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "attn_params.h"
#include "cuda/params.h"

namespace beacon {
namespace cuda {

// Raises a ValueError naming `op` where the sizes exceed what the CUDA kernels index.
inline void check_cuda_sizes(const char* op, const HostAttnParams& hp, int64_t max_seqlen_q) {
  TORCH_CHECK_VALUE(hp.capacity < (int64_t{1} << 31) && hp.total_q < (int64_t{1} << 31), op,
                    ": capacity and total_q must fit in int32");
  TORCH_CHECK_VALUE(hp.batch <= 65535 && hp.kv_heads <= 65535, op,
                    ": batch and kv_heads must be at most 65535 on CUDA");
  TORCH_CHECK_VALUE(hp.total_q == 0 || max_seqlen_q >= 1, op, ": max_seqlen_q must be >= 1 when q has rows");
  TORCH_CHECK_VALUE(hp.head_dim >= 1 && hp.head_dim <= 256, op, ": head_dim must lie in [1, 256] on CUDA, got ",
                    hp.head_dim);
}

// Everything of p but the split-KV fields: q is the tensor the kernels read (possibly an aligned
// copy of the op's argument), out and lse the forward's outputs (the backward reads them).
inline void fill_device_params(AttnParams& p, const HostAttnParams& hp, const at::Tensor& q, const at::Tensor& out,
                               const at::Tensor& lse, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& cu_seqlens_q, const at::Tensor& mem_len, const at::Tensor& raw_len,
                               const at::Tensor& beacon_len, const at::Tensor& ratio) {
  p.q = q.data_ptr();
  p.out = out.data_ptr();
  p.q_row_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.o_row_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.k_batch_stride = hp.k_batch_stride;
  p.k_head_stride = hp.k_head_stride;
  p.k_row_stride = hp.k_row_stride;
  p.v_batch_stride = hp.v_batch_stride;
  p.v_head_stride = hp.v_head_stride;
  p.v_row_stride = hp.v_row_stride;
  p.lse = lse.data_ptr<float>();
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
  p.mem_len = mem_len.data_ptr<int>();
  p.raw_len = raw_len.data_ptr<int>();
  p.beacon_len = beacon_len.data_ptr<int>();
  p.ratio = ratio.data_ptr<int>();
  p.batch = static_cast<int>(hp.batch);
  p.num_heads = static_cast<int>(hp.heads);
  p.num_kv_heads = static_cast<int>(hp.kv_heads);
  p.group = static_cast<int>(hp.group);
  p.head_dim = static_cast<int>(hp.head_dim);
  p.capacity = static_cast<int>(hp.capacity);
  p.total_q = static_cast<int>(hp.total_q);
  p.max_seqlen_q = static_cast<int>(hp.max_seqlen_q);
  p.mode = static_cast<int>(hp.mode);
  p.attend_previous = hp.attend_previous;
  p.scale = hp.scale;
  p.scale_log2 = p.scale * static_cast<float>(M_LOG2E);
  p.num_splits = 1;
}

}  // namespace cuda
}  // namespace beacon

// Host-side argument checks shared by the CPU and CUDA implementations of the same op: the
// device-independent rules (ranks, shapes, dtypes, mode names, memory overlap). Each check
// names the op and the argument. Device-specific checks (which device, strides the kernel needs,
// reading length values on the CPU) stay with the kernels; callers run them all before writing
// anything. Host code only (torch headers), included by csrc/cpu/*.cpp and csrc/cuda/*.cu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/StringUtil.h>

#include <string>

#include "beacon_mask.h"

namespace beacon {
namespace checks {

// float32, float16, bfloat16: the dtypes of caches and rotated tensors (rotations run in fp32).
#define BEACON_DISPATCH_CACHE_TYPES(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)               \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

inline bool is_rope_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The spec's three beacon modes by name. A bad name is a ValueError, except where the op's
// callers expect RuntimeError (runtime_error = true: attention_backward).
inline Mode parse_mode(c10::string_view mode, const char* op, bool runtime_error = false) {
  if (mode == "segmentation") return Mode::kSegmentation;
  if (mode == "step-expansion") return Mode::kStepExpansion;
  if (mode == "full-coverage") return Mode::kFullCoverage;
  const std::string message = c10::str(
      op, ": mode must be one of 'segmentation', 'step-expansion', 'full-coverage', got '",
      std::string(mode), "'");
  TORCH_CHECK(!runtime_error, message);
  TORCH_CHECK_VALUE(false, message);
}

// Rejects tensors that may share memory (partial, full, or too hard to tell: a kernel that
// writes one while reading the other must not see them alias).
inline void check_no_overlap(const char* op, const at::Tensor& a, const char* na, const at::Tensor& b,
                             const char* nb) {
  TORCH_CHECK(at::get_overlap_status(a, b) == at::MemOverlapStatus::No, op, ": ", na, " and ", nb,
              " must not share memory");
}

// An int32 vector [n] (lengths, positions, cu_seqlens): dtype and shape.
inline void check_int_vector_shape(const char* op, const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ",
                    t.sizes());
}

// cos/sin tables: fp32 [rows, head_dim / 2], the same number of rows; head_dim even.
inline void check_tables_shape(const char* op, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim) {
  TORCH_CHECK_VALUE(head_dim % 2 == 0, op, ": head_dim must be even for RoPE, got ", head_dim);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{cos, "cos"}, {sin, "sin"}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == head_dim / 2, op, ": ", name,
                      " must have shape [rows, head_dim / 2 = ", head_dim / 2, "], got ", t.sizes());
  }
  TORCH_CHECK_VALUE(cos.size(0) == sin.size(0), op, ": cos and sin must have the same rows, got ", cos.size(0),
                    " and ", sin.size(0));
}

// rope_'s x: a cache dtype, [tokens, heads, head_dim].
inline void check_rope_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK_TYPE(is_rope_dtype(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must have shape [tokens, heads, head_dim], got ", x.sizes());
}

// A (k_cache, v_cache) pair: a cache dtype, the same dtype and shape; rank 4 (one layer's view,
// append_kv) or 5 (the whole cache, compact_).
inline void check_cache_pair(const char* op, const at::Tensor& k, const at::Tensor& v, int64_t rank) {
  TORCH_CHECK_TYPE(is_rope_dtype(k.scalar_type()), op, ": k_cache must be float32, float16 or bfloat16, got ",
                   k.scalar_type());
  TORCH_CHECK_TYPE(v.scalar_type() == k.scalar_type(), op, ": v_cache must have k_cache's dtype ", k.scalar_type(),
                   ", got ", v.scalar_type());
  TORCH_CHECK_VALUE(k.dim() == rank, op,
                    rank == 4 ? ": k_cache must be a layer's view [batch, kv_heads, capacity, head_dim], got "
                              : ": k_cache must be the whole cache [layers, batch, kv_heads, capacity, head_dim], got ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), op, ": v_cache must have k_cache's shape ", k.sizes(), ", got ",
                    v.sizes());
}

// append_kv's new keys and values against a checked [batch, kv_heads, capacity, head_dim] cache
// pair: dtype and shape [total, kv_heads, head_dim].
inline void check_new_kv(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& k_new, const at::Tensor& v_new) {
  const int64_t heads = k_cache.size(1), D = k_cache.size(3);
  TORCH_CHECK_TYPE(k_new.scalar_type() == k_cache.scalar_type(), op, ": k_new must have the cache dtype ",
                   k_cache.scalar_type(), ", got ", k_new.scalar_type());
  TORCH_CHECK_TYPE(v_new.scalar_type() == k_cache.scalar_type(), op, ": v_new must have the cache dtype ",
                   k_cache.scalar_type(), ", got ", v_new.scalar_type());
  TORCH_CHECK_VALUE(k_new.dim() == 3 && k_new.size(1) == heads && k_new.size(2) == D, op,
                    ": k_new must have shape [total, kv_heads = ", heads, ", head_dim = ", D, "], got ",
                    k_new.sizes());
  TORCH_CHECK_VALUE(v_new.sizes() == k_new.sizes(), op, ": v_new must have k_new's shape ", k_new.sizes(),
                    ", got ", v_new.sizes());
}

// append_kv reads k_new / v_new while it writes the caches: no new tensor may alias a cache.
inline void check_new_kv_no_alias(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& k_new, const at::Tensor& v_new) {
  check_no_overlap(op, k_cache, "k_cache", k_new, "k_new");
  check_no_overlap(op, v_cache, "v_cache", v_new, "v_new");
  check_no_overlap(op, k_cache, "k_cache", v_new, "v_new");
  check_no_overlap(op, v_cache, "v_cache", k_new, "k_new");
}

// compact_'s scalar arguments and the three length vectors it rewrites (must not alias).
inline void check_compact_args(const char* op, const at::Tensor& mem_len, const at::Tensor& raw_len,
                               const at::Tensor& beacon_len, int64_t window, int64_t stride) {
  check_no_overlap(op, mem_len, "mem_len", raw_len, "raw_len");
  check_no_overlap(op, mem_len, "mem_len", beacon_len, "beacon_len");
  check_no_overlap(op, raw_len, "raw_len", beacon_len, "beacon_len");
  TORCH_CHECK_VALUE(window >= 1 && window <= (1 << 30), op, ": window must be in [1, 2^30], got ", window);
  TORCH_CHECK_VALUE(stride >= 1 && stride <= window, op, ": stride must be in [1, window = ", window, "], got ",
                    stride);
}

// attention's tensors (lengths: check_int_vector_shape): q [total_q, heads, head_dim] of
// float32 / float16 / bfloat16; k_cache and v_cache one layer's view [batch, kv_heads, capacity,
// head_dim] of q's dtype and head_dim, with kv_heads dividing heads; all contiguous in head_dim.
// The head_dim range depends on the kernels and is checked by each device.
inline void check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, int64_t max_seqlen_q) {
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must have shape [total_q, heads, head_dim], got ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4, op,
                    ": k_cache must be a layer's view [batch, kv_heads, capacity, head_dim], got ", k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ",
                    k_cache.sizes(), ", got ", v_cache.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, op,
                   ": q must be bfloat16, float16 or float32, got ", dt);
  TORCH_CHECK_TYPE(k_cache.scalar_type() == dt, op, ": k_cache must have q's dtype ", dt, ", got ",
                   k_cache.scalar_type());
  TORCH_CHECK_TYPE(v_cache.scalar_type() == dt, op, ": v_cache must have q's dtype ", dt, ", got ",
                   v_cache.scalar_type());
  const int64_t heads = q.size(1), d = q.size(2), kv_heads = k_cache.size(1);
  TORCH_CHECK_VALUE(k_cache.size(3) == d, op, ": k_cache head_dim ", k_cache.size(3), " must equal q's head_dim ",
                    d);
  TORCH_CHECK_VALUE(kv_heads > 0 && heads % kv_heads == 0, op, ": q's heads (", heads,
                    ") must be a multiple of k_cache's kv_heads (", kv_heads, ")");
  TORCH_CHECK_VALUE(max_seqlen_q >= 0, op, ": max_seqlen_q must be >= 0, got ", max_seqlen_q);
  TORCH_CHECK(q.stride(2) == 1, op, ": q must be contiguous in head_dim (stride 1), got strides ", q.strides());
  TORCH_CHECK(k_cache.stride(3) == 1, op, ": k_cache must be contiguous in head_dim (stride 1), got strides ",
              k_cache.strides());
  TORCH_CHECK(v_cache.stride(3) == 1, op, ": v_cache must be contiguous in head_dim (stride 1), got strides ",
              v_cache.strides());
}

}  // namespace checks
}  // namespace beacon

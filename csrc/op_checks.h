// Host-side argument checks of every op, one path per op shared by its CPU, CUDA and meta
// kernels: ranks, shapes, dtypes, devices (every tensor on the device of the op's first tensor),
// contiguity the kernels rely on, scalar arguments and memory overlap. Each message names the op
// and the argument. What depends on the kernel (the CPU or CUDA head_dim range, alignment for
// vector loads) and on the lengths' values (read on the CPU only) stays with the kernels; callers
// run all checks before writing anything.
//
// Sizes are read as SymInts so that the meta kernels (csrc/meta.cpp) run the same checks on the
// symbolic shapes of torch.compile; on real tensors they are plain integers. Overlap checks need
// storage and are skipped on meta tensors. Host code only (torch headers).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/StringUtil.h>

#include <cfloat>
#include <cmath>
#include <initializer_list>
#include <string>
#include <utility>

#include "beacon_mask.h"

namespace beacon {
namespace checks {

using c10::SymInt;

// float32, float16, bfloat16: the dtypes of caches and rotated tensors (rotations run in fp32).
#define BEACON_DISPATCH_CACHE_TYPES(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)               \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

inline bool is_rope_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A tensor and the name of its argument.
struct Arg {
  const at::Tensor& t;
  const char* name;
};

// The beacon mask kinds by name (beacon_mask.h; a bad name is a ValueError).
inline Mode parse_mode(c10::string_view mode, const char* op) {
  if (mode == "segmentation") return Mode::kSegmentation;
  if (mode == "step-expansion") return Mode::kStepExpansion;
  if (mode == "full-coverage") return Mode::kFullCoverage;
  if (mode == "causal") return Mode::kCausal;
  if (mode == "step-causal") return Mode::kStepCausal;
  TORCH_CHECK_VALUE(false, op, ": mode must be one of 'segmentation', 'step-expansion', 'full-coverage', "
                    "'causal', 'step-causal', got '", std::string(mode), "'");
}

// softmax_scale: finite and representable in float32 (the kernels compute in fp32); <= 0 means
// the default 1 / sqrt(head_dim).
inline void check_softmax_scale(const char* op, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::fabs(scale) <= FLT_MAX, op,
                    ": softmax_scale must be a finite float32 number (<= 0 for 1/sqrt(head_dim)), got ",
                    scale);
}

inline float resolve_softmax_scale(double scale, int64_t head_dim) {
  return scale > 0 ? static_cast<float>(scale)
                   : static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
}

// A tensor argument given as None reaches the kernels undefined: name it before anything reads
// its metadata.
inline void check_defined(const char* op, std::initializer_list<Arg> args) {
  for (const Arg& a : args)
    TORCH_CHECK_TYPE(a.t.defined(), op, ": ", a.name, " must be a tensor, got None");
}

// Every tensor on ref's device.
inline void check_same_device(const char* op, Arg ref, std::initializer_list<Arg> others) {
  for (const Arg& a : others)
    TORCH_CHECK_VALUE(a.t.device() == ref.t.device(), op, ": ", a.name, " must be on ", ref.name, "'s device (",
                      ref.t.device(), "), got ", a.t.device());
}

// Rejects tensors that may share memory (partial, full, or too hard to tell: a kernel that
// writes one while reading the other must not see them alias). Meta tensors have no memory.
inline void check_no_overlap(const char* op, const at::Tensor& a, const char* na, const at::Tensor& b,
                             const char* nb) {
  if (a.is_meta() || b.is_meta()) return;
  TORCH_CHECK(at::get_overlap_status(a, b) == at::MemOverlapStatus::No, op, ": ", na, " and ", nb,
              " must not share memory");
}

// Every written tensor apart from every other argument.
inline void check_written_apart(const char* op, std::initializer_list<Arg> written, std::initializer_list<Arg> read) {
  for (auto w = written.begin(); w != written.end(); ++w) {
    for (auto o = w + 1; o != written.end(); ++o) check_no_overlap(op, w->t, w->name, o->t, o->name);
    for (const Arg& r : read) check_no_overlap(op, w->t, w->name, r.t, r.name);
  }
}

// An int32 vector [n] (lengths, positions, cu_seqlens): dtype and shape.
inline void check_int_vector_shape(const char* op, const at::Tensor& t, const char* name, const SymInt& n) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.sym_size(0) == n, op, ": ", name, " must have shape [", n, "], got ",
                    t.sym_sizes());
}

// The int32 vectors of every op: dtype, shape [n], ref's device, contiguous (the kernels read
// them as plain arrays).
inline void check_int_vector(const char* op, Arg t, const SymInt& n, Arg ref) {
  check_int_vector_shape(op, t.t, t.name, n);
  check_same_device(op, ref, {t});
  TORCH_CHECK_VALUE(t.t.is_contiguous(), op, ": ", t.name, " must be contiguous, got strides ", t.t.sym_strides());
}

// cos/sin tables: fp32 [rows, head_dim / 2], the same number of rows; head_dim (of the tensor
// named `owner`) even.
inline void check_tables_shape(const char* op, const at::Tensor& cos, const at::Tensor& sin,
                               const SymInt& head_dim, const char* owner = "the cache") {
  TORCH_CHECK_VALUE(head_dim % 2 == 0, op, ": ", owner, "'s head_dim must be even for RoPE, got ", head_dim);
  for (const Arg& a : {Arg{cos, "cos"}, Arg{sin, "sin"}}) {
    TORCH_CHECK_TYPE(a.t.scalar_type() == at::kFloat, op, ": ", a.name, " must be float32, got ",
                     a.t.scalar_type());
    TORCH_CHECK_VALUE(a.t.dim() == 2 && a.t.sym_size(1) == head_dim / 2, op, ": ", a.name,
                      " must have shape [rows, head_dim / 2 = ", head_dim / 2, "], got ", a.t.sym_sizes());
  }
  TORCH_CHECK_VALUE(cos.sym_size(0) == sin.sym_size(0), op, ": cos and sin must have the same rows, got ",
                    cos.sym_size(0), " and ", sin.sym_size(0));
}

// Tables of every op: shape rules, ref's device, contiguous, rows indexable by int32.
inline void check_tables(const char* op, const at::Tensor& cos, const at::Tensor& sin, const SymInt& head_dim,
                         Arg ref) {
  check_tables_shape(op, cos, sin, head_dim, ref.name);
  check_same_device(op, ref, {{cos, "cos"}, {sin, "sin"}});
  for (const Arg& a : {Arg{cos, "cos"}, Arg{sin, "sin"}})
    TORCH_CHECK_VALUE(a.t.is_contiguous(), op, ": ", a.name, " must be contiguous, got strides ", a.t.sym_strides());
  TORCH_CHECK_VALUE(cos.sym_size(0) < (int64_t{1} << 31), op, ": cos and sin must have fewer than 2^31 rows, got ",
                    cos.sym_size(0));
}

// rope_'s x: a cache dtype, [tokens, heads, head_dim].
inline void check_rope_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK_TYPE(is_rope_dtype(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must have shape [tokens, heads, head_dim], got ", x.sym_sizes());
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
                    k.sym_sizes());
  TORCH_CHECK_VALUE(v.sym_sizes() == k.sym_sizes(), op, ": v_cache must have k_cache's shape ", k.sym_sizes(),
                    ", got ", v.sym_sizes());
  check_same_device(op, {k, "k_cache"}, {{v, "v_cache"}});
  TORCH_CHECK_VALUE(k.sym_stride(rank - 1) == 1, op, ": k_cache must be contiguous in head_dim, got strides ",
                    k.sym_strides());
  TORCH_CHECK_VALUE(v.sym_stride(rank - 1) == 1, op, ": v_cache must be contiguous in head_dim, got strides ",
                    v.sym_strides());
}

// append_kv's new keys and values against a checked [batch, kv_heads, capacity, head_dim] cache
// pair: dtype, device and shape [total, kv_heads, head_dim], contiguous in head_dim.
inline void check_new_kv(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& k_new, const at::Tensor& v_new) {
  const SymInt heads = k_cache.sym_size(1), D = k_cache.sym_size(3);
  for (const Arg& a : {Arg{k_new, "k_new"}, Arg{v_new, "v_new"}})
    TORCH_CHECK_TYPE(a.t.scalar_type() == k_cache.scalar_type(), op, ": ", a.name, " must have the cache dtype ",
                     k_cache.scalar_type(), ", got ", a.t.scalar_type());
  TORCH_CHECK_VALUE(k_new.dim() == 3 && k_new.sym_size(1) == heads && k_new.sym_size(2) == D, op,
                    ": k_new must have shape [total, kv_heads = ", heads, ", head_dim = ", D, "], got ",
                    k_new.sym_sizes());
  TORCH_CHECK_VALUE(v_new.sym_sizes() == k_new.sym_sizes(), op, ": v_new must have k_new's shape ",
                    k_new.sym_sizes(), ", got ", v_new.sym_sizes());
  check_same_device(op, {k_cache, "k_cache"}, {{k_new, "k_new"}, {v_new, "v_new"}});
  for (const Arg& a : {Arg{k_new, "k_new"}, Arg{v_new, "v_new"}})
    TORCH_CHECK_VALUE(a.t.sym_stride(2) == 1, op, ": ", a.name, " must be contiguous in head_dim, got strides ",
                      a.t.sym_strides());
}

// compact_'s window and stride (at most 2^30: slot arithmetic stays within int).
inline void check_window_stride(const char* op, int64_t window, int64_t stride) {
  TORCH_CHECK_VALUE(window >= 1 && window <= (1 << 30), op, ": window must be in [1, 2^30], got ", window);
  TORCH_CHECK_VALUE(stride >= 1 && stride <= window, op, ": stride must be in [1, window = ", window, "], got ",
                    stride);
}

// ------------------------------------------------------------------------------------------------
// One check per op (the CPU, CUDA and meta kernels all call it first).

// rope_(x, positions, cos, sin): x a cache dtype [tokens, heads, head_dim], contiguous in
// head_dim; positions int32 [tokens]; tables; x apart from everything it reads.
inline void check_rope(const char* op, const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos,
                       const at::Tensor& sin) {
  check_defined(op, {{x, "x"}, {positions, "positions"}, {cos, "cos"}, {sin, "sin"}});
  check_rope_input(op, x);
  TORCH_CHECK_VALUE(x.sym_stride(2) == 1, op, ": x must be contiguous in head_dim, got strides ", x.sym_strides());
  const Arg ref{x, "x"};
  check_int_vector(op, {positions, "positions"}, x.sym_size(0), ref);
  check_tables(op, cos, sin, x.sym_size(2), ref);
  check_written_apart(op, {ref}, {{positions, "positions"}, {cos, "cos"}, {sin, "sin"}});
}

// append_kv: the cache pair (a layer's view), the new keys and values, the int32 vectors, the
// tables; the written caches apart from each other and from everything the op reads.
inline void check_append_kv(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& cu_seqlens,
                            const at::Tensor& mem_len, const at::Tensor& raw_len, const at::Tensor& beacon_len,
                            const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  check_defined(op, {{k_cache, "k_cache"}, {v_cache, "v_cache"}, {k_new, "k_new"}, {v_new, "v_new"},
                     {cu_seqlens, "cu_seqlens"}, {mem_len, "mem_len"}, {raw_len, "raw_len"},
                     {beacon_len, "beacon_len"}, {positions, "positions"}, {cos, "cos"}, {sin, "sin"}});
  check_cache_pair(op, k_cache, v_cache, 4);
  check_new_kv(op, k_cache, v_cache, k_new, v_new);
  const Arg ref{k_cache, "k_cache"};
  const SymInt batch = k_cache.sym_size(0);
  check_int_vector(op, {cu_seqlens, "cu_seqlens"}, batch + 1, ref);
  check_int_vector(op, {mem_len, "mem_len"}, batch, ref);
  check_int_vector(op, {raw_len, "raw_len"}, batch, ref);
  check_int_vector(op, {beacon_len, "beacon_len"}, batch, ref);
  check_int_vector(op, {positions, "positions"}, k_new.sym_size(0), ref);
  check_tables(op, cos, sin, k_cache.sym_size(3), ref);
  check_written_apart(op, {ref, {v_cache, "v_cache"}},
                      {{k_new, "k_new"}, {v_new, "v_new"}, {cu_seqlens, "cu_seqlens"}, {mem_len, "mem_len"},
                       {raw_len, "raw_len"}, {beacon_len, "beacon_len"}, {positions, "positions"},
                       {cos, "cos"}, {sin, "sin"}});
}

// compact_: the whole cache pair, the lengths and ratio, the tables, window/stride and mode; the
// written tensors (caches and the three length vectors) apart from each other and the inputs.
inline Mode check_compact(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& mem_len, const at::Tensor& raw_len, const at::Tensor& beacon_len,
                          const at::Tensor& ratio, const at::Tensor& cos, const at::Tensor& sin, int64_t window,
                          int64_t stride, c10::string_view mode) {
  const Mode m = parse_mode(mode, op);
  check_defined(op, {{k_cache, "k_cache"}, {v_cache, "v_cache"}, {mem_len, "mem_len"}, {raw_len, "raw_len"},
                     {beacon_len, "beacon_len"}, {ratio, "ratio"}, {cos, "cos"}, {sin, "sin"}});
  check_cache_pair(op, k_cache, v_cache, 5);
  const Arg ref{k_cache, "k_cache"};
  const SymInt batch = k_cache.sym_size(1);
  check_int_vector(op, {mem_len, "mem_len"}, batch, ref);
  check_int_vector(op, {raw_len, "raw_len"}, batch, ref);
  check_int_vector(op, {beacon_len, "beacon_len"}, batch, ref);
  check_int_vector(op, {ratio, "ratio"}, batch, ref);
  check_tables(op, cos, sin, k_cache.sym_size(4), ref);
  check_window_stride(op, window, stride);
  check_written_apart(op,
                      {ref, {v_cache, "v_cache"}, {mem_len, "mem_len"}, {raw_len, "raw_len"},
                       {beacon_len, "beacon_len"}},
                      {{ratio, "ratio"}, {cos, "cos"}, {sin, "sin"}});
  return m;
}

// decode_linear: x [rows, in] times weight [out, in] transposed, plus bias [out] (optional);
// the dtypes of caches, all the same; x and weight contiguous in their last dimension.
inline void check_decode_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias) {
  check_defined(op, {{x, "x"}, {weight, "weight"}});
  TORCH_CHECK_TYPE(is_rope_dtype(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type(),
                   ", got ", weight.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must have shape [rows, in_features], got ", x.sym_sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.sym_size(1) == x.sym_size(1), op,
                    ": weight must have shape [out_features, ", x.sym_size(1), "] (x's in_features), got ",
                    weight.sym_sizes());
  check_same_device(op, {x, "x"}, {{weight, "weight"}});
  TORCH_CHECK_VALUE(x.sym_stride(1) == 1 || x.sym_size(1) <= 1, op,
                    ": x must be contiguous in its last dimension, got strides ", x.sym_strides());
  TORCH_CHECK_VALUE(weight.sym_stride(1) == 1 || weight.sym_size(1) <= 1, op,
                    ": weight must be contiguous in its last dimension, got strides ", weight.sym_strides());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype ", x.scalar_type(),
                     ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->sym_size(0) == weight.sym_size(0), op,
                      ": bias must have shape [", weight.sym_size(0), "] (weight's out_features), got ",
                      bias->sym_sizes());
    check_same_device(op, {x, "x"}, {{*bias, "bias"}});
  }
}

// rms_norm: x [..., dim] (at least one dimension) of float32 / float16 / bfloat16 / float64,
// contiguous in its last dimension; weight [dim] of x's dtype and device; eps >= 0 and finite.
inline void check_rms_norm(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_defined(op, {{x, "x"}, {weight, "weight"}});
  TORCH_CHECK_TYPE(is_rope_dtype(x.scalar_type()) || x.scalar_type() == at::kDouble, op,
                   ": x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type(),
                   ", got ", weight.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.sym_size(0) == x.sym_size(-1), op, ": weight must have shape [",
                    x.sym_size(-1), "] (x's last dimension), got ", weight.sym_sizes());
  check_same_device(op, {x, "x"}, {{weight, "weight"}});
  TORCH_CHECK_VALUE(x.sym_stride(-1) == 1 || x.sym_size(-1) <= 1, op,
                    ": x must be contiguous in its last dimension, got strides ", x.sym_strides());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
}

// attention (and the inputs attention_backward shares with it): q [total_q, heads, head_dim]
// of float32 / float16 / bfloat16 (float64 too for the backward); k_cache and v_cache one
// layer's view [batch, kv_heads, capacity, head_dim] of q's dtype, device and head_dim, with
// kv_heads > 0 dividing heads; all contiguous in head_dim; the five int32 vectors; max_seqlen_q
// >= 0; softmax_scale. The head_dim range depends on the kernels and is checked by each device.
inline Mode check_attention(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& cu_seqlens_q, const at::Tensor& mem_len,
                            const at::Tensor& raw_len, const at::Tensor& beacon_len, const at::Tensor& ratio,
                            int64_t max_seqlen_q, c10::string_view mode, double softmax_scale,
                            bool backward = false) {
  const Mode m = parse_mode(mode, op);
  check_defined(op, {{q, "q"}, {k_cache, "k_cache"}, {v_cache, "v_cache"}, {cu_seqlens_q, "cu_seqlens_q"},
                     {mem_len, "mem_len"}, {raw_len, "raw_len"}, {beacon_len, "beacon_len"}, {ratio, "ratio"}});
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must have shape [total_q, heads, head_dim], got ", q.sym_sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat || (backward && dt == at::kDouble),
                   op, backward ? ": q must be bfloat16, float16, float32 or float64, got "
                                : ": q must be bfloat16, float16 or float32, got ", dt);
  const Arg ref{q, "q"};
  check_same_device(op, ref, {{k_cache, "k_cache"}, {v_cache, "v_cache"}});
  TORCH_CHECK_VALUE(k_cache.dim() == 4, op,
                    ": k_cache must have shape [batch, kv_heads, capacity, head_dim] (a layer's view), got ",
                    k_cache.sym_sizes());
  TORCH_CHECK_VALUE(v_cache.sym_sizes() == k_cache.sym_sizes(), op, ": v_cache must have k_cache's shape ",
                    k_cache.sym_sizes(), ", got ", v_cache.sym_sizes());
  for (const Arg& a : {Arg{k_cache, "k_cache"}, Arg{v_cache, "v_cache"}})
    TORCH_CHECK_TYPE(a.t.scalar_type() == dt, op, ": ", a.name, " must have q's dtype ", dt, ", got ",
                     a.t.scalar_type());
  const SymInt heads = q.sym_size(1), d = q.sym_size(2), kv_heads = k_cache.sym_size(1);
  TORCH_CHECK_VALUE(k_cache.sym_size(3) == d, op, ": k_cache head_dim ", k_cache.sym_size(3),
                    " must equal q's head_dim ", d);
  TORCH_CHECK_VALUE(kv_heads > 0, op, ": k_cache must have kv_heads >= 1, got shape ", k_cache.sym_sizes());
  TORCH_CHECK_VALUE(heads % kv_heads == 0, op, ": q's heads (", heads,
                    ") must be a multiple of k_cache's kv_heads (", kv_heads, ")");
  for (const Arg& a : {ref, Arg{k_cache, "k_cache"}, Arg{v_cache, "v_cache"}})
    TORCH_CHECK_VALUE(a.t.sym_stride(a.t.dim() - 1) == 1, op, ": ", a.name,
                      " must be contiguous in head_dim (stride 1), got strides ", a.t.sym_strides());
  const SymInt batch = k_cache.sym_size(0);
  check_int_vector(op, {cu_seqlens_q, "cu_seqlens_q"}, batch + 1, ref);
  check_int_vector(op, {mem_len, "mem_len"}, batch, ref);
  check_int_vector(op, {raw_len, "raw_len"}, batch, ref);
  check_int_vector(op, {beacon_len, "beacon_len"}, batch, ref);
  check_int_vector(op, {ratio, "ratio"}, batch, ref);
  TORCH_CHECK_VALUE(max_seqlen_q >= 0, op, ": max_seqlen_q must be >= 0, got ", max_seqlen_q);
  check_softmax_scale(op, softmax_scale);
  return m;
}

// attention_backward: attention's inputs, dout and out like q (dtype, shape, device), lse
// float32 [total_q, heads] on q's device.
inline Mode check_attention_backward(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                     const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& out,
                                     const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                                     const at::Tensor& mem_len, const at::Tensor& raw_len,
                                     const at::Tensor& beacon_len, const at::Tensor& ratio, int64_t max_seqlen_q,
                                     c10::string_view mode, double softmax_scale) {
  check_defined(op, {{dout, "dout"}, {out, "out"}, {lse, "lse"}});
  const Mode m = check_attention(op, q, k_cache, v_cache, cu_seqlens_q, mem_len, raw_len, beacon_len, ratio,
                                 max_seqlen_q, mode, softmax_scale, /*backward=*/true);
  const Arg ref{q, "q"};
  check_same_device(op, ref, {{dout, "dout"}, {out, "out"}, {lse, "lse"}});
  for (const Arg& a : {Arg{out, "out"}, Arg{dout, "dout"}}) {
    TORCH_CHECK_TYPE(a.t.scalar_type() == q.scalar_type(), op, ": ", a.name, " must have q's dtype ",
                     q.scalar_type(), ", got ", a.t.scalar_type());
    TORCH_CHECK_VALUE(a.t.sym_sizes() == q.sym_sizes(), op, ": ", a.name, " must have q's shape ", q.sym_sizes(),
                      ", got ", a.t.sym_sizes());
  }
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.sym_size(0) == q.sym_size(0) && lse.sym_size(1) == q.sym_size(1), op,
                    ": lse must have shape [total_q, heads] = [", q.sym_size(0), ", ", q.sym_size(1), "], got ",
                    lse.sym_sizes());
  return m;
}

}  // namespace checks
}  // namespace beacon

// Meta kernels of every op: the shape functions that torch.compile (fake tensors) and the meta
// device use. Each runs the op's shared checks (op_checks.h), the same the CPU and CUDA kernels
// run first, so an argument left on the meta device among real tensors (the dispatcher then
// picks these kernels) raises the same error naming it instead of returning uninitialised
// outputs. Sizes stay symbolic (SymInt) for dynamic shapes; nothing reads data.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "op_checks.h"

namespace beacon {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_meta(const at::Tensor& q, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache, const at::Tensor& cu_seqlens_q,
                                                  const at::Tensor& mem_len, const at::Tensor& raw_len,
                                                  const at::Tensor& beacon_len, const at::Tensor& ratio,
                                                  int64_t max_seqlen_q, c10::string_view mode, bool attend_previous,
                                                  double softmax_scale) {
  checks::check_attention("beacon.attention", q, k_cache, v_cache, cu_seqlens_q, mem_len, raw_len, beacon_len,
                          ratio, max_seqlen_q, mode, softmax_scale);
  at::Tensor out = at::empty_symint(q.sym_sizes(), q.options());
  at::Tensor lse = at::empty_symint({q.sym_size(0), q.sym_size(1)}, q.options().dtype(at::kFloat));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_meta(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& mem_len,
    const at::Tensor& raw_len, const at::Tensor& beacon_len, const at::Tensor& ratio, int64_t max_seqlen_q,
    c10::string_view mode, bool attend_previous, double softmax_scale) {
  checks::check_attention_backward("beacon.attention_backward", dout, q, k_cache, v_cache, out, lse, cu_seqlens_q,
                                   mem_len, raw_len, beacon_len, ratio, max_seqlen_q, mode, softmax_scale);
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k_cache.sym_sizes(), k_cache.options()),
          at::empty_symint(v_cache.sym_sizes(), v_cache.options())};
}

void rope_meta(at::Tensor x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
               bool interleaved) {
  checks::check_rope("beacon.rope_", x, positions, cos, sin);
}

void append_kv_meta(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                    const at::Tensor& cu_seqlens, const at::Tensor& mem_len, const at::Tensor& raw_len,
                    const at::Tensor& beacon_len, const at::Tensor& positions, const at::Tensor& cos,
                    const at::Tensor& sin, bool interleaved) {
  checks::check_append_kv("beacon.append_kv", k_cache, v_cache, k_new, v_new, cu_seqlens, mem_len, raw_len,
                          beacon_len, positions, cos, sin);
}

void compact_meta(at::Tensor k_cache, at::Tensor v_cache, at::Tensor mem_len, at::Tensor raw_len,
                  at::Tensor beacon_len, const at::Tensor& ratio, const at::Tensor& cos, const at::Tensor& sin,
                  int64_t window, int64_t stride, c10::string_view mode, bool interleaved) {
  checks::check_compact("beacon.compact_", k_cache, v_cache, mem_len, raw_len, beacon_len, ratio, cos, sin, window,
                        stride, mode);
}

at::Tensor decode_linear_meta(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  checks::check_decode_linear("beacon.decode_linear", x, weight, bias);
  return at::empty_symint({x.sym_size(0), weight.sym_size(0)}, x.options());
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor& weight, double eps) {
  checks::check_rms_norm("beacon.rms_norm", x, weight, eps);
  return at::empty_symint(x.sym_sizes(), x.options());
}

}  // namespace
}  // namespace beacon

TORCH_LIBRARY_IMPL(beacon, Meta, m) {
  m.impl("attention", &beacon::attention_meta);
  m.impl("attention_backward", &beacon::attention_backward_meta);
  m.impl("rope_", &beacon::rope_meta);
  m.impl("append_kv", &beacon::append_kv_meta);
  m.impl("compact_", &beacon::compact_meta);
  m.impl("decode_linear", &beacon::decode_linear_meta);
  m.impl("rms_norm", &beacon::rms_norm_meta);
}

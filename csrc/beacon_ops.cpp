// The op schemas of torch.ops.beacon, and nothing else. Kernels register their implementations
// with TORCH_LIBRARY_IMPL(beacon, CPU|CUDA, m) next to the kernels (csrc/cpu, csrc/cuda);
// fake (meta) kernels and the typed Python wrappers live in beacon_ops/ops.py.
//
// The cache layout and length conventions are the "condensed-cache contract" of README.md.
#include <torch/library.h>

TORCH_LIBRARY(beacon, m) {
  // Attention of one step over the condensed cache [memory | raw | beacons], mask computed in the
  // kernel. Returns (out [total_q, heads, head_dim] like q, lse fp32 [total_q, heads]).
  m.def(
      "attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cu_seqlens_q, Tensor mem_len, "
      "Tensor raw_len, Tensor beacon_len, Tensor ratio, int max_seqlen_q, str mode, "
      "bool attend_previous, float softmax_scale) -> (Tensor out, Tensor lse)");
  // Gradients of `attention` (FlashAttention-2 style, probabilities recomputed from lse).
  // dk_cache/dv_cache have k_cache/v_cache's shape, zero where no query attends.
  m.def(
      "attention_backward(Tensor dout, Tensor q, Tensor k_cache, Tensor v_cache, Tensor out, "
      "Tensor lse, Tensor cu_seqlens_q, Tensor mem_len, Tensor raw_len, Tensor beacon_len, "
      "Tensor ratio, int max_seqlen_q, str mode, bool attend_previous, float softmax_scale) "
      "-> (Tensor dq, Tensor dk_cache, Tensor dv_cache)");
  // Rotate x [tokens, heads, head_dim] in place by RoPE at positions [tokens].
  m.def(
      "rope_(Tensor(a!) x, Tensor positions, Tensor cos, Tensor sin, bool interleaved) -> ()");
  // Write a step's new keys (rotated at `positions`) and values into each sequence's slots
  // [end - n, end), end = mem_len + raw_len + beacon_len, n = the sequence's token count.
  m.def(
      "append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, "
      "Tensor cu_seqlens, Tensor mem_len, Tensor raw_len, Tensor beacon_len, Tensor positions, "
      "Tensor cos, Tensor sin, bool interleaved) -> ()");
  // In-place compaction of all layers after a full window (spec section 5).
  // The mode argument is not called `mode`: torch.compile's auto_functionalize passes a mutating
  // op's arguments as keywords to a function that has its own `mode` parameter (TypeError).
  m.def(
      "compact_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) mem_len, Tensor(d!) raw_len, "
      "Tensor(e!) beacon_len, Tensor ratio, Tensor cos, Tensor sin, int window, int stride, "
      "str beacon_mode, bool interleaved) -> ()");
  // x [rows, in] times weight [out, in] transposed, plus bias [out]: F.linear for the few rows of
  // a decode step, streaming the weights once (CPU; fp32 accumulation, rounded to x's dtype).
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Llama's RMSNorm over x's last dimension, times weight [dim]: one call for what torch does in
  // several (CPU; fp32 statistics, 16-bit results rounded as Hugging Face's LlamaRMSNorm does).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

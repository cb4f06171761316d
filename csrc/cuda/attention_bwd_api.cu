// torch.ops.beacon.attention_backward on CUDA: host-side checks (shapes, dtypes, devices,
// strides only: the lengths stay on the device, so the op does not synchronise), the parameter
// struct, and the dispatch to the kernels of attention_bwd.cuh.
//
// Paths: bf16 and fp16 with head_dim 64 or 128 run the compiled instantiations (static_switch.h;
// one left out of the build raises a clear error); fp32, fp64, and bf16/fp16 with any other
// head_dim <= 256 run the generic instantiation of the same kernels. Gradients accumulate in
// fp32 (fp64 for fp64 inputs) and are written once, in the inputs' dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "attn_params.h"
#include "beacon_mask.h"
#include "cuda/alignment.h"
#include "cuda/device_params.h"
#include "cuda/device_runtime.h"
#include "cuda/params.h"
#include "cuda/static_switch.h"
#include "op_checks.h"

namespace beacon {
namespace cuda {
namespace {

constexpr const char* kOp = "beacon.attention_backward";

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens_q, const at::Tensor& mem_len,
    const at::Tensor& raw_len, const at::Tensor& beacon_len, const at::Tensor& ratio, int64_t max_seqlen_q,
    c10::string_view mode_str, bool attend_previous, double softmax_scale) {
  const Mode mode = checks::check_attention_backward(kOp, dout_in, q_in, k_cache, v_cache, out_in, lse_in, cu_seqlens_q,
                                                     mem_len, raw_len, beacon_len, ratio, max_seqlen_q, mode_str,
                                                     softmax_scale);
  TORCH_CHECK_VALUE(rt::is_device_tensor(q_in), kOp, ": q must be a CUDA tensor, got ", q_in.device());
  const HostAttnParams hp = fill_attn_params(q_in, k_cache, v_cache, max_seqlen_q, mode, attend_previous, softmax_scale);
  const auto dt = q_in.scalar_type();
  const int64_t total_q = hp.total_q, heads = hp.heads, d = hp.head_dim, batch = hp.batch;
  check_cuda_sizes(kOp, hp, max_seqlen_q);

  rt::DeviceGuard guard(q_in.device());
  // Zero-filled: cache slots no row sees (and rows outside every sequence) keep gradient 0.
  at::Tensor dq = at::zeros({total_q, heads, d}, q_in.options());
  at::Tensor dk = at::zeros(k_cache.sizes(), k_cache.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::zeros(v_cache.sizes(), v_cache.options().memory_format(at::MemoryFormat::Contiguous));
  if (total_q == 0 || heads == 0 || batch == 0) return {dq, dk, dv};

  // The kernels read rows and heads through strides but need head_dim contiguous (out.sum()
  // hands over a dout expanded with stride 0 everywhere). The tensor-core kernels copy rows
  // with 16-byte cp.async: q and dout are copied when not aligned for it; an unaligned cache
  // view takes the generic path.
  const bool tensor_cores = (dt == at::kBFloat16 || dt == at::kHalf) && (d == 64 || d == 128) &&
                            aligned16(k_cache) && aligned16(v_cache);
  auto ready = [&](const at::Tensor& t) {
    const bool ok = t.stride(2) == 1 && (!tensor_cores || aligned16(t));
    return ok ? t : t.is_contiguous() ? t.clone() : t.contiguous();  // fresh, aligned storage
  };
  const at::Tensor q = ready(q_in), dout = ready(dout_in);
  const at::Tensor out = out_in.stride(2) == 1 ? out_in : out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const bool wide = dt == at::kDouble;
  at::Tensor delta = at::empty({total_q, heads}, q_in.options().dtype(wide ? at::kDouble : at::kFloat));

  AttnBwdParams p{};
  fill_device_params(p, hp, q, out, lse, k_cache, v_cache, cu_seqlens_q, mem_len, raw_len, beacon_len, ratio);
  p.dout = dout.data_ptr();
  p.do_row_stride = dout.stride(0);
  p.do_head_stride = dout.stride(1);
  p.dq = dq.data_ptr();
  p.dq_row_stride = dq.stride(0);
  p.dq_head_stride = dq.stride(1);
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dkv_batch_stride = dk.stride(0);
  p.dkv_head_stride = dk.stride(1);
  p.dkv_row_stride = dk.stride(2);
  p.delta = delta.data_ptr();

  cudaStream_t stream = rt::current_stream();
  if (tensor_cores) {
    const DType kind = dt == at::kBFloat16 ? DType::kBF16 : DType::kFP16;
    const bool found = with_attention_instance<KernelKind::kBwd>(
        kind, static_cast<int>(d), [&]<typename T, int D>() { run_attention_backward<T, D>(p, stream); });
    TORCH_CHECK_VALUE(found, kOp, ": ", not_built_message<KernelKind::kBwd>(kind, static_cast<int>(d)));
  } else if (dt == at::kFloat) {
    run_attention_backward_generic<float>(p, stream);
  } else if (dt == at::kDouble) {
    run_attention_backward_generic<double>(p, stream);
  } else if (dt == at::kHalf) {
    run_attention_backward_generic<__half>(p, stream);
  } else {
    run_attention_backward_generic<__nv_bfloat16>(p, stream);
  }
  BEACON_CUDA_LAUNCH_CHECK();
  return {dq, dk, dv};
}

}  // namespace
}  // namespace cuda
}  // namespace beacon

BEACON_CUDA_LIBRARY_IMPL(m) { m.impl("attention_backward", &beacon::cuda::attention_backward_cuda); }

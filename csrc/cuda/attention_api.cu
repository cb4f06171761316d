// torch.ops.beacon.attention on CUDA: host-side checks (shapes, dtypes, devices, strides only:
// the lengths live on the device and are never read here, so the op does not synchronise and
// can be captured in a CUDA graph), the parameter struct, and the dispatch to the prefill kernel
// or, when max_seqlen_q == 1, to the split-KV decode kernels.
//
// Paths: bf16 and fp16 with head_dim 64 or 128 run the tensor-core kernels (the instantiations
// compiled in, see static_switch.h; one that was left out of the build raises a clear error).
// fp32 inputs, and bf16/fp16 with any other head_dim <= 256, run the simple CUDA-core kernel of
// attention_generic.cu: correct (fp32 accumulation, same mask and conventions), not fast.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "attn_params.h"
#include "beacon_mask.h"
#include "cuda/alignment.h"
#include "cuda/device_params.h"
#include "cuda/device_runtime.h"
#include "op_checks.h"
#include "cuda/params.h"
#include "cuda/static_switch.h"

namespace beacon {
namespace cuda {
namespace {

constexpr const char* kOp = "beacon.attention";

// Split count for decode: enough blocks to fill the GPU a few times over, but every split keeps
// at least 4 key tiles of work when the cache is full (the key count itself is on the device).
int decode_num_splits(int64_t base_blocks, int64_t capacity) {
  const int sms = rt::sm_count();
  const int64_t want = (4 * static_cast<int64_t>(sms) + base_blocks - 1) / std::max<int64_t>(base_blocks, 1);
  const int64_t max_by_keys = std::max<int64_t>(1, (capacity + 255) / 256);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, max_by_keys, 128})));
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q_in, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache, const at::Tensor& cu_seqlens_q,
                                                  const at::Tensor& mem_len, const at::Tensor& raw_len,
                                                  const at::Tensor& beacon_len, const at::Tensor& ratio,
                                                  int64_t max_seqlen_q, c10::string_view mode_str,
                                                  bool attend_previous, double softmax_scale) {
  const Mode mode = checks::check_attention(kOp, q_in, k_cache, v_cache, cu_seqlens_q, mem_len, raw_len, beacon_len,
                                            ratio, max_seqlen_q, mode_str, softmax_scale);
  TORCH_CHECK_VALUE(rt::is_device_tensor(q_in), kOp, ": q must be a CUDA tensor, got ", q_in.device());
  const at::Device device = q_in.device();
  const HostAttnParams hp =
      fill_attn_params(q_in, k_cache, v_cache, max_seqlen_q, mode, attend_previous, softmax_scale);
  const auto dt = q_in.scalar_type();
  const int64_t total_q = hp.total_q, heads = hp.heads, d = hp.head_dim;
  const int64_t batch = hp.batch, kv_heads = hp.kv_heads, capacity = hp.capacity;
  check_cuda_sizes(kOp, hp, max_seqlen_q);
  // Tensor cores for bf16/fp16 with head_dim 64 / 128, the simple kernel otherwise.
  const bool tensor_cores = dt != at::kFloat && (d == 64 || d == 128);
  if (tensor_cores) {
    TORCH_CHECK(aligned16(k_cache) && aligned16(v_cache), kOp,
                ": k_cache and v_cache must be 16-byte aligned with strides that are multiples of 8 elements");
  }

  rt::DeviceGuard guard(device);
  at::Tensor q = !tensor_cores || aligned16(q_in) ? q_in : q_in.contiguous().clone();
  at::Tensor out = at::empty({total_q, heads, d}, q.options());
  at::Tensor lse = at::empty({total_q, heads}, q.options().dtype(at::kFloat));
  if (total_q == 0 || heads == 0 || batch == 0) {
    if (total_q > 0) {  // rows with no sequence (batch == 0 cannot own queries): nothing to see
      out.zero_();
      lse.fill_(INFINITY);
    }
    return {out, lse};
  }

  AttnParams p{};
  fill_device_params(p, hp, q, out, lse, k_cache, v_cache, cu_seqlens_q, mem_len, raw_len, beacon_len,
                     ratio);  // q may be an aligned copy of q_in

  cudaStream_t stream = rt::current_stream();
  if (!tensor_cores) {
    if (dt == at::kFloat) {
      run_attention_generic<float>(p, stream);
    } else if (dt == at::kHalf) {
      run_attention_generic<__half>(p, stream);
    } else {
      run_attention_generic<__nv_bfloat16>(p, stream);
    }
    BEACON_CUDA_LAUNCH_CHECK();
    return {out, lse};
  }

  const bool decode = hp.max_seqlen_q == 1;
  at::Tensor out_accum, lse_accum;
  if (decode) {
    const int64_t m_blocks = (static_cast<int64_t>(p.group) + 15) / 16;
    p.num_splits = decode_num_splits(m_blocks * batch * kv_heads, capacity);
    out_accum = at::empty({p.num_splits, total_q, heads, d}, q.options().dtype(at::kFloat));
    lse_accum = at::empty({p.num_splits, total_q, heads}, q.options().dtype(at::kFloat));
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  } else {
    p.num_splits = 1;
  }

  const DType kind = dt == at::kBFloat16 ? DType::kBF16 : DType::kFP16;
  if (decode) {
    const bool found = with_attention_instance<KernelKind::kDecode>(
        kind, static_cast<int>(d), [&]<typename T, int D>() { run_attention_decode<T, D>(p, stream); });
    TORCH_CHECK_VALUE(found, kOp, ": ", not_built_message<KernelKind::kDecode>(kind, static_cast<int>(d)));
  } else {
    const bool found = with_attention_instance<KernelKind::kPrefill>(
        kind, static_cast<int>(d), [&]<typename T, int D>() { run_attention_prefill<T, D>(p, stream); });
    TORCH_CHECK_VALUE(found, kOp, ": ", not_built_message<KernelKind::kPrefill>(kind, static_cast<int>(d)));
  }
  BEACON_CUDA_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace
}  // namespace cuda
}  // namespace beacon

BEACON_CUDA_LIBRARY_IMPL(m) { m.impl("attention", &beacon::cuda::attention_cuda); }

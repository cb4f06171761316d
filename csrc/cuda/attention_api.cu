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
  TORCH_CHECK_VALUE(capacity < (int64_t{1} << 31) && total_q < (int64_t{1} << 31), kOp,
                    ": capacity and total_q must fit in int32");
  TORCH_CHECK_VALUE(batch <= 65535 && kv_heads <= 65535, kOp, ": batch and kv_heads must be at most 65535 on CUDA");
  TORCH_CHECK_VALUE(total_q == 0 || max_seqlen_q >= 1, kOp, ": max_seqlen_q must be >= 1 when q has rows");
  TORCH_CHECK_VALUE(d >= 1 && d <= 256, kOp, ": head_dim must lie in [1, 256] on CUDA, got ", d);
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

  // The shared host parameters, then the device pointers.
  AttnParams p{};
  p.q = q.data_ptr();
  p.out = out.data_ptr();
  p.q_row_stride = q.stride(0);  // q may be an aligned copy of q_in
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
  p.batch = static_cast<int>(batch);
  p.num_heads = static_cast<int>(heads);
  p.num_kv_heads = static_cast<int>(kv_heads);
  p.group = static_cast<int>(hp.group);
  p.head_dim = static_cast<int>(d);
  p.capacity = static_cast<int>(capacity);
  p.total_q = static_cast<int>(total_q);
  p.max_seqlen_q = static_cast<int>(hp.max_seqlen_q);
  p.mode = static_cast<int>(hp.mode);
  p.attend_previous = hp.attend_previous;
  p.scale = hp.scale;
  p.scale_log2 = p.scale * static_cast<float>(M_LOG2E);

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
  const bool found = with_attention_instance(kind, static_cast<int>(d), [&]<typename T, int D>() {
    if (decode) {
      run_attention_decode<T, D>(p, stream);
    } else {
      run_attention_prefill<T, D>(p, stream);
    }
  });
  TORCH_CHECK_VALUE(found, kOp, ": no CUDA kernel for head_dim ", d, " and dtype ", dt,
                    " in this build (built:", built_attention_instances(),
                    "). Rebuild with BEACON_OPS_HEADDIMS / BEACON_OPS_DTYPES including it");
  BEACON_CUDA_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace
}  // namespace cuda
}  // namespace beacon

BEACON_CUDA_LIBRARY_IMPL(m) { m.impl("attention", &beacon::cuda::attention_cuda); }

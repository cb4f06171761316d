// Runtime values -> template arguments, in one place (FlashAttention-2's static_switch.h idea).
//
// with_attention_instance(dtype, head_dim, f) calls f.template operator()<T, kHeadDim>() for the
// (dtype, head dim) instantiations compiled into this build: CMake defines
// BEACON_BUILT_HDIM<d>_<dtype>=1 for each one it builds (BEACON_OPS_HEADDIMS / BEACON_OPS_DTYPES
// subsets), so an instantiation that was not built is never referenced and the caller can raise
// a clear error instead of failing to link.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace beacon {
namespace cuda {

enum class DType : int { kBF16 = 0, kFP16 = 1 };

// Returns false when (dtype, head_dim) has no compiled kernel.
template <typename F>
bool with_attention_instance(DType dtype, int head_dim, F&& f) {
#if BEACON_BUILT_HDIM64_bf16
  if (dtype == DType::kBF16 && head_dim == 64) { f.template operator()<__nv_bfloat16, 64>(); return true; }
#endif
#if BEACON_BUILT_HDIM128_bf16
  if (dtype == DType::kBF16 && head_dim == 128) { f.template operator()<__nv_bfloat16, 128>(); return true; }
#endif
#if BEACON_BUILT_HDIM64_fp16
  if (dtype == DType::kFP16 && head_dim == 64) { f.template operator()<__half, 64>(); return true; }
#endif
#if BEACON_BUILT_HDIM128_fp16
  if (dtype == DType::kFP16 && head_dim == 128) { f.template operator()<__half, 128>(); return true; }
#endif
  (void)dtype;
  (void)head_dim;
  (void)f;
  return false;
}

// The compiled (head dim, dtype) instantiations, for error messages.
inline const char* built_attention_instances() {
  return ""
#if BEACON_BUILT_HDIM64_bf16
         " (64, bf16)"
#endif
#if BEACON_BUILT_HDIM128_bf16
         " (128, bf16)"
#endif
#if BEACON_BUILT_HDIM64_fp16
         " (64, fp16)"
#endif
#if BEACON_BUILT_HDIM128_fp16
         " (128, fp16)"
#endif
      ;
}

}  // namespace cuda
}  // namespace beacon

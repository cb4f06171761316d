// Runtime values -> template arguments, in one place (FlashAttention-2's static_switch.h idea).
//
// with_attention_instance<kind>(dtype, head_dim, f) calls f.template operator()<T, kHeadDim>() for
// the tensor-core instantiations of one kernel kind compiled into this build: CMake defines
// BEACON_BUILT_<KIND>_HDIM<d>_<dtype>=1 for each one it builds (cmake/kernel_list.cmake:
// the BEACON_OPS_KERNELS / BEACON_OPS_HEADDIMS / BEACON_OPS_DTYPES subsets), so an instantiation
// that was not built is never referenced and the caller raises not_built_message() instead of
// failing to link.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

namespace beacon {
namespace cuda {

enum class DType : int { kBF16 = 0, kFP16 = 1 };

// The kinds of tensor-core kernels instantiated per (head dim x dtype): the names of
// csrc/cuda/instantiations/<kind>_hdim<d>_<dtype>.cu.
enum class KernelKind : int { kPrefill = 0, kDecode = 1, kBwd = 2 };

inline const char* kernel_kind_name(KernelKind k) {
  switch (k) {
    case KernelKind::kPrefill: return "prefill";
    case KernelKind::kDecode: return "decode";
    case KernelKind::kBwd: return "bwd";
  }
  return "?";
}

inline const char* dtype_name(DType dtype) { return dtype == DType::kBF16 ? "bf16" : "fp16"; }

// kBuilt<kind, dtype, head dim>: whether this build compiled that instantiation.
template <KernelKind K, DType DT, int D>
inline constexpr bool kBuilt = false;

#define BEACON_MARK_BUILT(KIND, DT, D) \
  template <>                          \
  inline constexpr bool kBuilt<KernelKind::KIND, DType::DT, D> = true

#if BEACON_BUILT_PREFILL_HDIM64_bf16
BEACON_MARK_BUILT(kPrefill, kBF16, 64);
#endif
#if BEACON_BUILT_PREFILL_HDIM128_bf16
BEACON_MARK_BUILT(kPrefill, kBF16, 128);
#endif
#if BEACON_BUILT_PREFILL_HDIM64_fp16
BEACON_MARK_BUILT(kPrefill, kFP16, 64);
#endif
#if BEACON_BUILT_PREFILL_HDIM128_fp16
BEACON_MARK_BUILT(kPrefill, kFP16, 128);
#endif
#if BEACON_BUILT_DECODE_HDIM64_bf16
BEACON_MARK_BUILT(kDecode, kBF16, 64);
#endif
#if BEACON_BUILT_DECODE_HDIM128_bf16
BEACON_MARK_BUILT(kDecode, kBF16, 128);
#endif
#if BEACON_BUILT_DECODE_HDIM64_fp16
BEACON_MARK_BUILT(kDecode, kFP16, 64);
#endif
#if BEACON_BUILT_DECODE_HDIM128_fp16
BEACON_MARK_BUILT(kDecode, kFP16, 128);
#endif
#if BEACON_BUILT_BWD_HDIM64_bf16
BEACON_MARK_BUILT(kBwd, kBF16, 64);
#endif
#if BEACON_BUILT_BWD_HDIM128_bf16
BEACON_MARK_BUILT(kBwd, kBF16, 128);
#endif
#if BEACON_BUILT_BWD_HDIM64_fp16
BEACON_MARK_BUILT(kBwd, kFP16, 64);
#endif
#if BEACON_BUILT_BWD_HDIM128_fp16
BEACON_MARK_BUILT(kBwd, kFP16, 128);
#endif
#undef BEACON_MARK_BUILT

// Calls g.template operator()<DT, T, D>() for every (dtype, head dim) a kernel kind may be
// instantiated for.
template <typename G>
void for_each_attention_instance(G&& g) {
  g.template operator()<DType::kBF16, __nv_bfloat16, 64>();
  g.template operator()<DType::kBF16, __nv_bfloat16, 128>();
  g.template operator()<DType::kFP16, __half, 64>();
  g.template operator()<DType::kFP16, __half, 128>();
}

// Returns false when kind K has no compiled kernel for (dtype, head_dim).
template <KernelKind K, typename F>
bool with_attention_instance(DType dtype, int head_dim, F&& f) {
  bool found = false;
  for_each_attention_instance([&]<DType DT, typename T, int D>() {
    if constexpr (kBuilt<K, DT, D>) {
      if (dtype == DT && head_dim == D) {
        f.template operator()<T, D>();
        found = true;
      }
    }
  });
  return found;
}

// The compiled instances of kind K as "hdim<d>_<dtype>" names (those of the source files).
template <KernelKind K>
std::string built_attention_instances() {
  std::string names;
  for_each_attention_instance([&]<DType DT, typename T, int D>() {
    if constexpr (kBuilt<K, DT, D>) {
      names += (names.empty() ? "hdim" : " hdim") + std::to_string(D) + "_" + dtype_name(DT);
    }
  });
  return names;
}

// The error for an instance of kind K that this build lacks: what is missing, what was built,
// and the CMake settings that choose it.
template <KernelKind K>
std::string not_built_message(DType dtype, int head_dim) {
  const std::string built = built_attention_instances<K>();
  return std::string("no CUDA ") + kernel_kind_name(K) + " kernel for head_dim " + std::to_string(head_dim) +
         " and dtype " + dtype_name(dtype) + " in this build (" + kernel_kind_name(K) +
         " built for: " + (built.empty() ? "none" : built) +
         "). Rebuild with BEACON_OPS_KERNELS, BEACON_OPS_HEADDIMS and BEACON_OPS_DTYPES including it";
}

}  // namespace cuda
}  // namespace beacon

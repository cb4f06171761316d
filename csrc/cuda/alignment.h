// The alignment the tensor-core kernels' 16-byte cp.async copies need (host side).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace beacon {
namespace cuda {

// t's data is 16-byte aligned and every stride but the last (contiguous) one is a multiple of
// 8 elements (16 bytes of a 16-bit dtype), so every row of head_dim values starts aligned.
inline bool aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int i = 0; i + 1 < t.dim(); ++i) {
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  }
  return true;
}

}  // namespace cuda
}  // namespace beacon

// csrc/cuda/device_runtime.h's services for the host emulation: the ops run on CPU tensors,
// kernels are launched through emulator.h, and the ops are registered for the CPU dispatch key
// of their own namespace, torch.ops.beacon_cuda_emu (schemas: beacon_ops/cuda_emu.py copies
// torch.ops.beacon's), so they never shadow the CPU kernels of torch.ops.beacon.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/emu/emulator.h"

namespace beacon {
namespace cuda {
namespace rt {

inline bool is_device_tensor(const at::Tensor& t) { return t.is_cpu(); }
inline cudaStream_t current_stream() { return nullptr; }
inline int sm_count() { return emu::sm_count(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};

}  // namespace rt
}  // namespace cuda
}  // namespace beacon

// Launch failures raise from the launch itself.
#define BEACON_CUDA_LAUNCH_CHECK() ((void)0)
#define BEACON_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(beacon_cuda_emu, CPU, m)

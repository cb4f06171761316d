// The CUDA runtime services the ops' host code uses (attention_api.cu, cache.cu), behind one
// small interface, so that the same host code also drives the host emulation of the kernels
// (BEACON_CUDA_EMU: CPU tensors, emulated launches; csrc/cuda/emu/runtime.h).
//   rt::is_device_tensor(t)    t lives where the kernels run
//   rt::current_stream()       the stream kernels are launched on
//   rt::sm_count()             multiprocessors of the current device (grid sizing)
//   rt::DeviceGuard g(device)  makes `device` current for the scope
//   BEACON_CUDA_LAUNCH_CHECK() raises if the last launch failed
//   BEACON_CUDA_LIBRARY_IMPL(m) { m.impl(...); }   registers the ops' CUDA kernels
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#if BEACON_CUDA_EMU
#include "cuda/emu/runtime.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace beacon {
namespace cuda {
namespace rt {

inline bool is_device_tensor(const at::Tensor& t) { return t.is_cuda(); }
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
using DeviceGuard = c10::cuda::CUDAGuard;

}  // namespace rt
}  // namespace cuda
}  // namespace beacon

#define BEACON_CUDA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define BEACON_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(beacon, CUDA, m)
#endif

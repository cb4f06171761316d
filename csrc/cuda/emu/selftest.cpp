// Small kernels with known defects, one per check of the emulation, and their correct twins:
// python_tests/test_cuda_emu.py runs each and expects the check's error (or none).
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/backend.h"
#include "cuda/ptx.h"

namespace beacon {
namespace emu {
namespace {

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads_or(1);
  }
}

__global__ void exit_before_barrier_kernel() {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

__global__ void exit_before_shuffle_kernel(float* out) {
  if (threadIdx.x == 7) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// Lane 0 waits at the block barrier while the other lanes of its warp wait in a shuffle.
__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
    __syncthreads();
  }
}

// Every thread copies 16 bytes to shared memory, then the warp reads rows other threads
// copied: with `barrier` after the wait correct; without it a race; without the wait, a read of
// bytes in flight.
__global__ void smem_copy_kernel(const uint4* src, uint32_t* out, bool wait, bool barrier) {
  BEACON_DYNAMIC_SMEM(smem);
  const int t = threadIdx.x;
  cuda::cp_async_16(smem + 16 * t, src + t, true);
  cuda::cp_async_commit();
  if (wait) cuda::cp_async_wait<0>();
  if (barrier) __syncthreads();
  uint32_t r[4];
  cuda::ldmatrix_x4(r, smem + 16 * ((t + 1) % 32));
  out[t] = r[0] ^ r[1] ^ r[2] ^ r[3];
  cuda::cp_async_wait<0>();
}

// Reads shared memory nobody wrote.
__global__ void smem_uninitialized_kernel(uint32_t* out) {
  BEACON_DYNAMIC_SMEM(smem);
  uint32_t r[4];
  cuda::ldmatrix_x4(r, smem + 16 * threadIdx.x);
  out[threadIdx.x] = r[0];
}

// Every block writes out[0] (a race between blocks) or its own element (none).
__global__ void global_write_kernel(int* out, bool same) {
  if (threadIdx.x != 0) return;
  int* p = out + (same ? 0 : blockIdx.x);
  BEACON_GLOBAL_WRITE(p, sizeof(int));
  *p = static_cast<int>(blockIdx.x);
}

// Thread t reads element t + 1 that thread t + 1 overwrites: a race unless a barrier separates
// the read from the write.
__global__ void global_shift_kernel(int* data, bool barrier) {
  const int t = threadIdx.x;
  int v = 0;
  if (t + 1 < static_cast<int>(blockDim.x)) {
    BEACON_GLOBAL_READ(data + t + 1, sizeof(int));
    v = data[t + 1];
  }
  if (barrier) __syncthreads();
  BEACON_GLOBAL_WRITE(data + t, sizeof(int));
  data[t] = v;
}

__global__ void big_smem_kernel() {}

}  // namespace

// Runs self-test `name`; a failed check raises std::runtime_error with its message.
void run_selftest(const std::string& name) {
  static uint4 src[32];
  static uint32_t out32[32];
  static float outf[64];
  static int ints[64];
  for (int i = 0; i < 32; ++i) src[i] = uint4{1u + i, 2u + i, 3u + i, 4u + i};
  if (name == "divergent_barrier") {
    BEACON_LAUNCH(divergent_barrier_kernel, 1, 32, 0, nullptr)();
  } else if (name == "exit_before_barrier") {
    BEACON_LAUNCH(exit_before_barrier_kernel, 1, 64, 0, nullptr)();
  } else if (name == "exit_before_shuffle") {
    BEACON_LAUNCH(exit_before_shuffle_kernel, 1, 32, 0, nullptr)(outf);
  } else if (name == "deadlock") {
    BEACON_LAUNCH(deadlock_kernel, 1, 64, 0, nullptr)(outf);
  } else if (name == "smem_ok") {
    BEACON_LAUNCH(smem_copy_kernel, 1, 32, 512, nullptr)(src, out32, true, true);
  } else if (name == "smem_race") {
    BEACON_LAUNCH(smem_copy_kernel, 1, 32, 512, nullptr)(src, out32, true, false);
  } else if (name == "smem_in_flight") {
    BEACON_LAUNCH(smem_copy_kernel, 1, 32, 512, nullptr)(src, out32, false, true);
  } else if (name == "smem_uninitialized") {
    BEACON_LAUNCH(smem_uninitialized_kernel, 1, 32, 512, nullptr)(out32);
  } else if (name == "global_ok") {
    BEACON_LAUNCH(global_write_kernel, 4, 32, 0, nullptr)(ints, false);
    BEACON_LAUNCH(global_shift_kernel, 1, 64, 0, nullptr)(ints, true);
  } else if (name == "global_race_blocks") {
    BEACON_LAUNCH(global_write_kernel, 4, 32, 0, nullptr)(ints, true);
  } else if (name == "global_race_threads") {
    BEACON_LAUNCH(global_shift_kernel, 1, 64, 0, nullptr)(ints, false);
  } else if (name == "smem_without_opt_in") {
    BEACON_LAUNCH(big_smem_kernel, 1, 32, 64 * 1024, nullptr)();
  } else {
    throw std::invalid_argument("unknown self-test " + name);
  }
}

}  // namespace emu
}  // namespace beacon

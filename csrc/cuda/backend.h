// The CUDA constructs the host C++ compiler cannot parse, as macros, so that the kernels compile
// unchanged with nvcc and for the host emulation (BEACON_CUDA_EMU, csrc/cuda/emu/):
//   BEACON_DYNAMIC_SMEM(name);                               the block's dynamic shared memory
//                                                            (unsigned char[], 128-byte aligned)
//   BEACON_LAUNCH(kernel, grid, block, smem, stream)(args);  kernel<<<grid, block, smem, stream>>>
//   BEACON_GLOBAL_READ(p, bytes), BEACON_GLOBAL_WRITE(p, bytes)
//       global-memory accesses the emulation checks for races within a launch (no code on the
//       GPU); the cache kernels mark their data moves with them, the backward its gradient
//       writes.
#pragma once

#if BEACON_CUDA_EMU
#include "cuda/emu/emulator.h"
#define BEACON_DYNAMIC_SMEM(name) unsigned char* const name = ::beacon::emu::dynamic_smem()
#define BEACON_LAUNCH(kernel, grid, block, smem, stream) \
  ::beacon::emu::Launch(kernel, grid, block, smem, stream, #kernel)
#define BEACON_GLOBAL_READ(p, bytes) ::beacon::emu::global_access(p, bytes, false)
#define BEACON_GLOBAL_WRITE(p, bytes) ::beacon::emu::global_access(p, bytes, true)
#else
#define BEACON_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define BEACON_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define BEACON_GLOBAL_READ(p, bytes) ((void)0)
#define BEACON_GLOBAL_WRITE(p, bytes) ((void)0)
#endif

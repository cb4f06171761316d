// A host emulation of the CUDA execution model, enough to run this project's kernels unchanged
// (compiled by the host C++ compiler with BEACON_CUDA_EMU=1; see csrc/cuda/backend.h), written
// from the CUDA C++ Programming Guide and the PTX ISA:
//   - every CUDA thread is a fiber; the blocks of a launch run one after another, the threads of
//     a block interleave at barriers and warp collectives in a selectable order (forward,
//     reverse, seeded random), and the blocks run in that order too;
//   - __syncthreads(_or/_and/_count), __syncwarp, __shfl(_xor/_up/_down)_sync, atomics;
//   - the PTX wrappers of ptx.h: ldmatrix (x4, .trans), mma.sync m16n8k16 (bf16/fp16 -> fp32)
//     computed warp-wide from the ISA's fragment layouts, cp.async deferred to the wait_group
//     that retires it, its destination poisoned (all-ones bytes: NaN) until then.
// Checks that fail the launch (a C++ exception from the launch, a Python RuntimeError through
// the ops): barrier divergence, a thread exiting before a barrier or a warp collective its warp
// waits in, deadlock; shared-memory races (a per-byte shadow: read-after-write,
// write-after-read, write-after-write by different threads between two barriers, reads of bytes
// whose cp.async has not been retired, reads of never-written bytes, accesses outside the
// block's shared memory); global-memory races within a launch on the accesses the kernels mark
// (BEACON_GLOBAL_READ / _WRITE): conflicting accesses from different blocks, or from different
// threads of one block between two barriers.
//
// Not modelled: performance, the weak memory model beyond these race checks (the emulation
// itself is sequentially consistent), hardware rounding (the emulated MMA sums exactly in double
// and rounds once; --use_fast_math intrinsics are computed with the precise host functions).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace beacon {
namespace emu {

enum class Schedule : int { kForward = 0, kReverse = 1, kRandom = 2 };

// The order of threads and blocks of the following launches (kRandom: seeded by `seed` and the
// launch's ordinal, so a run is reproducible).
void set_schedule(Schedule schedule, uint64_t seed);
// The multiprocessor count the ops' host code sizes its grids by (rt::sm_count()).
void set_sm_count(int sms);
int sm_count();
// Kernel launches since the process started (a test can tell that a kernel ran).
int64_t launch_count();

// The current thread's built-in variables (set whenever a fiber is resumed).
namespace detail {
extern uint3 g_thread_idx;
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;
}  // namespace detail

// Fails the current launch with `message` (from a kernel: the launch raises afterwards).
[[noreturn]] void fail(const std::string& message);

unsigned char* dynamic_smem();
void global_access(const void* p, size_t bytes, bool write);

enum class BarrierKind : int { kSync = 0, kOr = 1, kAnd = 2, kCount = 3 };
int barrier(BarrierKind kind, int predicate);
void syncwarp(unsigned mask);
enum class ShflKind : int { kIdx = 0, kXor = 1, kUp = 2, kDown = 3 };
uint64_t shfl(unsigned mask, uint64_t bits, ShflKind kind, int arg, int width);

// ptx.h's instructions.
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans);
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
void cp_async_16(void* smem, const void* gmem, bool pred);
void cp_async_commit();
void cp_async_wait(int groups_left);

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
void set_max_dynamic_smem(const void* kernel, int bytes);

// Runs body() as every thread of every block of a (grid, block) launch; throws
// std::runtime_error when a check failed.
void run_kernel(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem_bytes,
                const std::function<void()>& body);

// BEACON_LAUNCH(kernel, grid, block, smem, stream)(args...): the arguments are converted to
// the kernel's parameter types once, as a launch copies them, and every thread gets them.
template <typename... P>
class Launch {
 public:
  Launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, const char* name)
      : kernel_(kernel), grid_(grid), block_(block), smem_(smem), name_(name) {}
  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    run_kernel(reinterpret_cast<const void*>(kernel_), name_, grid_, block_, smem_,
               [&] { std::apply(kernel_, params); });
  }

 private:
  void (*kernel_)(P...);
  dim3 grid_, block_;
  size_t smem_;
  const char* name_;
};

}  // namespace emu
}  // namespace beacon

// cuda_runtime.h's typed overload (declared for nvcc only); emulator.cpp defines the untyped one.
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

// ---------------------------------------------------------------------------------------------
// CUDA C++ device built-ins, for kernels compiled by the host compiler.
#define threadIdx (::beacon::emu::detail::g_thread_idx)
#define blockIdx (::beacon::emu::detail::g_block_idx)
#define blockDim (::beacon::emu::detail::g_block_dim)
#define gridDim (::beacon::emu::detail::g_grid_dim)
#ifndef warpSize
#define warpSize 32
#endif

// All threads of a block are fibers of one OS thread and blocks run one after another, so a
// function-local static is exactly one block's __shared__ variable.
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

inline void __syncthreads() { ::beacon::emu::barrier(::beacon::emu::BarrierKind::kSync, 0); }
inline int __syncthreads_or(int p) { return ::beacon::emu::barrier(::beacon::emu::BarrierKind::kOr, p != 0); }
inline int __syncthreads_and(int p) { return ::beacon::emu::barrier(::beacon::emu::BarrierKind::kAnd, p != 0); }
inline int __syncthreads_count(int p) { return ::beacon::emu::barrier(::beacon::emu::BarrierKind::kCount, p != 0); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::beacon::emu::syncwarp(mask); }

namespace beacon {
namespace emu {
template <typename T>
T shfl_value(unsigned mask, T v, ShflKind kind, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "__shfl_*_sync: up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl(mask, bits, kind, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace emu
}  // namespace beacon

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::beacon::emu::shfl_value(mask, v, ::beacon::emu::ShflKind::kIdx, src_lane, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::beacon::emu::shfl_value(mask, v, ::beacon::emu::ShflKind::kXor, lane_mask, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::beacon::emu::shfl_value(mask, v, ::beacon::emu::ShflKind::kUp, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::beacon::emu::shfl_value(mask, v, ::beacon::emu::ShflKind::kDown, static_cast<int>(delta), width);
}

// Atomics: fibers never preempt each other, so a plain read-modify-write is atomic.
template <typename T>
T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T>
T atomicMax(T* p, T v) { T old = *p; *p = old < v ? v : old; return old; }
template <typename T>
T atomicMin(T* p, T v) { T old = *p; *p = v < old ? v : old; return old; }
template <typename T>
T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T>
T atomicCAS(T* p, T compare, T v) { T old = *p; if (old == compare) *p = v; return old; }

// Fast-math intrinsics: the precise host functions (the hardware's approximations differ in the
// last bits; see the README's "CUDA host emulation").
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __exp2f(float x) { return std::exp2(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }

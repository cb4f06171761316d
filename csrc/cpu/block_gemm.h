// fp32 block GEMM for the CPU attention kernel: C [M x N] (+)= alpha * A [M x K] * B [K x N],
// with A addressed by two strides (so a transposed operand needs no copy), B and C row-major.
//
// Why not ATen: its fast cpublas::gemm(float) overloads are not exported from libtorch_cpu.
// Three paths (gemm_path()):
//   blas     the Fortran `sgemm_` that torch is linked with (looked up in the already loaded
//            libtorch_cpu): at level avx2, and at avx512 and above on Intel CPUs, where torch's
//            MKL runs its AVX-512 kernels (on the AMX Xeon 10-20% faster than the micro-kernel
//            below: prefill steps and the backward, docs/cpu-kernels-log.md)
//   kernel   a register-blocked AVX-512 micro-kernel (6 x 64 block of C in 24 zmm registers): at
//            avx512 and above on other CPUs (torch's MKL runs its AVX2 kernels on AMD CPUs, half
//            the AVX-512 peak of Zen 4/5)
//   aten     ATen matmuls on views: at level portable, or without sgemm_
// BEACON_OPS_FP32_GEMM=blas|kernel overrides the choice where the path exists (tests, benchmarks).
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "cpu/cpu_isa.h"

#ifdef BEACON_CPU_X86
#define BEACON_HAVE_AVX512_KERNEL 1
#endif

namespace beacon_cpu {

enum class GemmPath { kAvx512, kSgemm, kGeneric };

using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const float*, const int*, const float*, const int*, const float*, float*,
                         const int*);

inline SgemmFn find_sgemm() {
  static const SgemmFn fn = []() -> SgemmFn {
    Dl_info info;
    // Any function defined in libtorch_cpu locates the library that holds torch's BLAS.
    if (dladdr(reinterpret_cast<void*>(&at::native::cpublas::brgemm_release), &info) == 0 ||
        info.dli_fname == nullptr)
      return nullptr;
    void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    return lib == nullptr ? nullptr : reinterpret_cast<SgemmFn>(dlsym(lib, "sgemm_"));
  }();
  return fn;
}

inline GemmPath gemm_path() {
  using beacon::cpu::Isa;
  static const GemmPath path = [] {
    const char* env = std::getenv("BEACON_OPS_FP32_GEMM");
    const std::string choice = env ? env : "";
    const bool blas = beacon::cpu::cpu_has(Isa::kAvx2) && find_sgemm() != nullptr;
#ifdef BEACON_HAVE_AVX512_KERNEL
    if (beacon::cpu::cpu_has(Isa::kAvx512)) {
      if (choice == "kernel" || !blas) return GemmPath::kAvx512;
      if (choice == "blas") return GemmPath::kSgemm;
      return __builtin_cpu_is("intel") ? GemmPath::kSgemm : GemmPath::kAvx512;
    }
#endif
    return blas ? GemmPath::kSgemm : GemmPath::kGeneric;
  }();
  return path;
}

// The path's name for build_info()["cpu_fp32_gemm"].
inline const char* gemm_path_name() {
  switch (gemm_path()) {
    case GemmPath::kAvx512: return "kernel";
    case GemmPath::kSgemm: return "blas";
    default: return "aten";
  }
}

#ifdef BEACON_HAVE_AVX512_KERNEL
// One 6 x 64 block of C: 24 accumulators written out by hand (an array of __m512 was spilled to
// the stack by GCC). Fewer rows (mr < 6) re-read the last row and skip its stores; narrower
// blocks load zeros through the masks m0..m3 and store through them.
#define BEACON_ROW_FMA(i)                    \
  {                                          \
    const __m512 a = _mm512_set1_ps(a##i[k * sa_k]); \
    c##i##0 = _mm512_fmadd_ps(a, b0, c##i##0); \
    c##i##1 = _mm512_fmadd_ps(a, b1, c##i##1); \
    c##i##2 = _mm512_fmadd_ps(a, b2, c##i##2); \
    c##i##3 = _mm512_fmadd_ps(a, b3, c##i##3); \
  }
// Shared by the 6 x 64 micro-kernels (this fp32 one, bf16_gemm.h's bf16 one): the row pointers
// of A, the 24 accumulators, the masks of a block's 64 columns, and the stores of C.
#define BEACON_6X64_ROW_POINTERS(T, A, ld)               \
  const T* a0 = A;                                       \
  const T* a1 = A + (mr > 1 ? 1 : mr - 1) * (ld);        \
  const T* a2 = A + (mr > 2 ? 2 : mr - 1) * (ld);        \
  const T* a3 = A + (mr > 3 ? 3 : mr - 1) * (ld);        \
  const T* a4 = A + (mr > 4 ? 4 : mr - 1) * (ld);        \
  const T* a5 = A + (mr > 5 ? 5 : mr - 1) * (ld);
#define BEACON_6X64_ACCUMULATORS                                    \
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00; \
  __m512 c10 = c00, c11 = c00, c12 = c00, c13 = c00;                 \
  __m512 c20 = c00, c21 = c00, c22 = c00, c23 = c00;                 \
  __m512 c30 = c00, c31 = c00, c32 = c00, c33 = c00;                 \
  __m512 c40 = c00, c41 = c00, c42 = c00, c43 = c00;                 \
  __m512 c50 = c00, c51 = c00, c52 = c00, c53 = c00;
#define BEACON_ROW_STORE(i)                                                                  \
  if (i < mr) {                                                                              \
    float* c = C + i * ldc;                                                                  \
    const __m512 r[4] = {c##i##0, c##i##1, c##i##2, c##i##3};                                \
    for (int v = 0; v < 4; ++v) {                                                            \
      __m512 x = _mm512_mul_ps(r[v], va);                                                    \
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m[v], c + 16 * v));         \
      _mm512_mask_storeu_ps(c + 16 * v, m[v], x);                                            \
    }                                                                                        \
  }
// C rows (i < mr) <- alpha * accumulators (+ C when accumulate), through the column masks m.
#define BEACON_6X64_STORE                                 \
  {                                                       \
    const __m512 va = _mm512_set1_ps(alpha);              \
    BEACON_ROW_STORE(0) BEACON_ROW_STORE(1) BEACON_ROW_STORE(2) \
    BEACON_ROW_STORE(3) BEACON_ROW_STORE(4) BEACON_ROW_STORE(5) \
  }

// The four 16-column masks of a block of nr <= 64 columns.
__attribute__((target("avx512f"))) inline void column_masks(int nr, __mmask16* masks) {
  for (int v = 0; v < 4; ++v) {
    const int cols = nr - 16 * v;
    masks[v] = cols >= 16 ? static_cast<__mmask16>(0xFFFF)
                          : static_cast<__mmask16>(cols <= 0 ? 0 : (1u << cols) - 1);
  }
}

__attribute__((target("avx512f"))) inline void micro_6x64(int K, float alpha, const float* A,
                                                         int64_t sa_m, int64_t sa_k,
                                                         const float* B, int64_t ldb,
                                                         bool accumulate, float* C, int64_t ldc,
                                                         int mr, const __mmask16* m) {
  BEACON_6X64_ROW_POINTERS(float, A, sa_m)
  BEACON_6X64_ACCUMULATORS
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    const __m512 b0 = _mm512_maskz_loadu_ps(m[0], bk);
    const __m512 b1 = _mm512_maskz_loadu_ps(m[1], bk + 16);
    const __m512 b2 = _mm512_maskz_loadu_ps(m[2], bk + 32);
    const __m512 b3 = _mm512_maskz_loadu_ps(m[3], bk + 48);
    BEACON_ROW_FMA(0) BEACON_ROW_FMA(1) BEACON_ROW_FMA(2)
    BEACON_ROW_FMA(3) BEACON_ROW_FMA(4) BEACON_ROW_FMA(5)
  }
  BEACON_6X64_STORE
}
#undef BEACON_ROW_FMA

__attribute__((target("avx512f"))) inline void gemm_avx512(int M, int N, int K, float alpha,
                                                          const float* A, int64_t sa_m,
                                                          int64_t sa_k, const float* B,
                                                          int64_t ldb, bool accumulate, float* C,
                                                          int64_t ldc) {
  constexpr int kMR = 6, kNR = 64;
  for (int j0 = 0; j0 < N; j0 += kNR) {
    const int nr = N - j0 < kNR ? N - j0 : kNR;
    __mmask16 masks[4];
    column_masks(nr, masks);
    for (int i0 = 0; i0 < M; i0 += kMR)
      micro_6x64(K, alpha, A + i0 * sa_m, sa_m, sa_k, B + j0, ldb, accumulate, C + i0 * ldc + j0,
                 ldc, M - i0 < kMR ? M - i0 : kMR, masks);
  }
}
#endif

// block_gemm's arguments as ATen matmuls on views (also the fp64 path of the backward).
template <typename T>
inline void aten_gemm(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t sa_m, int64_t sa_k,
                      const T* B, int64_t ldb, bool accumulate, T* C, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {sa_m, sa_k}, opts);
  const at::Tensor b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (accumulate)
    c.addmm_(a, b, 1, alpha);
  else
    at::mm_out(c, a, b).mul_(alpha);
}

// C [M x N] = alpha * A * B (+ C when accumulate). A(i, k) = A[i * sa_m + k * sa_k]; one of
// sa_m, sa_k must be 1 (row- or column-major A). B(k, j) = B[k * ldb + j], C(i, j) = C[i * ldc + j].
inline void block_gemm(int M, int N, int K, float alpha, const float* A, int64_t sa_m,
                       int64_t sa_k, const float* B, int64_t ldb, bool accumulate, float* C,
                       int64_t ldc) {
  const GemmPath path = gemm_path();
#ifdef BEACON_HAVE_AVX512_KERNEL
  if (path == GemmPath::kAvx512) {
    gemm_avx512(M, N, K, alpha, A, sa_m, sa_k, B, ldb, accumulate, C, ldc);
    return;
  }
#endif
  if (path == GemmPath::kSgemm) {
    // Column-major view: C^T [N x M] = B^T [N x K] * A^T [K x M].
    // Row-major A read column-major is A^T already ("N"); column-major A needs "T".
    const char* ta = sa_k == 1 ? "N" : "T";
    const int lda = static_cast<int>(sa_k == 1 ? sa_m : sa_k);
    const int ldb_i = static_cast<int>(ldb), ldc_i = static_cast<int>(ldc);
    const float beta = accumulate ? 1.0f : 0.0f;
    find_sgemm()("N", ta, &N, &M, &K, &alpha, B, &ldb_i, A, &lda, &beta, C, &ldc_i);
    return;
  }
  aten_gemm<float>(M, N, K, alpha, A, sa_m, sa_k, B, ldb, accumulate, C, ldc);
}

}  // namespace beacon_cpu

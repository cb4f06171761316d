// bf16 block GEMM for the CPU attention kernel on CPUs with AVX-512-BF16 (cpu_isa() level
// avx512bf16): C [M x N] (+)= alpha * A B with bf16 operands and fp32 accumulation by vdpbf16ps,
// which adds the products of one *pair* of consecutive k per lane. So the operands are pairs:
//   A(i, 2p), A(i, 2p + 1) adjacent in memory (row-major A, K even: zero-padded),
//   Bp[p * ldb + j] = the 32-bit word (B(2p, j) low half, B(2p + 1, j) high half) ("VNNI" layout).
// Each pair product is exact in fp32, and the instruction adds the odd then the even product,
// rounding each time; pair_dot_portable does the same in plain C++ (for builds with
// BEACON_OPS_EMULATE_BF16_DOT, which take this path on any CPU so that the operand layouts can be
// tested where the instruction is missing; results match the instruction's except that it
// flushes denormals).
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/block_gemm.h"  // the 6 x 64 micro-kernel pieces
#include "cpu/cpu_isa.h"

namespace beacon_cpu {

// Whether the attention kernel takes the bf16 dot-product path.
inline bool use_bf16_dot() {
#ifdef BEACON_OPS_EMULATE_BF16_DOT
  return true;
#else
  return beacon::cpu::cpu_has(beacon::cpu::Isa::kAvx512Bf16);
#endif
}

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Portable: C = alpha * A Bp (+ C), same operands and rounding sequence as the AVX-512 kernel.
inline void gemm_bf16_pairs_portable(int M, int N, int Kp, float alpha, const uint16_t* A,
                                     int64_t lda, const uint32_t* Bp, int64_t ldb,
                                     bool accumulate, float* C, int64_t ldc) {
  for (int i = 0; i < M; ++i) {
    const uint16_t* a = A + i * lda;
    for (int j = 0; j < N; ++j) {
      volatile float acc = 0.0f;  // volatile: no FMA contraction, no reassociation
      for (int p = 0; p < Kp; ++p) {
        const uint32_t b = Bp[p * ldb + j];
        acc = acc + bf16_bits_to_float(a[2 * p + 1]) * bf16_bits_to_float(static_cast<uint16_t>(b >> 16));
        acc = acc + bf16_bits_to_float(a[2 * p]) * bf16_bits_to_float(static_cast<uint16_t>(b & 0xFFFF));
      }
      const float x = acc * alpha;
      C[i * ldc + j] = accumulate ? C[i * ldc + j] + x : x;
    }
  }
}

#if defined(BEACON_CPU_X86) && !defined(BEACON_OPS_EMULATE_BF16_DOT)
#define BEACON_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
// One 6 x 64 block of C in 24 zmm accumulators (as block_gemm.h's fp32 kernel): per pair step,
// four 16-column loads of Bp and, per row, one broadcast pair of A and four vdpbf16ps.
#define BEACON_ROW_DOT(i)                                                           \
  {                                                                                 \
    uint32_t w;                                                                     \
    std::memcpy(&w, a##i + 2 * p, 4);                                               \
    const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(w))); \
    c##i##0 = _mm512_dpbf16_ps(c##i##0, a, b0);                                     \
    c##i##1 = _mm512_dpbf16_ps(c##i##1, a, b1);                                     \
    c##i##2 = _mm512_dpbf16_ps(c##i##2, a, b2);                                     \
    c##i##3 = _mm512_dpbf16_ps(c##i##3, a, b3);                                     \
  }
BEACON_BF16_TARGET inline void micro_bf16_6x64(int Kp, float alpha, const uint16_t* A,
                                               int64_t lda, const uint32_t* Bp, int64_t ldb,
                                               bool accumulate, float* C, int64_t ldc, int mr,
                                               const __mmask16* m) {
  BEACON_6X64_ROW_POINTERS(uint16_t, A, lda)
  BEACON_6X64_ACCUMULATORS
  for (int64_t p = 0; p < Kp; ++p) {
    const uint32_t* bp = Bp + p * ldb;
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi32(m[0], bp));
    const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi32(m[1], bp + 16));
    const __m512bh b2 = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi32(m[2], bp + 32));
    const __m512bh b3 = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi32(m[3], bp + 48));
    BEACON_ROW_DOT(0) BEACON_ROW_DOT(1) BEACON_ROW_DOT(2)
    BEACON_ROW_DOT(3) BEACON_ROW_DOT(4) BEACON_ROW_DOT(5)
  }
  BEACON_6X64_STORE
}
#undef BEACON_ROW_DOT

BEACON_BF16_TARGET inline void gemm_bf16_pairs_avx512(int M, int N, int Kp, float alpha,
                                                      const uint16_t* A, int64_t lda,
                                                      const uint32_t* Bp, int64_t ldb,
                                                      bool accumulate, float* C, int64_t ldc) {
  constexpr int kMR = 6, kNR = 64;
  for (int j0 = 0; j0 < N; j0 += kNR) {
    const int nr = N - j0 < kNR ? N - j0 : kNR;
    __mmask16 masks[4];
    column_masks(nr, masks);
    for (int i0 = 0; i0 < M; i0 += kMR)
      micro_bf16_6x64(Kp, alpha, A + i0 * lda, lda, Bp + j0, ldb, accumulate, C + i0 * ldc + j0,
                      ldc, M - i0 < kMR ? M - i0 : kMR, masks);
  }
}
#undef BEACON_BF16_TARGET
#endif

// C [M x N] = alpha * A Bp (+ C when accumulate); A: M rows of 2 Kp bf16 (row stride lda
// elements), Bp: Kp rows of N pair words (row stride ldb), C row-major fp32.
inline void gemm_bf16_pairs(int M, int N, int Kp, float alpha, const uint16_t* A, int64_t lda,
                            const uint32_t* Bp, int64_t ldb, bool accumulate, float* C,
                            int64_t ldc) {
#if defined(BEACON_CPU_X86) && !defined(BEACON_OPS_EMULATE_BF16_DOT)
  gemm_bf16_pairs_avx512(M, N, Kp, alpha, A, lda, Bp, ldb, accumulate, C, ldc);
#else
  gemm_bf16_pairs_portable(M, N, Kp, alpha, A, lda, Bp, ldb, accumulate, C, ldc);
#endif
}

// Packs `count` rows of a bf16 matrix [rows x d] (row i at rows_at(i), d even) as pairs of its
// transpose: bp[p * ld + first + i] = the pair (2p, 2p + 1) of row i, i.e. B = M^T in the layout
// above (for Q^T, with M the query tile).
inline void pack_row_pairs_transposed(const uint16_t* row, int d, uint32_t* bp, int64_t ld) {
  for (int p = 0; p < d / 2; ++p) std::memcpy(bp + static_cast<int64_t>(p) * ld, row + 2 * p, 4);
}
}  // namespace beacon_cpu

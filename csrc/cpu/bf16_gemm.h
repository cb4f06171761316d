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
#define BEACON_ROW_STORE(i)                                                          \
  if (i < mr) {                                                                      \
    float* c = C + i * ldc;                                                          \
    const __m512 r[4] = {c##i##0, c##i##1, c##i##2, c##i##3};                        \
    for (int v = 0; v < 4; ++v) {                                                    \
      __m512 x = _mm512_mul_ps(r[v], va);                                            \
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m[v], c + 16 * v)); \
      _mm512_mask_storeu_ps(c + 16 * v, m[v], x);                                    \
    }                                                                                \
  }

BEACON_BF16_TARGET inline void micro_bf16_6x64(int Kp, float alpha, const uint16_t* A,
                                               int64_t lda, const uint32_t* Bp, int64_t ldb,
                                               bool accumulate, float* C, int64_t ldc, int mr,
                                               const __mmask16* m) {
  const uint16_t* a0 = A;
  const uint16_t* a1 = A + (mr > 1 ? 1 : mr - 1) * lda;
  const uint16_t* a2 = A + (mr > 2 ? 2 : mr - 1) * lda;
  const uint16_t* a3 = A + (mr > 3 ? 3 : mr - 1) * lda;
  const uint16_t* a4 = A + (mr > 4 ? 4 : mr - 1) * lda;
  const uint16_t* a5 = A + (mr > 5 ? 5 : mr - 1) * lda;
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00;
  __m512 c10 = c00, c11 = c00, c12 = c00, c13 = c00;
  __m512 c20 = c00, c21 = c00, c22 = c00, c23 = c00;
  __m512 c30 = c00, c31 = c00, c32 = c00, c33 = c00;
  __m512 c40 = c00, c41 = c00, c42 = c00, c43 = c00;
  __m512 c50 = c00, c51 = c00, c52 = c00, c53 = c00;
  for (int64_t p = 0; p < Kp; ++p) {
    const uint32_t* bp = Bp + p * ldb;
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi32(m[0], bp));
    const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi32(m[1], bp + 16));
    const __m512bh b2 = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi32(m[2], bp + 32));
    const __m512bh b3 = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi32(m[3], bp + 48));
    BEACON_ROW_DOT(0) BEACON_ROW_DOT(1) BEACON_ROW_DOT(2)
    BEACON_ROW_DOT(3) BEACON_ROW_DOT(4) BEACON_ROW_DOT(5)
  }
  const __m512 va = _mm512_set1_ps(alpha);
  BEACON_ROW_STORE(0) BEACON_ROW_STORE(1) BEACON_ROW_STORE(2)
  BEACON_ROW_STORE(3) BEACON_ROW_STORE(4) BEACON_ROW_STORE(5)
}
#undef BEACON_ROW_DOT
#undef BEACON_ROW_STORE

BEACON_BF16_TARGET inline void gemm_bf16_pairs_avx512(int M, int N, int Kp, float alpha,
                                                      const uint16_t* A, int64_t lda,
                                                      const uint32_t* Bp, int64_t ldb,
                                                      bool accumulate, float* C, int64_t ldc) {
  constexpr int kMR = 6, kNR = 64;
  for (int j0 = 0; j0 < N; j0 += kNR) {
    const int nr = N - j0 < kNR ? N - j0 : kNR;
    __mmask16 masks[4];
    for (int v = 0; v < 4; ++v) {
      const int cols = nr - 16 * v;
      masks[v] = cols >= 16 ? static_cast<__mmask16>(0xFFFF)
                            : static_cast<__mmask16>(cols <= 0 ? 0 : (1u << cols) - 1);
    }
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

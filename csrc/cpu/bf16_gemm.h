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

#include "cpu/amx_gemm.h"    // the tiles' part at level amx
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
// GCC 12 reports its own intrinsics' undefined-vector placeholders (__Y) as maybe uninitialised
// (as uninitialised in the sanitizer build).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// 16 x 16 fp32 transpose in registers: unpacks within lanes, then two
// rounds of 128-bit lane shuffles (row j of the result = column j of the input).
BEACON_BF16_TARGET inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {  // u[4i + k], lane L: column 4L + k of rows 4i .. 4i + 3
    const __m512 x0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88);
    const __m512 x1 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88);
    const __m512 y0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xDD);
    const __m512 y1 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xDD);
    r[k] = _mm512_shuffle_f32x4(x0, x1, 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(x0, x1, 0xDD);
    r[4 + k] = _mm512_shuffle_f32x4(y0, y1, 0x88);
    r[12 + k] = _mm512_shuffle_f32x4(y0, y1, 0xDD);
  }
}

BEACON_BF16_TARGET inline void pack_pair_rows_avx512(const uint16_t* v, int64_t ldv, int n, int d,
                                                     int n_pad, uint32_t* vp) {
  for (int p = 0; 2 * p < n_pad; ++p) {
    const uint16_t* lo = v + 2 * p * ldv;
    const uint16_t* hi = lo + ldv;
    const bool has_lo = 2 * p < n, has_hi = 2 * p + 1 < n;
    for (int j = 0; j < d; j += 16) {
      const __mmask16 m = d - j < 16 ? static_cast<__mmask16>((1u << (d - j)) - 1u) : 0xFFFF;
      const __m512i a = has_lo ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo + j))
                               : _mm512_setzero_si512();
      const __m512i b = has_hi ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi + j))
                               : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(vp + static_cast<int64_t>(p) * d + j, m,
                               _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
}

// pack_rows_pairs_transposed (below) 16 rows x 16 pairs at a time: each row's 16 pairs are one
// 64-byte load, a register transpose turns them into 16 pair rows of 16 words, one store each.
template <typename RowAt>
BEACON_BF16_TARGET inline void pack_rows_pairs_transposed_avx512(const RowAt& row_at, int rows, int d,
                                                                 uint32_t* bp, int64_t ld) {
  const int pairs = d / 2;
  for (int r0 = 0; r0 < rows; r0 += 16) {
    const int nr = rows - r0 < 16 ? rows - r0 : 16;
    const __mmask16 row_mask = static_cast<__mmask16>((1u << nr) - 1u);
    for (int p0 = 0; p0 < pairs; p0 += 16) {
      const int np = pairs - p0 < 16 ? pairs - p0 : 16;
      const __mmask16 pair_mask = static_cast<__mmask16>((1u << np) - 1u);
      __m512 x[16];
      for (int i = 0; i < 16; ++i)
        x[i] = i < nr ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(pair_mask, row_at(r0 + i) + 2 * p0))
                      : _mm512_setzero_ps();
      transpose16(x);
      for (int j = 0; j < np; ++j)
        _mm512_mask_storeu_epi32(bp + static_cast<int64_t>(p0 + j) * ld + r0, row_mask, _mm512_castps_si512(x[j]));
    }
  }
}
#pragma GCC diagnostic pop
#undef BEACON_BF16_TARGET
#endif

// Whether P V also runs on bf16 (P rounded): at level avx512bf16 and above (AMX tiles, else
// vdpbf16ps). Before, only with AMX (P V in fp32 below it): on Zen 4 (no AMX) a bf16 prefill
// step (W 1024 + 128 beacons over 3,072, 8 heads, d 128, one thread) took 145 ms, 0.56-0.58 of a
// bf16 matmul; with the pairs 91-102 ms, 0.87-0.89 (bench attention --quick --threads 1).
inline bool use_bf16_pv() {
#ifdef BEACON_OPS_EMULATE_BF16_DOT
  return true;
#else
  return beacon::cpu::cpu_has(beacon::cpu::Isa::kAvx512Bf16);
#endif
}

// V for the P V GEMM in pairs: vp [n_pad / 2 x d] (row stride d) holds, at (p, j), rows 2p and
// 2p + 1 of v [n x d] (row stride ldv, bf16) in column j; rows n .. n_pad - 1 are zero. n_pad even.
inline void pack_pair_rows(const uint16_t* v, int64_t ldv, int n, int d, int n_pad, uint32_t* vp) {
#if defined(BEACON_CPU_X86) && !defined(BEACON_OPS_EMULATE_BF16_DOT)
  pack_pair_rows_avx512(v, ldv, n, d, n_pad, vp);
#else
  for (int p = 0; 2 * p < n_pad; ++p)
    for (int j = 0; j < d; ++j) {
      const uint32_t lo = 2 * p < n ? v[2 * p * ldv + j] : 0;
      const uint32_t hi = 2 * p + 1 < n ? v[(2 * p + 1) * ldv + j] : 0;
      vp[static_cast<int64_t>(p) * d + j] = lo | (hi << 16);
    }
#endif
}

// C [M x N] = alpha * A Bp (+ C when accumulate); A: M rows of 2 Kp bf16 (row stride lda
// elements), Bp: Kp rows of N pair words (row stride ldb), C row-major fp32. At level amx, for
// alpha = 1, the part of C and of the pairs in whole 16s goes to the tiles (amx_gemm.h), the rest
// (C's last M % 16 rows and N % 16 columns, then the last Kp % 16 pairs, added) to vdpbf16ps.
inline void gemm_bf16_pairs(int M, int N, int Kp, float alpha, const uint16_t* A, int64_t lda,
                            const uint32_t* Bp, int64_t ldb, bool accumulate, float* C,
                            int64_t ldc) {
#if defined(BEACON_CPU_X86) && !defined(BEACON_OPS_EMULATE_BF16_DOT)
  const int M16 = M & ~15, N16 = N & ~15, K16 = Kp & ~15;
  if (alpha != 1.0f || M16 == 0 || N16 == 0 || K16 == 0 || !beacon::cpu::cpu_has(beacon::cpu::Isa::kAmx)) {
    gemm_bf16_pairs_avx512(M, N, Kp, alpha, A, lda, Bp, ldb, accumulate, C, ldc);
    return;
  }
  amx::gemm_bf16_pairs_tiles(M16, N16, K16, A, lda, Bp, ldb, accumulate, C, ldc);
  if (K16 < Kp)
    gemm_bf16_pairs_avx512(M16, N16, Kp - K16, alpha, A + 2 * K16, lda, Bp + K16 * ldb, ldb, true, C,
                           ldc);
  if (N16 < N)
    gemm_bf16_pairs_avx512(M16, N - N16, Kp, alpha, A, lda, Bp + N16, ldb, accumulate, C + N16, ldc);
  if (M16 < M)
    gemm_bf16_pairs_avx512(M - M16, N, Kp, alpha, A + M16 * lda, lda, Bp, ldb, accumulate,
                           C + M16 * ldc, ldc);
#else
  gemm_bf16_pairs_portable(M, N, Kp, alpha, A, lda, Bp, ldb, accumulate, C, ldc);
#endif
}

// Writes one row of a bf16 matrix M (d even) as a column of pairs of its transpose: bp[p * ld] =
// the pair (2p, 2p + 1) of the row. Called for row i at bp + i, B = M^T in the layout above (for
// Q^T, with M the query tile).
inline void pack_row_pairs_transposed(const uint16_t* row, int d, uint32_t* bp, int64_t ld) {
  for (int p = 0; p < d / 2; ++p) std::memcpy(bp + static_cast<int64_t>(p) * ld, row + 2 * p, 4);
}

// The same for `rows` rows, row r at row_at(r) (a const uint16_t*): bp [d / 2 x ld] gets B = M^T
// in pairs, bp[p * ld + r] = pair p of row r. (Row by row, a 4-byte store per pair and row with
// every row touching each of bp's lines in turn, this took 3-4% of a bf16 prefill step.)
template <typename RowAt>
inline void pack_rows_pairs_transposed(const RowAt& row_at, int rows, int d, uint32_t* bp, int64_t ld) {
#if defined(BEACON_CPU_X86) && !defined(BEACON_OPS_EMULATE_BF16_DOT)
  pack_rows_pairs_transposed_avx512(row_at, rows, d, bp, ld);
#else
  for (int r = 0; r < rows; ++r) pack_row_pairs_transposed(row_at(r), d, bp + r, ld);
#endif
}
}  // namespace beacon_cpu

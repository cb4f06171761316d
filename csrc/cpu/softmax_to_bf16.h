// The online-softmax update of one key block for the bf16 P V GEMM (level avx512bf16): the same
// bookkeeping as attention_blocks.h's softmax_update, but the probabilities go straight to P in
// bf16 rows [rows x n_pad] (the GEMM's A operand) instead of back over the transposed fp32
// scores, and the softmax scale is applied here (Q K^T left the scores unscaled, so its GEMM
// writes its tiles out as they are). One pass over the scores: 16 keys x 16 rows at a time, exp,
// row sums, a register transpose, the conversion to bf16 (round to nearest even) and the store.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "cpu/attention_blocks.h"
#include "cpu/bf16_gemm.h"
#include "cpu/block_prefetch.h"

namespace beacon_cpu {

#if defined(BEACON_CPU_X86) && !defined(BEACON_OPS_EMULATE_BF16_DOT)
#define BEACON_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
// The 16 x 16 bf16 transpose of P's group: y[k] holds keys 2k (elements 0-15) and 2k + 1 (16-31)
// of 16 rows; afterwards y[j] holds rows 2j (elements 0-15) and 2j + 1 (16-31) of the 16 keys.
// Three rounds swap one register-index bit (a key bit) with an element-index bit (a row bit):
// 16-bit, 64-bit and 128-bit moves, 24 shuffles in all where the fp32 transpose before the
// conversion took 64 (the exp pass's port-5 bottleneck, perf on the AMX Xeon).
BEACON_BF16_TARGET inline void transpose_bf16_16x16(__m512i (&y)[8]) {
  alignas(64) static const uint16_t kWords[2][32] = {
      {0, 16, 32, 48, 4, 20, 36, 52, 8, 24, 40, 56, 12, 28, 44, 60,
       1, 17, 33, 49, 5, 21, 37, 53, 9, 25, 41, 57, 13, 29, 45, 61},
      {2, 18, 34, 50, 6, 22, 38, 54, 10, 26, 42, 58, 14, 30, 46, 62,
       3, 19, 35, 51, 7, 23, 39, 55, 11, 27, 43, 59, 15, 31, 47, 63}};
  const __m512i w0 = _mm512_load_si512(kWords[0]), w1 = _mm512_load_si512(kWords[1]);
  for (int a = 0; a < 8; a += 2) {  // key bit 1 <-> row bit 1
    const __m512i lo = _mm512_permutex2var_epi16(y[a], w0, y[a + 1]);
    y[a + 1] = _mm512_permutex2var_epi16(y[a], w1, y[a + 1]);
    y[a] = lo;
  }
  for (int a : {0, 1, 4, 5}) {  // key bit 2 <-> row bit 2, in 64-bit groups
    const __m512i lo = _mm512_unpacklo_epi64(y[a], y[a + 2]);
    y[a + 2] = _mm512_unpackhi_epi64(y[a], y[a + 2]);
    y[a] = lo;
  }
  const __m512i q0 = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i q1 = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  for (int a = 0; a < 4; ++a) {  // key bit 3 <-> row bit 3, in 128-bit groups
    const __m512i lo = _mm512_permutex2var_epi64(y[a], q0, y[a + 4]);
    y[a + 4] = _mm512_permutex2var_epi64(y[a], q1, y[a + 4]);
    y[a] = lo;
  }
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // as in bf16_gemm.h
// The exp pass. kLazy: m_use are the rows' running maxima as they stood before the block; the
// pass stops and returns false as soon as a 16-row strip has a score more than kLazyMaxLog2 above
// its row's maximum (in log2 units), leaving P and sums partly written. Otherwise true.
template <bool kLazy>
BEACON_BF16_TARGET inline bool exp_to_bf16_rows_avx512(const float* st, int n, int rows, float scale,
                                                       const float* m_use, float* sums, int n_pad,
                                                       uint16_t* p, BlockPrefetch* pf) {
  constexpr float kLog2e = 1.44269504088896341f;
  const __m512 sc = _mm512_set1_ps(scale * kLog2e);
  if (pf) pf->spread_over(((rows + 15) / 16) * (n_pad / 16));
  for (int r0 = 0; r0 < rows; r0 += 16) {
    const int nr = rows - r0 < 16 ? rows - r0 : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << nr) - 1u);
    const __m512 mu = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, m_use + r0), _mm512_set1_ps(kLog2e));
    __m512 sum = _mm512_maskz_loadu_ps(m, sums + r0);
    __m512 t_max = _mm512_setzero_ps();  // kLazy: the strip's largest exponent (lanes past nr: 0)
    for (int c0 = 0; c0 < n_pad; c0 += 16) {
      __m512 x[16];
      if (c0 + 16 <= n) {
        // Whole groups fully unrolled, so that x stays in registers (the loop with the bound
        // check below kept it on the stack: a store and a reload per vector).
        __m512 sum1 = _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          const __m512 s = _mm512_maskz_loadu_ps(m, st + static_cast<int64_t>(c0 + i) * rows + r0);
          const __m512 t = _mm512_fmsub_ps(s, sc, mu);
          if constexpr (kLazy) t_max = _mm512_max_ps(t_max, t);
          x[i] = beacon::cpu::attn::fast_exp2_16<3>(t);
          if (i % 2) sum1 = _mm512_add_ps(sum1, x[i]); else sum = _mm512_add_ps(sum, x[i]);
        }
        sum = _mm512_add_ps(sum, sum1);
      } else {
        for (int i = 0; i < 16; ++i) {
          if (c0 + i >= n) {
            x[i] = _mm512_setzero_ps();
            continue;
          }
          const __m512 s = _mm512_maskz_loadu_ps(m, st + static_cast<int64_t>(c0 + i) * rows + r0);
          const __m512 t = _mm512_fmsub_ps(s, sc, mu);
          if constexpr (kLazy) t_max = _mm512_max_ps(t_max, t);
          x[i] = beacon::cpu::attn::fast_exp2_16<3>(t);
          sum = _mm512_add_ps(sum, x[i]);
        }
      }
      if (pf) pf->step();
      __m512i y[8];
      for (int k = 0; k < 8; ++k)  // round to nearest even, as _mm512_cvtneps_pbh
        y[k] = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x[2 * k + 1], x[2 * k]));
      transpose_bf16_16x16(y);
      // Row 2j from elements 0-15, row 2j + 1 from 16-31 (a masked store from 16 before it).
      for (int j = 0; 2 * j < nr; ++j) {
        uint16_t* row = p + static_cast<int64_t>(r0 + 2 * j) * n_pad + c0;
        _mm512_mask_storeu_epi16(row, 0x0000FFFFu, y[j]);
        if (2 * j + 1 < nr) _mm512_mask_storeu_epi16(row + n_pad - 16, 0xFFFF0000u, y[j]);
      }
    }
    if constexpr (kLazy) {
      if (_mm512_cmp_ps_mask(t_max, _mm512_set1_ps(beacon::cpu::attn::kLazyMaxLog2), _CMP_GT_OQ)) return false;
    }
    _mm512_mask_storeu_ps(sums + r0, m, sum);
  }
  return true;
}
#pragma GCC diagnostic pop

// The whole update compiled for AVX-512 (the shared bookkeeping loops inline here vectorised).
// Lazy running maxima (the conditional rescaling of FlashAttention-4): once every row has seen a
// key, the block is first exponentiated against the maxima as they stand, which skips the max
// pass over the scores, the correction factors and the caller's rescaling of its accumulator
// (~9% of a bf16 prefill step, perf). P then reaches at most 2^kLazyMaxLog2 (bf16 and fp32
// carry it with the same relative rounding); a block that goes higher in some row is redone
// with its new maxima. Where no score passes its row's maximum, both ways compute the same bits.
BEACON_BF16_TARGET inline bool softmax_to_bf16_rows_avx512(float* st, int n, int rows, float scale,
                                                           float* row_max, float* row_sum, float* corr,
                                                           float* m_blk, float* m_use, int n_pad,
                                                           uint16_t* p, BlockPrefetch* pf) {
  using namespace beacon::cpu::attn;
  bool lazy = true;
  for (int r = 0; r < rows; ++r) lazy &= row_max[r] != kNegInf;
  if (lazy) {
    for (int r = 0; r < rows; ++r) m_blk[r] = 0.0f;  // the block's sums
    if (exp_to_bf16_rows_avx512<true>(st, n, rows, scale, row_max, m_blk, n_pad, p, pf)) {
      for (int r = 0; r < rows; ++r) row_sum[r] += m_blk[r];
      return false;
    }
  }
  for (int r = 0; r < rows; ++r) m_blk[r] = kNegInf;
  softmax_max(st, 0, n, rows, m_blk);
  for (int r = 0; r < rows; ++r) m_blk[r] *= scale;
  softmax_rescale(rows, row_max, corr, m_blk, m_use);  // m_blk: zeros, the block's sums
  exp_to_bf16_rows_avx512<false>(st, n, rows, scale, m_use, m_blk, n_pad, p, pf);
  softmax_end(rows, row_sum, corr, m_blk);
  return true;
}
#undef BEACON_BF16_TARGET
#endif

// The update for key block st [n x rows] (transposed, unscaled scores; masked ones -inf): row
// maxima, running max / sum and corr as softmax_update (scale > 0, so the scaled maximum is the
// maximum scaled), and p [rows x n_pad] = bf16(exp(scale * s - max)), zero past key n. n_pad:
// a multiple of 16. m_blk, m_use: scratch of `rows` floats. pf: rows to prefetch meanwhile, or null.
// Returns whether corr was set; false: every factor is 1 (the running maxima stayed; the
// accumulator needs no rescaling).
inline bool softmax_to_bf16_rows(float* st, int n, int rows, float scale, float* row_max,
                                 float* row_sum, float* corr, float* m_blk, float* m_use, int n_pad,
                                 uint16_t* p, BlockPrefetch* pf = nullptr) {
#if defined(BEACON_CPU_X86) && !defined(BEACON_OPS_EMULATE_BF16_DOT)
  return softmax_to_bf16_rows_avx512(st, n, rows, scale, row_max, row_sum, corr, m_blk, m_use, n_pad, p, pf);
#else
  using namespace beacon::cpu::attn;
  const int64_t total = static_cast<int64_t>(n) * rows;
  for (int64_t i = 0; i < total; ++i) st[i] *= scale;
  softmax_update(st, n, rows, row_max, row_sum, corr, m_blk, m_use, pf);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < n_pad; ++c)
      p[static_cast<int64_t>(r) * n_pad + c] =
          c < n ? c10::BFloat16(st[static_cast<int64_t>(c) * rows + r]).x : uint16_t{0};
  return true;
#endif
}

}  // namespace beacon_cpu

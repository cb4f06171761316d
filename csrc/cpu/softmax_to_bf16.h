// The online-softmax update of one key block for the bf16 P V GEMM (AMX level): the same
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
// 2^t on 16 lanes: t = n + f with n = round(t) and |f| <= 1/2, 2^f by a degree-5 polynomial
// (relative error 8e-8 on [-1/2, 1/2], fitted at Chebyshev nodes), times 2^n by vscalefps, which
// also takes care of the exponent's range. About half the instructions of exp by the exponent's
// bit arithmetic (a range reduction by ln 2 in two parts, a degree-7 polynomial, clamps). The
// callers fold log2(e) into the scale and the row maxima. t < -125.9 (e^-87.3; masked -inf
// scores included) gives exactly 0; NaN stays NaN.
BEACON_BF16_TARGET inline __m512 fast_exp2_16(__m512 t) {
  const __m512 lo = _mm512_set1_ps(-125.9f);
  const __m512 tc = _mm512_max_ps(lo, t);  // t second: a NaN passes through
  const __m512 n = _mm512_roundscale_ps(tc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(tc, n);
  __m512 p = _mm512_set1_ps(1.3266970386e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6754597455e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507426160e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022121754e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314694916e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000710e+0f));
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(t, lo, _CMP_NLT_UQ), p, n);
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // as in bf16_gemm.h
BEACON_BF16_TARGET inline void exp_to_bf16_rows_avx512(const float* st, int n, int rows, float scale,
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
    for (int c0 = 0; c0 < n_pad; c0 += 16) {
      __m512 x[16];
      if (c0 + 16 <= n) {
        // Whole groups fully unrolled, so that x stays in registers (the loop with the bound
        // check below kept it on the stack: a store and a reload per vector).
        __m512 sum1 = _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          const __m512 s = _mm512_maskz_loadu_ps(m, st + static_cast<int64_t>(c0 + i) * rows + r0);
          x[i] = fast_exp2_16(_mm512_fmsub_ps(s, sc, mu));
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
          x[i] = fast_exp2_16(_mm512_fmsub_ps(s, sc, mu));
          sum = _mm512_add_ps(sum, x[i]);
        }
      }
      if (pf) pf->step();
      transpose16(x);
      for (int j = 0; j < nr; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + static_cast<int64_t>(r0 + j) * n_pad + c0),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x[j])));
    }
    _mm512_mask_storeu_ps(sums + r0, m, sum);
  }
}
#pragma GCC diagnostic pop

// The whole update compiled for AVX-512 (the shared bookkeeping loops inline here vectorised).
BEACON_BF16_TARGET inline void softmax_to_bf16_rows_avx512(float* st, int n, int rows, float scale,
                                                           float* row_max, float* row_sum, float* corr,
                                                           float* m_blk, float* m_use, int n_pad,
                                                           uint16_t* p, BlockPrefetch* pf) {
  using namespace beacon::cpu::attn;
  for (int r = 0; r < rows; ++r) m_blk[r] = kNegInf;
  softmax_max(st, 0, n, rows, m_blk);
  for (int r = 0; r < rows; ++r) m_blk[r] *= scale;
  softmax_rescale(rows, row_max, corr, m_blk, m_use);  // m_blk: zeros, the block's sums
  exp_to_bf16_rows_avx512(st, n, rows, scale, m_use, m_blk, n_pad, p, pf);
  softmax_end(rows, row_sum, corr, m_blk);
}
#undef BEACON_BF16_TARGET
#endif

// The update for key block st [n x rows] (transposed, unscaled scores; masked ones -inf): row
// maxima, running max / sum and corr as softmax_update (scale > 0, so the scaled maximum is the
// maximum scaled), and p [rows x n_pad] = bf16(exp(scale * s - max)), zero past key n. n_pad:
// a multiple of 16. m_blk, m_use: scratch of `rows` floats. pf: rows to prefetch meanwhile, or null.
inline void softmax_to_bf16_rows(float* st, int n, int rows, float scale, float* row_max,
                                 float* row_sum, float* corr, float* m_blk, float* m_use, int n_pad,
                                 uint16_t* p, BlockPrefetch* pf = nullptr) {
#if defined(BEACON_CPU_X86) && !defined(BEACON_OPS_EMULATE_BF16_DOT)
  softmax_to_bf16_rows_avx512(st, n, rows, scale, row_max, row_sum, corr, m_blk, m_use, n_pad, p, pf);
#else
  using namespace beacon::cpu::attn;
  const int64_t total = static_cast<int64_t>(n) * rows;
  for (int64_t i = 0; i < total; ++i) st[i] *= scale;
  softmax_update(st, n, rows, row_max, row_sum, corr, m_blk, m_use, pf);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < n_pad; ++c)
      p[static_cast<int64_t>(r) * n_pad + c] =
          c < n ? c10::BFloat16(st[static_cast<int64_t>(c) * rows + r]).x : uint16_t{0};
#endif
}

}  // namespace beacon_cpu

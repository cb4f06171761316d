// The backward's elementwise step for its bf16 tile products (attention_bwd.cpp, bf16 operands):
// from the fp32 scores s and dP of a tile, P = exp(scale s - lse) and scale * dS = scale * P (dP - D),
// both rounded to bf16 (round to nearest even, as c10::BFloat16) into the layout the next GEMM
// reads as its A operand. dS is computed from the unrounded P, and carries the softmax scale
// so that the dK and dQ products run with alpha = 1 (the AMX tiles take only that).
// Two layouts:
//   - columns: a transposed tile [keys x n] (pass 1, dK and dV: P^T and dS^T are the A operands
//     with pairs along the query rows), lse and D per column;
//   - rows: a tile [rows x keys] (pass 2, dQ: dS with pairs along the keys), lse and D per row,
//     the keys padded with zeros to an even count.
// The path runs only on CPUs with AVX-512-BF16 (or in builds that emulate it, which take the
// portable loops here); lse = +inf gives P = 0 and dS = 0.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "cpu/attention_blocks.h"

namespace beacon::cpu::attn {

// Portable loops (builds that emulate the bf16 dot products, other CPUs).
inline void probs_to_bf16_cols_portable(const float* s, const float* dp, int keys, int n, float scale,
                                        const float* lse, const float* delta, uint16_t* p_t, uint16_t* ds_t) {
  for (int c = 0; c < keys; ++c) {
    const int64_t o = static_cast<int64_t>(c) * n;
    for (int r = 0; r < n; ++r) {
      const float prob = fast_exp(scale * s[o + r] - lse[r]);
      p_t[o + r] = c10::BFloat16(prob).x;
      ds_t[o + r] = c10::BFloat16(scale * prob * (dp[o + r] - delta[r])).x;
    }
  }
}

inline void dscores_to_bf16_row_portable(const float* s, const float* dp, int keys, int keys_pad, float scale,
                                         float lse, float delta, uint16_t* ds) {
  for (int c = 0; c < keys; ++c)
    ds[c] = c10::BFloat16(scale * fast_exp(scale * s[c] - lse) * (dp[c] - delta)).x;
  for (int c = keys; c < keys_pad; ++c) ds[c] = 0;
}

#if defined(BEACON_CPU_X86) && !defined(BEACON_OPS_EMULATE_BF16_DOT)
// AVX-512-BF16 (the path runs only where the CPU has it): exp as 2^(s scale log2 e - lse log2 e)
// by fast_exp2_16 (0 for lse = +inf), vcvtneps2bf16 for the rounding, 16 lanes at a time.
#define BEACON_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // intrinsics' placeholders (GCC 12), as in bf16_gemm.h
BEACON_BF16_TARGET inline void probs_to_bf16_cols_avx512(const float* s, const float* dp, int keys, int n,
                                                         float scale, const float* lse, const float* delta,
                                                         uint16_t* p_t, uint16_t* ds_t) {
  constexpr float kLog2e = 1.44269504088896341f;
  const __m512 sc2 = _mm512_set1_ps(scale * kLog2e), sc = _mm512_set1_ps(scale), l2e = _mm512_set1_ps(kLog2e);
  for (int r0 = 0; r0 < n; r0 += 16) {
    const __mmask16 m = n - r0 < 16 ? static_cast<__mmask16>((1u << (n - r0)) - 1u) : 0xFFFF;
    const __m512 mu = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, lse + r0), l2e);
    const __m512 dl = _mm512_maskz_loadu_ps(m, delta + r0);
    for (int c = 0; c < keys; ++c) {
      const int64_t o = static_cast<int64_t>(c) * n + r0;
      const __m512 prob = fast_exp2_16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s + o), sc2, mu));
      const __m512 diff = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp + o), dl);
      const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(prob, sc), diff);
      _mm256_mask_storeu_epi16(p_t + o, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(prob)));
      _mm256_mask_storeu_epi16(ds_t + o, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(ds)));
    }
  }
}

BEACON_BF16_TARGET inline void dscores_to_bf16_row_avx512(const float* s, const float* dp, int keys, int keys_pad,
                                                          float scale, float lse, float delta, uint16_t* ds) {
  constexpr float kLog2e = 1.44269504088896341f;
  const __m512 sc2 = _mm512_set1_ps(scale * kLog2e), sc = _mm512_set1_ps(scale);
  const __m512 mu = _mm512_set1_ps(lse * kLog2e), dl = _mm512_set1_ps(delta);
  for (int c0 = 0; c0 < keys_pad; c0 += 16) {
    const __mmask16 m = keys - c0 < 16 ? static_cast<__mmask16>((1u << (keys - c0)) - 1u) : 0xFFFF;
    const __mmask16 w = keys_pad - c0 < 16 ? static_cast<__mmask16>((1u << (keys_pad - c0)) - 1u) : 0xFFFF;
    const __m512 prob = fast_exp2_16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s + c0), sc2, mu));
    // lanes past `keys` (the pad) are zero: prob of a zero-masked load is not, so mask the result
    const __m512 diff = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp + c0), dl);
    const __m512 d = _mm512_maskz_mul_ps(m, _mm512_mul_ps(prob, sc), diff);
    _mm256_mask_storeu_epi16(ds + c0, w, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(d)));
  }
}
#pragma GCC diagnostic pop
#undef BEACON_BF16_TARGET
#endif

// P^T and scale * dS^T of a transposed tile: s, dp [keys x n] (row stride n), lse and D per column.
inline void probs_to_bf16_cols(const float* s, const float* dp, int keys, int n, float scale, const float* lse,
                               const float* delta, uint16_t* p_t, uint16_t* ds_t) {
#if defined(BEACON_CPU_X86) && !defined(BEACON_OPS_EMULATE_BF16_DOT)
  probs_to_bf16_cols_avx512(s, dp, keys, n, scale, lse, delta, p_t, ds_t);
#else
  probs_to_bf16_cols_portable(s, dp, keys, n, scale, lse, delta, p_t, ds_t);
#endif
}

// scale * dS of one row of `keys` keys into ds [keys_pad] (the pad zeroed); lse finite.
inline void dscores_to_bf16_row(const float* s, const float* dp, int keys, int keys_pad, float scale, float lse,
                                float delta, uint16_t* ds) {
#if defined(BEACON_CPU_X86) && !defined(BEACON_OPS_EMULATE_BF16_DOT)
  dscores_to_bf16_row_avx512(s, dp, keys, keys_pad, scale, lse, delta, ds);
#else
  dscores_to_bf16_row_portable(s, dp, keys, keys_pad, scale, lse, delta, ds);
#endif
}

}  // namespace beacon::cpu::attn

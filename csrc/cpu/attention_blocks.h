// Per-block arithmetic of the CPU attention forward (attention.cpp drives it): the online-softmax
// bookkeeping, widening of 16-bit blocks to fp32, and the few-row (decode) products that read the
// cache in place. Each loop is compiled for AVX-512F, AVX2 and the baseline, and the variant is
// chosen at run time by cpu_isa() (cpu_isa.h), so BEACON_OPS_CPU_ISA caps it like every other
// CPU kernel.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/block_prefetch.h"
#include "cpu/cpu_isa.h"

namespace beacon::cpu::attn {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// `name(params)` runs `name##_body(args)` compiled for the level cpu_isa() picks. The bodies are
// always_inline so that each variant compiles them (and what they inline) for its own target.
#define BEACON_ALWAYS_INLINE inline __attribute__((always_inline))
#ifdef BEACON_CPU_X86
// BEACON_ISA_VARIANTS_OWN_AVX2: the same with `name##_avx2` written by hand before it (where GCC
// leaves the body's loop scalar for AVX2).
#define BEACON_ISA_VARIANTS(name, params, args)                                               \
  __attribute__((target("avx2"))) inline void name##_avx2 params { name##_body args; }        \
  BEACON_ISA_VARIANTS_OWN_AVX2(name, params, args)
#define BEACON_ISA_VARIANTS_OWN_AVX2(name, params, args)                                      \
  __attribute__((target("avx512f"))) inline void name##_avx512 params { name##_body args; }   \
  inline void name##_portable params { name##_body args; }                                    \
  inline void name params {                                                                   \
    switch (cpu_isa()) {                                                                      \
      case Isa::kPortable: name##_portable args; return;                                      \
      case Isa::kAvx2: name##_avx2 args; return;                                              \
      default: name##_avx512 args; return;                                                    \
    }                                                                                         \
  }
#else
#define BEACON_ISA_VARIANTS(name, params, args) \
  inline void name params { name##_body args; }
#define BEACON_ISA_VARIANTS_OWN_AVX2(name, params, args) BEACON_ISA_VARIANTS(name, params, args)
#endif

// exp(x) for x <= 88, 0 below -87.3 (so masked -inf scores give exactly 0). Cephes' expf
// polynomial (about 1 ulp), written branch-free so the loops around it vectorise.
BEACON_ALWAYS_INLINE float fast_exp(float x) {
  // Ternaries, not std::fmin/fmax: those become libm calls that block vectorisation.
  const float xl = x < -87.3f ? -87.3f : x;
  const float xc = xl > 88.3f ? 88.3f : xl;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  int32_t ti;
  std::memcpy(&ti, &t, 4);
  const int32_t ni = ti - 0x4B400000;  // the integer n (bits of t minus bits of the shifter)
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t scale_bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  return x < -87.3f ? 0.0f : y * scale;
}

// The pieces of the update: the block's row maxima and the correction factors (m_blk then holds
// zeros for the block's sums), the exp pass over rows [r0, rows), and the new row sums.
// Keys [c0, n) into the row maxima m_blk.
BEACON_ALWAYS_INLINE void softmax_max(const float* st, int c0, int n, int rows, float* m_blk) {
  for (int c = c0; c < n; ++c) {
    const float* s = st + static_cast<int64_t>(c) * rows;
#pragma omp simd
    for (int r = 0; r < rows; ++r) m_blk[r] = s[r] > m_blk[r] ? s[r] : m_blk[r];
  }
}
// Given the block's row maxima in m_blk: the new running maxima, m_use and corr.
BEACON_ALWAYS_INLINE void softmax_rescale(int rows, float* row_max, float* corr, float* m_blk,
                                          float* m_use) {
  for (int r = 0; r < rows; ++r) {
    const float m_old = row_max[r];
    const float m_new = m_blk[r] > m_old ? m_blk[r] : m_old;
    // A row that has seen nothing yet keeps max -inf; exp(-inf - 0) = 0 gives it zero weights.
    m_use[r] = m_new == kNegInf ? 0.0f : m_new;
    corr[r] = m_new == kNegInf ? 1.0f : (m_old == kNegInf ? 0.0f : std::exp(m_old - m_new));
    row_max[r] = m_new;
    m_blk[r] = 0.0f;  // now the block's sum
  }
}
BEACON_ALWAYS_INLINE void softmax_begin(const float* st, int n, int rows, float* row_max,
                                        float* corr, float* m_blk, float* m_use) {
  for (int r = 0; r < rows; ++r) m_blk[r] = kNegInf;
  softmax_max(st, 0, n, rows, m_blk);
  softmax_rescale(rows, row_max, corr, m_blk, m_use);
}
BEACON_ALWAYS_INLINE void softmax_exp(float* st, int n, int rows, int r0, float* m_blk,
                                      const float* m_use, beacon_cpu::BlockPrefetch* pf = nullptr) {
  if (pf) pf->spread_over(n);
  for (int c = 0; c < n; ++c) {
    if (pf) pf->step();
    float* s = st + static_cast<int64_t>(c) * rows;
#pragma omp simd
    for (int r = r0; r < rows; ++r) {
      const float p = fast_exp(s[r] - m_use[r]);
      s[r] = p;
      m_blk[r] += p;
    }
  }
}
BEACON_ALWAYS_INLINE void softmax_end(int rows, float* row_sum, const float* corr,
                                      const float* m_blk) {
  for (int r = 0; r < rows; ++r) row_sum[r] = row_sum[r] * corr[r] + m_blk[r];
}

// Online-softmax update of one key block. Scores are stored transposed, st[c * rows + r] (key c,
// row r), so every step vectorises across rows. Turns the scores (already scaled) into
// probabilities relative to each row's new running max and returns in corr[r] the factor for the
// row's previous accumulator. m_blk, m_use: scratch of `rows` floats.
// pf: the next block's rows to prefetch during the exp pass (block_prefetch.h), or null.
BEACON_ALWAYS_INLINE void softmax_update_body(float* st, int n, int rows, float* row_max,
                                              float* row_sum, float* corr, float* m_blk,
                                              float* m_use, beacon_cpu::BlockPrefetch* pf = nullptr) {
  softmax_begin(st, n, rows, row_max, corr, m_blk, m_use);
  softmax_exp(st, n, rows, 0, m_blk, m_use, pf);
  softmax_end(rows, row_sum, corr, m_blk);
}

#ifdef BEACON_CPU_X86
// fast_exp on 8 lanes with the same operations in the same order (no FMA contraction), so lane
// results equal the scalar ones bit for bit. GCC leaves the scalar loop unvectorised for AVX2
// (its ternaries stay branches), which made the softmax cost as much as the two GEMMs.
__attribute__((target("avx2"))) inline __m256 fast_exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  // Operand order as the scalar ternaries for NaN (max/min return their second operand then).
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(lo, x));
  const __m256 shifter = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_add_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)), shifter);
  const __m256 n = _mm256_sub_ps(t, shifter);
  const __m256i ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000));
  __m256 r = _mm256_sub_ps(xc, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  r = _mm256_add_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(2.12194440e-4f)));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(
      _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), _mm256_set1_ps(1.0f));
  const __m256 scale =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
  // x < -87.3 (masked -inf scores included) gives exactly 0.
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), _mm256_mul_ps(y, scale));
}

// softmax_update_body with the exp pass written for AVX2 (the other passes vectorise as is).
__attribute__((target("avx2"))) inline void softmax_update_avx2(
    float* st, int n, int rows, float* row_max, float* row_sum, float* corr, float* m_blk,
    float* m_use, beacon_cpu::BlockPrefetch* pf) {
  if (rows < 8) {
    // Few rows (decode): the scores are one run of n * rows floats, key c's at [c * rows, (c + 1)
    // * rows). The maxima and the sums keep lanes [0, rows) of one register and take a whole
    // vector at c * rows while 8 floats remain. (The portable loops carried them through memory,
    // a store-to-load chain per key: most of the softmax's time, 8-22% of a bf16 decode step.)
    // The sums stay in the row-wise order of the portable code, so results are equal bit for bit.
    const int64_t total = static_cast<int64_t>(n) * rows;
    const int c_vec = total >= 8 ? static_cast<int>((total - 8) / rows) + 1 : 0;  // c * rows + 8 <= total
    alignas(32) float lanes[8];
    __m256 mx = _mm256_set1_ps(kNegInf);
    // max_ps(s, m) is s > m ? s : m, NaN and signed zeros included, as the portable loop.
    for (int c = 0; c < c_vec; ++c) mx = _mm256_max_ps(_mm256_loadu_ps(st + static_cast<int64_t>(c) * rows), mx);
    _mm256_store_ps(lanes, mx);
    for (int r = 0; r < rows; ++r) m_blk[r] = lanes[r];
    softmax_max(st, c_vec, n, rows, m_blk);
    softmax_rescale(rows, row_max, corr, m_blk, m_use);
    // The exp pass takes 8 scores at a time: lane j of the vector at flat index i needs
    // m_use[(i + j) % rows]; m_pat holds that pattern for every i % (8 * rows).
    alignas(32) float m_pat[8 * 8 + 8];
    const int period = 8 * rows;
    for (int j = 0; j < period + 8; ++j) m_pat[j] = m_use[j % rows];
    int64_t i = 0;
    for (int off = 0; i + 8 <= total; i += 8, off = off + 8 == period ? 0 : off + 8)
      _mm256_storeu_ps(st + i, fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(st + i),
                                                       _mm256_loadu_ps(m_pat + off))));
    for (; i < total; ++i) st[i] = fast_exp(st[i] - m_use[i % rows]);
    __m256 sum = _mm256_setzero_ps();
    for (int c = 0; c < c_vec; ++c) sum = _mm256_add_ps(sum, _mm256_loadu_ps(st + static_cast<int64_t>(c) * rows));
    _mm256_store_ps(lanes, sum);
    for (int r = 0; r < rows; ++r) m_blk[r] = lanes[r];
    for (int c = c_vec; c < n; ++c)
      for (int r = 0; r < rows; ++r) m_blk[r] += st[static_cast<int64_t>(c) * rows + r];
    softmax_end(rows, row_sum, corr, m_blk);
    return;
  }
  softmax_begin(st, n, rows, row_max, corr, m_blk, m_use);
  const int r8 = rows - rows % 8;
  if (pf) pf->spread_over(n);
  for (int c = 0; c < n; ++c) {
    if (pf) pf->step();
    float* s = st + static_cast<int64_t>(c) * rows;
    for (int r = 0; r < r8; r += 8) {
      const __m256 p = fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + r), _mm256_loadu_ps(m_use + r)));
      _mm256_storeu_ps(s + r, p);
      _mm256_storeu_ps(m_blk + r, _mm256_add_ps(_mm256_loadu_ps(m_blk + r), p));
    }
  }
  softmax_exp(st, n, rows, r8, m_blk, m_use);  // the last rows % 8 rows
  softmax_end(rows, row_sum, corr, m_blk);
}

// 2^t on 16 lanes: t = n + f with n = round(t) and |f| <= 1/2, 2^f by a degree-5 polynomial
// (relative error 8e-8 on [-1/2, 1/2], fitted at Chebyshev nodes), times 2^n by vscalefps, which
// also takes care of the exponent's range. About half the instructions of exp by the exponent's
// bit arithmetic (a range reduction by ln 2 in two parts, a degree-7 polynomial, clamps). The
// callers fold log2(e) into the scale and the row maxima. t < -125.9 (e^-87.3; masked -inf
// scores included) gives exactly 0; NaN stays NaN. kDegree 3: relative error 8e-5, for P that is
// rounded to bf16 (relative step 2^-8) right after: two FMAs fewer.
template <int kDegree = 5>
__attribute__((target("avx512f"))) inline __m512 fast_exp2_16(__m512 t) {
  static_assert(kDegree == 5 || kDegree == 3);
  // No clamp of t: lanes below lo (-inf too, where f is NaN) are zeroed by the mask below.
  const __m512 lo = _mm512_set1_ps(-125.9f);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p;
  if constexpr (kDegree == 5) {
    p = _mm512_set1_ps(1.3266970386e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6754597455e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507426160e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022121754e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314694916e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000710e+0f));
  } else {
    p = _mm512_set1_ps(5.5088684e-2f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4260405e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9327620e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9992895e-1f));
  }
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(t, lo, _CMP_NLT_UQ), p, n);
}

// softmax_update_body with the exp pass as 2^(s log2(e) - m log2(e)) by fast_exp2_16: FMAs and
// vscalefps instead of the portable exp's bit arithmetic, which GCC vectorised to ~2x the
// instructions (the pass was ~11% of an fp32 prefill step, perf, AMX Xeon).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // masked loads (GCC 12), as in bf16_gemm.h
__attribute__((target("avx512f"))) inline void softmax_update_avx512(
    float* st, int n, int rows, float* row_max, float* row_sum, float* corr, float* m_blk,
    float* m_use, beacon_cpu::BlockPrefetch* pf) {
  constexpr float kLog2e = 1.44269504088896341f;
  softmax_begin(st, n, rows, row_max, corr, m_blk, m_use);
  if (pf) pf->spread_over(n * ((rows + 15) / 16));
  const __m512 l2e = _mm512_set1_ps(kLog2e);
  for (int r0 = 0; r0 < rows; r0 += 16) {
    const int nr = rows - r0 < 16 ? rows - r0 : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << nr) - 1u);
    const __m512 mu = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, m_use + r0), l2e);
    __m512 sum0 = _mm512_maskz_loadu_ps(m, m_blk + r0), sum1 = _mm512_setzero_ps();
    int c = 0;
    for (; c + 2 <= n; c += 2) {  // two keys a step: two independent sums
      if (pf) {
        pf->step();
        pf->step();
      }
      float* s0 = st + static_cast<int64_t>(c) * rows + r0;
      float* s1 = s0 + rows;
      const __m512 p0 = fast_exp2_16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s0), l2e, mu));
      const __m512 p1 = fast_exp2_16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s1), l2e, mu));
      _mm512_mask_storeu_ps(s0, m, p0);
      _mm512_mask_storeu_ps(s1, m, p1);
      sum0 = _mm512_add_ps(sum0, p0);
      sum1 = _mm512_add_ps(sum1, p1);
    }
    if (c < n) {
      if (pf) pf->step();
      float* s0 = st + static_cast<int64_t>(c) * rows + r0;
      const __m512 p0 = fast_exp2_16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s0), l2e, mu));
      _mm512_mask_storeu_ps(s0, m, p0);
      sum0 = _mm512_add_ps(sum0, p0);
    }
    _mm512_mask_storeu_ps(m_blk + r0, m, _mm512_add_ps(sum0, sum1));
  }
  softmax_end(rows, row_sum, corr, m_blk);
}

// Lazy running maxima (as softmax_to_bf16.h's bf16 update, FlashAttention-4's conditional
// rescaling), once every row has seen a key: each 16-row strip is exponentiated against the
// maxima as they stand, 16 keys at a time, a group stored only when no exponent in it passes
// kLazyMaxLog2 (P then stays below 2^8). A group that passes it stops the strip's lazy pass: the
// keys from there still hold scores, so the strip's new maxima come from them, the P already
// written is multiplied down to the new maxima and the rest is exponentiated against them
// (corr set for the strip's rows). Skips the max pass over the scores and, where no strip stops,
// the caller's rescaling of its accumulator. Returns whether corr was set (else corr is all 1).
constexpr float kLazyMaxLog2 = 8.0f;
__attribute__((target("avx512f"))) inline bool softmax_update_lazy_avx512(
    float* st, int n, int rows, float* row_max, float* row_sum, float* corr, beacon_cpu::BlockPrefetch* pf) {
  constexpr float kLog2e = 1.44269504088896341f;
  const __m512 l2e = _mm512_set1_ps(kLog2e);
  if (pf) pf->spread_over(n * ((rows + 15) / 16));
  bool any_corr = false;
  for (int r0 = 0; r0 < rows; r0 += 16) {
    const int nr = rows - r0 < 16 ? rows - r0 : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << nr) - 1u);
    const __m512 m_old = _mm512_maskz_loadu_ps(m, row_max + r0);
    __m512 mu = _mm512_mul_ps(m_old, l2e);
    __m512 sum = _mm512_setzero_ps();
    const auto col = [&](int c) { return st + static_cast<int64_t>(c) * rows + r0; };
    int c0 = 0;
    for (; c0 + 16 <= n; c0 += 16) {
      __m512 t[16];
      __m512 t_max = _mm512_set1_ps(-kLazyMaxLog2);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        t[i] = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, col(c0 + i)), l2e, mu);
        t_max = _mm512_max_ps(t_max, t[i]);
      }
      if (_mm512_cmp_ps_mask(t_max, _mm512_set1_ps(kLazyMaxLog2), _CMP_GT_OQ)) break;
      __m512 sum1 = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        if (pf) pf->step();
        const __m512 x = fast_exp2_16(t[i]);
        _mm512_mask_storeu_ps(col(c0 + i), m, x);
        if (i % 2) sum1 = _mm512_add_ps(sum1, x); else sum = _mm512_add_ps(sum, x);
      }
      sum = _mm512_add_ps(sum, sum1);
    }
    const int lazy_end = c0;  // keys before it hold P against m_old
    __m512 f = _mm512_set1_ps(1.0f);  // the strip's corr
    bool grow = c0 + 16 <= n;  // a group passed the maxima
    if (!grow && c0 < n) {       // the last n % 16 keys: the same test
      __m512 t_max = _mm512_set1_ps(-kLazyMaxLog2);
      for (int c = c0; c < n; ++c)
        t_max = _mm512_max_ps(t_max, _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, col(c)), l2e, mu));
      grow = _mm512_cmp_ps_mask(t_max, _mm512_set1_ps(kLazyMaxLog2), _CMP_GT_OQ) != 0;
    }
    if (grow) {  // the strip's maxima from the keys left (still scores), the P before scaled down
      __m512 m_new = m_old;
      for (int c = lazy_end; c < n; ++c) m_new = _mm512_max_ps(m_new, _mm512_maskz_loadu_ps(m, col(c)));
      f = fast_exp2_16(_mm512_mul_ps(_mm512_sub_ps(m_old, m_new), l2e));
      for (int c = 0; c < lazy_end; ++c)
        _mm512_mask_storeu_ps(col(c), m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, col(c)), f));
      sum = _mm512_mul_ps(sum, f);
      mu = _mm512_mul_ps(m_new, l2e);
      _mm512_mask_storeu_ps(row_max + r0, m, m_new);
      any_corr = true;
    }
    for (int c = c0; c < n; ++c) {
      if (pf) pf->step();
      const __m512 x = fast_exp2_16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, col(c)), l2e, mu));
      _mm512_mask_storeu_ps(col(c), m, x);
      sum = _mm512_add_ps(sum, x);
    }
    _mm512_mask_storeu_ps(corr + r0, m, f);
    _mm512_mask_storeu_ps(row_sum + r0, m, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, row_sum + r0), f, sum));
  }
  return any_corr;
}
// The update for a decode tile of 1-7 rows: the scores are one run of n * rows floats, so the max
// pass and the exp pass (fast_exp2_16, the sums fused into it) take 16 scores a vector whatever
// the row count. Lane j of the run's vector u is row (16 u + j) % rows, a pattern that repeats
// every V vectors (V = rows / gcd(16, rows): 1, 3, 5 or 7; 2 where it is 1, for two independent
// sums): V maxima, V sums and V row patterns of the maxima stay in registers. The AVX2 update took
// 8 a vector with twice the instructions per exp: ~20% of a bf16 decode step's arithmetic (4 rows,
// perf, AMX Xeon), time in which no cache line is read.
template <int V>
__attribute__((target("avx512f"), aligned(64))) inline void softmax_update_few_avx512(
    float* st, int n, int rows, float* row_max, float* row_sum, float* corr, float* m_blk, float* m_use) {
  constexpr float kLog2e = 1.44269504088896341f;
  const int64_t total = static_cast<int64_t>(n) * rows;
  const int64_t whole = total & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (total - whole)) - 1u);
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  // Whole periods up to `periods`, then fewer than V vectors (the last one masked where n * rows
  // is not a multiple of 16): vector u of those at st + periods + 16 u, under mask_of(u).
  const int64_t periods = whole / (16 * V) * (16 * V);
  const int n_rest = static_cast<int>((total - periods + 15) / 16);
  const auto mask_of = [&](int u) { return periods + 16 * u < whole ? __mmask16{0xFFFF} : tail; };
  // max_ps(s, m) is s > m ? s : m (NaN scores ignored), as softmax_max.
  __m512 mx[V];
  for (int u = 0; u < V; ++u) mx[u] = neg_inf;
  for (int64_t i = 0; i < periods; i += 16 * V)
    for (int u = 0; u < V; ++u) mx[u] = _mm512_max_ps(_mm512_loadu_ps(st + i + 16 * u), mx[u]);
  for (int u = 0; u < n_rest; ++u)
    mx[u] = _mm512_max_ps(_mm512_mask_loadu_ps(neg_inf, mask_of(u), st + periods + 16 * u), mx[u]);
  float lanes[16 * V];
  for (int u = 0; u < V; ++u) _mm512_storeu_ps(lanes + 16 * u, mx[u]);
  for (int r = 0; r < rows; ++r) m_blk[r] = kNegInf;
  for (int j = 0; j < 16 * V; ++j) m_blk[j % rows] = lanes[j] > m_blk[j % rows] ? lanes[j] : m_blk[j % rows];
  softmax_rescale(rows, row_max, corr, m_blk, m_use);
  __m512 mu[V], sum[V];
  for (int j = 0; j < 16 * V; ++j) lanes[j] = m_use[j % rows] * kLog2e;
  for (int u = 0; u < V; ++u) mu[u] = _mm512_loadu_ps(lanes + 16 * u), sum[u] = _mm512_setzero_ps();
  const __m512 l2e = _mm512_set1_ps(kLog2e);
  for (int64_t i = 0; i < periods; i += 16 * V)
    for (int u = 0; u < V; ++u) {
      const __m512 p = fast_exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(st + i + 16 * u), l2e, mu[u]));
      _mm512_storeu_ps(st + i + 16 * u, p);
      sum[u] = _mm512_add_ps(sum[u], p);
    }
  for (int u = 0; u < n_rest; ++u) {
    const __mmask16 m = mask_of(u);
    float* x = st + periods + 16 * u;
    const __m512 p = fast_exp2_16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, x), l2e, mu[u]));
    _mm512_mask_storeu_ps(x, m, p);
    sum[u] = _mm512_mask_add_ps(sum[u], m, sum[u], p);
  }
  for (int u = 0; u < V; ++u) _mm512_storeu_ps(lanes + 16 * u, sum[u]);
  for (int j = 0; j < 16 * V; ++j) m_blk[j % rows] += lanes[j];  // m_blk: the block's sums (rescale zeroed it)
  softmax_end(rows, row_sum, corr, m_blk);
}
#pragma GCC diagnostic pop
#endif

// Returns whether corr was set; false: every factor is 1 (the accumulator needs no rescaling).
inline bool softmax_update(float* st, int n, int rows, float* row_max, float* row_sum,
                           float* corr, float* m_blk, float* m_use,
                           beacon_cpu::BlockPrefetch* pf = nullptr) {
#ifdef BEACON_CPU_X86
  // Few rows (decode): softmax_update_few_avx512 with AVX-512, else the AVX2 update: both keep
  // maxima and sums in registers (levels are ordered, so AVX-512 implies AVX2).
  if (cpu_has(Isa::kAvx512) && rows >= 8) {
    bool lazy = true;
    for (int r = 0; r < rows; ++r) lazy &= row_max[r] != kNegInf;
    if (lazy) return softmax_update_lazy_avx512(st, n, rows, row_max, row_sum, corr, pf);
    softmax_update_avx512(st, n, rows, row_max, row_sum, corr, m_blk, m_use, pf);
    return true;
  }
  if (cpu_has(Isa::kAvx512) && rows < 8 && pf == nullptr) {
    switch (rows) {
      case 3: case 6: softmax_update_few_avx512<3>(st, n, rows, row_max, row_sum, corr, m_blk, m_use); break;
      case 5: softmax_update_few_avx512<5>(st, n, rows, row_max, row_sum, corr, m_blk, m_use); break;
      case 7: softmax_update_few_avx512<7>(st, n, rows, row_max, row_sum, corr, m_blk, m_use); break;
      default: softmax_update_few_avx512<2>(st, n, rows, row_max, row_sum, corr, m_blk, m_use); break;
    }
    return true;
  }
  if (cpu_has(Isa::kAvx2)) {
    softmax_update_avx2(st, n, rows, row_max, row_sum, corr, m_blk, m_use, pf);
    return true;
  }
#endif
  softmax_update_body(st, n, rows, row_max, row_sum, corr, m_blk, m_use, pf);
  return true;
}

// acc [rows x d] row r *= corr[r].
BEACON_ALWAYS_INLINE void scale_rows_body(float* acc, int rows, int d, const float* corr) {
  for (int r = 0; r < rows; ++r) {
    const float a = corr[r];
    if (a == 1.0f) continue;
    float* x = acc + static_cast<int64_t>(r) * d;
#pragma omp simd
    for (int c = 0; c < d; ++c) x[c] *= a;
  }
}
BEACON_ISA_VARIANTS(scale_rows, (float* acc, int rows, int d, const float* corr),
                    (acc, rows, d, corr))

inline float load_f32(float x) { return x; }
inline float load_f32(at::BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float load_f32(at::Half x) { return static_cast<float>(x); }

// rows x d block with row stride ld -> contiguous fp32 [rows x d].
template <typename T>
BEACON_ALWAYS_INLINE void to_float_body(const T* src, int64_t ld, int rows, int d, float* dst) {
  for (int r = 0; r < rows; ++r) {
    const T* x = src + r * ld;
    float* y = dst + static_cast<int64_t>(r) * d;
#pragma omp simd
    for (int c = 0; c < d; ++c) y[c] = load_f32(x[c]);
  }
}

// Few-row tiles (decode): dot products straight from the cache, which is read once; a GEMM
// call per block would cost more than the arithmetic. s [n x rows] = alpha * k q^T (transposed).
template <typename T>
BEACON_ALWAYS_INLINE void small_qk_generic_body(const float* q, int rows, int d, const T* k, int64_t ldk,
                                        int n, float alpha, float* s) {
  for (int c = 0; c < n; ++c) {
    const T* kc = k + c * ldk;
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + static_cast<int64_t>(r) * d;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int i = 0; i < d; ++i) dot += qr[i] * load_f32(kc[i]);
      s[static_cast<int64_t>(c) * rows + r] = dot * alpha;
    }
  }
}
// acc [rows x d] += p v, p stored transposed [n x rows].
template <typename T>
BEACON_ALWAYS_INLINE void small_pv_body(const float* p, int rows, int n, const T* v, int64_t ldv,
                                        int d, float* acc) {
  for (int c = 0; c < n; ++c) {
    const T* vc = v + c * ldv;
    for (int r = 0; r < rows; ++r) {
      const float pr = p[static_cast<int64_t>(c) * rows + r];
      if (pr == 0.0f) continue;
      float* a = acc + static_cast<int64_t>(r) * d;
#pragma omp simd
      for (int i = 0; i < d; ++i) a[i] += pr * load_f32(vc[i]);
    }
  }
}

#define BEACON_TYPED_KERNELS(T)                                                                \
  BEACON_ISA_VARIANTS(to_float, (const T* src, int64_t ld, int rows, int d, float* dst),       \
                      (src, ld, rows, d, dst))                                                 \
  BEACON_ISA_VARIANTS(small_qk_generic,                                                        \
                      (const float* q, int rows, int d, const T* k, int64_t ldk, int n,        \
                       float alpha, float* s),                                                 \
                      (q, rows, d, k, ldk, n, alpha, s))                                       \
  BEACON_ISA_VARIANTS(small_pv, (const float* p, int rows, int n, const T* v, int64_t ldv,     \
                                 int d, float* acc),                                           \
                      (p, rows, n, v, ldv, d, acc))
BEACON_TYPED_KERNELS(float)
BEACON_TYPED_KERNELS(at::BFloat16)
BEACON_TYPED_KERNELS(at::Half)
#undef BEACON_TYPED_KERNELS

#ifdef BEACON_CPU_X86
// Explicit AVX-512 dot products for decode (the auto-vectorised loop reduces through memory):
// two accumulators per row, one horizontal sum per (key, row). head_dim % 16 == 0.
__attribute__((target("avx512f"))) inline __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}
__attribute__((target("avx512f"))) inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// GCC 12 warns falsely inside _mm512_reduce_add_ps (-Wmaybe-uninitialized in its header).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <typename T>
__attribute__((target("avx512f"))) void small_qk_avx512(const float* q, int rows, int d,
                                                        const T* k, int64_t ldk, int n,
                                                        float alpha, float* s) {
  for (int c = 0; c < n; ++c) {
    const T* kc = k + c * ldk;
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + static_cast<int64_t>(r) * d;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int i = 0;
      for (; i + 32 <= d; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + i), load16(kc + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + i + 16), load16(kc + i + 16), a1);
      }
      if (i < d) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + i), load16(kc + i), a0);
      s[static_cast<int64_t>(c) * rows + r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * alpha;
    }
  }
}
#pragma GCC diagnostic pop
#endif

#ifdef BEACON_CPU_X86
// AVX2 decode kernels: the cache is read once, each line of it exactly once, with software
// prefetches a few keys ahead (the per-head K and V streams are short and alternate, so the
// hardware prefetchers alone left decode at about half of copy bandwidth). head_dim % 8 == 0.
#define BEACON_AVX2_FMA __attribute__((target("avx2,fma,f16c")))
BEACON_AVX2_FMA inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
BEACON_AVX2_FMA inline __m256 load8f(const at::BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
BEACON_AVX2_FMA inline __m256 load8f(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Columns [HALF, HALF + 8) of the 16 at p in the kernel's column order. SPLIT (a bf16 cache):
// each 16 columns are one 32-byte load taken as the even columns (the words shifted up) then
// the odd ones (masked), one integer op per 8 values instead of a widening shuffle and a shift
// (the shuffles share a port with the FMAs; ~5% of a bf16 decode step); q and the P V accumulator
// are kept in that order (split_columns, merge_columns).
template <bool SPLIT, int HALF, typename T>
BEACON_AVX2_FMA inline __m256 load8_cols(const T* p) {
  if constexpr (SPLIT) {
    static_assert(std::is_same_v<T, at::BFloat16>, "split order is for bf16");
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm256_castsi256_ps(HALF == 0 ? _mm256_slli_epi32(w, 16)
                                         : _mm256_and_si256(w, _mm256_set1_epi32(-65536)));
  } else {
    return load8f(p + HALF);
  }
}

// Keys ahead of the one being read whose rows are prefetched.
constexpr int kPrefetchKeys = 8;
// Keys ahead in each stream of the streamed decode kernels.
constexpr int kStreamPrefetchKeys = 2;
// (always_inline, as every helper that only prefetches: out of line, GCC may find it free of side
// effects and delete its calls; decode_linear.cpp's did.)
template <typename T>
BEACON_ALWAYS_INLINE void prefetch_key_row(const T* row, int d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < static_cast<int64_t>(d) * static_cast<int64_t>(sizeof(T)); off += 64)
    _mm_prefetch(p + off, _MM_HINT_T0);
}

// Horizontal sums of four vectors, times alpha.
BEACON_AVX2_FMA inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m128 alpha) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), alpha);
}

// s [n x rows] = alpha * k q^T: four keys at a time (each q vector loaded once per four keys,
// one horizontal sum per four dot products).
template <typename T>
BEACON_AVX2_FMA void small_qk_avx2(const float* q, int rows, int d, const T* k, int64_t ldk, int n,
                                   float alpha, float* s) {
  const __m128 va = _mm_set1_ps(alpha);
  int c = 0;
  for (; c + 4 <= n; c += 4) {
    const T* k0 = k + c * ldk;
    for (int j = 0; j < 4; ++j) prefetch_key_row(k0 + (kPrefetchKeys + j) * ldk, d);
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + static_cast<int64_t>(r) * d;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int i = 0; i < d; i += 8) {
        const __m256 qv = _mm256_loadu_ps(qr + i);
        a0 = _mm256_fmadd_ps(qv, load8f(k0 + i), a0);
        a1 = _mm256_fmadd_ps(qv, load8f(k0 + ldk + i), a1);
        a2 = _mm256_fmadd_ps(qv, load8f(k0 + 2 * ldk + i), a2);
        a3 = _mm256_fmadd_ps(qv, load8f(k0 + 3 * ldk + i), a3);
      }
      alignas(16) float out[4];
      _mm_store_ps(out, hsum4(a0, a1, a2, a3, va));
      for (int j = 0; j < 4; ++j) s[static_cast<int64_t>(c + j) * rows + r] = out[j];
    }
  }
  for (; c < n; ++c) {
    const T* kc = k + c * ldk;
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + static_cast<int64_t>(r) * d;
      __m256 a = _mm256_setzero_ps();
      for (int i = 0; i < d; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i), load8f(kc + i), a);
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      s[static_cast<int64_t>(c) * rows + r] =
          _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1))) * alpha;
    }
  }
}

// One key's dot product with one row of q, columns in the kernel's order (the tail of the
// kernel below). d % 8 == 0; SPLIT: d % 16 == 0.
template <bool SPLIT, typename T>
BEACON_AVX2_FMA inline float dot_cols(const float* qr, const T* kc, int d) {
  __m256 a = _mm256_setzero_ps();
  for (int i = 0; i < d; i += 16) {
    a = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i), load8_cols<SPLIT, 0>(kc + i), a);
    if (SPLIT || i + 8 < d) a = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i + 8), load8_cols<SPLIT, 8>(kc + i), a);
  }
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}

// Eight columns (HALF of the 16 at i) of KEYS keys against ROWS rows of q.
template <int ROWS, int KEYS, bool SPLIT, int HALF, typename T>
__attribute__((always_inline, target("avx2,fma,f16c"))) inline void qk_cols(
    const float* q, int d, const T* k0, int64_t ldk, int i, __m256* acc) {
  __m256 kv[KEYS];
  for (int j = 0; j < KEYS; ++j) kv[j] = load8_cols<SPLIT, HALF>(k0 + j * ldk + i);
  for (int r = 0; r < ROWS; ++r) {
    const __m256 qv = _mm256_loadu_ps(q + static_cast<int64_t>(r) * d + i + HALF);
    for (int j = 0; j < KEYS; ++j) acc[r * KEYS + j] = _mm256_fmadd_ps(qv, kv[j], acc[r * KEYS + j]);
  }
}

// reduce_sums<ACC>'s out holds this many floats: ACC rounded up to a multiple of four.
constexpr int reduced_sums(int acc) { return (acc + 3) / 4 * 4; }

// out[a] = alpha * the sum of accumulator a's lanes for a < ACC (HALVES: of accumulators a and
// ACC + a), four at a time (the rest of the last four zero).
template <int ACC, bool HALVES>
BEACON_AVX2_FMA inline void reduce_sums(const __m256* acc, __m128 alpha, float* out) {
  constexpr int kSums = reduced_sums(ACC);
  __m256 t[kSums];
  for (int a = 0; a < kSums; ++a) t[a] = a < ACC ? acc[a] : _mm256_setzero_ps();
  if constexpr (HALVES)
    for (int a = 0; a < ACC; ++a) t[a] = _mm256_add_ps(t[a], acc[ACC + a]);
  for (int a = 0; a < kSums; a += 4) _mm_store_ps(out + a, hsum4(t[a], t[a + 1], t[a + 2], t[a + 3], alpha));
}

// s [n x ROWS] = alpha * k q^T for GQA decode tiles, KEYS keys at a time: every 8 columns of
// the KEYS keys are loaded (and widened, for 16-bit caches) once for all ROWS rows, so K is read
// from memory once and never copied; ROWS x KEYS accumulators stay in registers. bf16 with under
// 8 of them (one row): each 8 columns of the 16 have their own (HALVES), summed at the end, as an
// FMA waits 4 cycles for its accumulator and 8 independent chains keep the two FMA pipes busy.
template <int ROWS, int KEYS, bool SPLIT, typename T>
BEACON_AVX2_FMA void small_qk_rows_avx2(const float* q, int d, const T* k, int64_t ldk, int n,
                                        float alpha, float* s) {
  constexpr int kAcc = ROWS * KEYS;
  constexpr bool kHalves = SPLIT && kAcc < 8;  // bf16 (fp32 measured no faster with them)
  constexpr int kSums = reduced_sums(kAcc);
  const __m128 va = _mm_set1_ps(alpha);
  int c = 0;
  if constexpr (KEYS == 2) {
    // Two keys a group (4 and 6 rows): one from each half of the block, two sequential streams
    // (Zen 4, fp32, 32 query heads over 8 kv heads, 4,608 keys: 1.8 ms against 2.15-2.4 with
    // the two keys side by side). Keys c and c + half; the odd last key below.
    const int half = n / 2;
    const int64_t step = half * ldk;
    for (; c < half; ++c) {
      const T* k0 = k + c * ldk;
      for (int j = 0; j < 2; ++j) prefetch_key_row(k0 + kStreamPrefetchKeys * ldk + j * step, d);
      __m256 acc[kHalves ? 2 * kAcc : kAcc];
      for (auto& a : acc) a = _mm256_setzero_ps();
      for (int i = 0; i < d; i += 16) {
        qk_cols<ROWS, 2, SPLIT, 0>(q, d, k0, step, i, acc);
        if (SPLIT || i + 8 < d) qk_cols<ROWS, 2, SPLIT, 8>(q, d, k0, step, i, acc + (kHalves ? kAcc : 0));
      }
      alignas(16) float out[kSums];
      reduce_sums<kAcc, kHalves>(acc, va, out);
      for (int r = 0; r < ROWS; ++r)
        for (int j = 0; j < 2; ++j) s[static_cast<int64_t>(c + j * half) * ROWS + r] = out[r * 2 + j];
    }
    c = 2 * half;
  } else {
    // (Four streams of one key each were 3-7% slower for 1-3 rows, Zen 4.)
    for (; c + KEYS <= n; c += KEYS) {
      const T* k0 = k + c * ldk;
      for (int j = 0; j < KEYS; ++j) prefetch_key_row(k0 + (kPrefetchKeys + j) * ldk, d);
      __m256 acc[kHalves ? 2 * kAcc : kAcc];
      for (auto& a : acc) a = _mm256_setzero_ps();
      for (int i = 0; i < d; i += 16) {
        qk_cols<ROWS, KEYS, SPLIT, 0>(q, d, k0, ldk, i, acc);
        if (SPLIT || i + 8 < d) qk_cols<ROWS, KEYS, SPLIT, 8>(q, d, k0, ldk, i, acc + (kHalves ? kAcc : 0));
      }
      alignas(16) float out[kSums];
      reduce_sums<kAcc, kHalves>(acc, va, out);
      for (int r = 0; r < ROWS; ++r)
        for (int j = 0; j < KEYS; ++j) s[static_cast<int64_t>(c + j) * ROWS + r] = out[r * KEYS + j];
    }
  }
  for (; c < n; ++c)
    for (int r = 0; r < ROWS; ++r)
      s[static_cast<int64_t>(c) * ROWS + r] =
          dot_cols<SPLIT>(q + static_cast<int64_t>(r) * d, k + c * ldk, d) * alpha;
}

// Few-row Q K^T with the register blocking that fits 16 ymm registers; false: no kernel for
// `rows` (5 and 7 would not fit the registers).
template <bool SPLIT, typename T>
BEACON_AVX2_FMA bool small_qk_gqa_avx2(const float* q, int rows, int d, const T* k, int64_t ldk,
                                       int n, float alpha, float* s) {
  switch (rows) {
    case 1: small_qk_rows_avx2<1, 4, SPLIT>(q, d, k, ldk, n, alpha, s); return true;
    case 2: small_qk_rows_avx2<2, 4, SPLIT>(q, d, k, ldk, n, alpha, s); return true;
    // bf16 3 x 3, not 3 x 4: twelve accumulators, four keys, the odd columns' mask and a query
    // vector spilled to the stack (Zen 3, K in L2, d 64 and 128: 1.2-1.5x faster as 3 x 3; fp32,
    // which needs no mask register, measured no faster, so it stays 3 x 4)
    case 3:
      if constexpr (SPLIT) small_qk_rows_avx2<3, 3, SPLIT>(q, d, k, ldk, n, alpha, s);
      else small_qk_rows_avx2<3, 4, SPLIT>(q, d, k, ldk, n, alpha, s);
      return true;
    case 4: small_qk_rows_avx2<4, 2, SPLIT>(q, d, k, ldk, n, alpha, s); return true;
    case 6: small_qk_rows_avx2<6, 2, SPLIT>(q, d, k, ldk, n, alpha, s); return true;
    default: return false;
  }
}

// acc [rows x d] += p v (p transposed [n x rows]) for ROWS rows, in chunks of kPvChunkKeys keys
// whose V rows stay in L1: per chunk, 16 NB columns of every row in registers per pass over the
// chunk's keys; the first pass reads V from memory, the others read the same lines from L1.
// bf16 (SPLIT) takes NB = 4 / ROWS blocks of 16 columns a pass at one or two rows: an FMA waits 4
// cycles for its accumulator and a pass keeps 2 ROWS NB of them, 8 there, where 16 columns left
// one row's sums to 2 dependent chains, a quarter of the FMA pipes (Zen 3, one row, d 128, V in
// L2: 11 -> 7-9 ns a key; results unchanged, each column still summed key after key). fp32 reads
// twice the bytes for the same arithmetic and is memory-bound: NB 1 (no gain measured there).
// While a chunk is worked on, the next one is prefetched, a few cache lines per key visited: a
// prefetch a few keys ahead inside the first pass came too late (perf: half of the kernel's
// time on the first load of a V row). (Tried and slower here, 10-30%: the next chunk's lines in
// the order its passes read them, line p of every row in pass p; a prefetch loop of its own
// per pass instead of this per-visit line counter.)
constexpr int kPvChunkKeys = 32;
template <typename T>
BEACON_ALWAYS_INLINE void prefetch_rows(const T* v, int64_t ldv, int first, int end, int d) {
  for (int c = first; c < end; ++c) prefetch_key_row(v + c * ldv, d);
}

// The next chunk's lines, spread over the current chunk's key visits: one line a visit, or two
// where the passes have fewer visits than the next chunk has lines (the rest, if any, after the
// chunk). (A loop of per_visit lines instead: P V over an L2-resident block 0.7-0.9x as fast.)
template <typename T>
struct ChunkPrefetch {
  const T* v;
  int64_t ldv;
  int row, end, line, row_lines;
  bool two;
  BEACON_AVX2_FMA inline void one() {
    _mm_prefetch(reinterpret_cast<const char*>(v + row * ldv) + 64 * line, _MM_HINT_T0);
    if (++line == row_lines) line = 0, ++row;
  }
  BEACON_AVX2_FMA inline void visit() {
    if (row < end) {
      one();
      if (two && row < end) one();
    }
  }
};

// One pass over the keys [c0, c1): columns [i0, i0 + 16 NB) of the ROWS rows (NB 1 and !TWO: the
// 8 columns at i0). (One-dimensional accumulator arrays: with [ROWS][NB] GCC 12 stored every
// accumulator to the stack after each key.)
template <int ROWS, int NB, bool TWO, bool SPLIT, typename T>
BEACON_AVX2_FMA inline void pv_pass(const float* p, int c0, int c1, const T* v, int64_t ldv, int d, int i0,
                                    float* acc, ChunkPrefetch<T>& pf) {
  static_assert(TWO || NB == 1, "8 columns are one block");
  constexpr int kAcc = ROWS * NB;
  __m256 lo[kAcc], hi[kAcc];  // accumulator r * NB + b: row r, columns i0 + 16 b (lo) and + 8 (hi)
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < NB; ++b) {
      lo[r * NB + b] = _mm256_loadu_ps(acc + r * d + i0 + 16 * b);
      hi[r * NB + b] = TWO ? _mm256_loadu_ps(acc + r * d + i0 + 16 * b + 8) : _mm256_setzero_ps();
    }
  for (int c = c0; c < c1; ++c) {
    pf.visit();
    const T* vc = v + c * ldv + i0;
    const float* pc = p + static_cast<int64_t>(c) * ROWS;
    for (int b = 0; b < NB; ++b) {
      const __m256 v0 = load8_cols<SPLIT, 0>(vc + 16 * b);
      const __m256 v1 = TWO ? load8_cols<SPLIT, 8>(vc + 16 * b) : _mm256_setzero_ps();
      for (int r = 0; r < ROWS; ++r) {
        const __m256 pr = _mm256_broadcast_ss(pc + r);
        lo[r * NB + b] = _mm256_fmadd_ps(pr, v0, lo[r * NB + b]);
        if (TWO) hi[r * NB + b] = _mm256_fmadd_ps(pr, v1, hi[r * NB + b]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < NB; ++b) {
      _mm256_storeu_ps(acc + r * d + i0 + 16 * b, lo[r * NB + b]);
      if (TWO) _mm256_storeu_ps(acc + r * d + i0 + 16 * b + 8, hi[r * NB + b]);
    }
}

template <int ROWS, bool SPLIT, typename T>
BEACON_AVX2_FMA void small_pv_rows_avx2(const float* p, int n, const T* v, int64_t ldv, int d,
                                        float* acc) {
  constexpr int NB = !SPLIT || ROWS >= 4 ? 1 : 4 / ROWS;
  const int wide = d / (16 * NB) * (16 * NB);  // columns taken NB blocks a pass; the rest 16 (or 8) a pass
  const int passes = wide / (16 * NB) + (d - wide + 15) / 16;
  const int row_lines = static_cast<int>((static_cast<int64_t>(d) * sizeof(T) + 63) / 64);
  prefetch_rows(v, ldv, 0, std::min(n, kPvChunkKeys), d);
  for (int c0 = 0; c0 < n; c0 += kPvChunkKeys) {
    const int c1 = std::min(n, c0 + kPvChunkKeys);
    const int pf_end = std::min(n, c1 + kPvChunkKeys);
    const int visits = passes * (c1 - c0);
    ChunkPrefetch<T> pf{v, ldv, c1, pf_end, 0, row_lines, (pf_end - c1) * row_lines > visits};
    int i0 = 0;
    for (; i0 < wide; i0 += 16 * NB) pv_pass<ROWS, NB, true, SPLIT>(p, c0, c1, v, ldv, d, i0, acc, pf);
    for (; i0 + 16 <= d; i0 += 16) pv_pass<ROWS, 1, true, SPLIT>(p, c0, c1, v, ldv, d, i0, acc, pf);
    if (i0 < d) pv_pass<ROWS, 1, false, SPLIT>(p, c0, c1, v, ldv, d, i0, acc, pf);
    if (pf.row < pf_end) prefetch_rows(v, ldv, pf.row, pf_end, d);  // lines the visits did not reach
  }
}

// (Not named small_pv_avx2: that is small_pv's auto-vectorised AVX2 variant, a non-template
// overload with these parameters, which a call would pick over this template.)
template <bool SPLIT, typename T>
void small_pv_rows_dispatch_avx2(const float* p, int rows, int n, const T* v, int64_t ldv, int d,
                                 float* acc) {
  switch (rows) {
    case 1: small_pv_rows_avx2<1, SPLIT>(p, n, v, ldv, d, acc); return;
    case 2: small_pv_rows_avx2<2, SPLIT>(p, n, v, ldv, d, acc); return;
    case 3: small_pv_rows_avx2<3, SPLIT>(p, n, v, ldv, d, acc); return;
    case 4: small_pv_rows_avx2<4, SPLIT>(p, n, v, ldv, d, acc); return;
    case 5: small_pv_rows_avx2<5, SPLIT>(p, n, v, ldv, d, acc); return;
    case 6: small_pv_rows_avx2<6, SPLIT>(p, n, v, ldv, d, acc); return;
    default: small_pv_rows_avx2<7, SPLIT>(p, n, v, ldv, d, acc); return;
  }
}
#undef BEACON_AVX2_FMA
#endif

// Whether a decode tile of `rows` rows reads its bf16 cache in split column order (load8_cols):
// with AVX2 (and not AVX-512, whose Q K^T kernel reads the cache's order), head_dim % 16 == 0
// and a register-blocked Q K^T kernel for `rows`.
template <typename T>
bool decode_split(int rows, int d) {
#ifdef BEACON_CPU_X86
  if constexpr (std::is_same_v<T, at::BFloat16>)
    return d % 16 == 0 && (rows <= 4 || rows == 6) && cpu_has(Isa::kAvx2);
#endif
  return false;
}
// rows x d floats from the cache's column order into split order (each `width` columns: the
// even ones, then the odd ones; width 16 for the AVX2 kernels, 32 for decode_avx512.h's), and back.
inline void split_columns(float* x, int rows, int d, int width = 16) {
  const int half = width / 2;
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < d; i += width) {
      float* g = x + static_cast<int64_t>(r) * d + i;
      float t[32];
      for (int j = 0; j < half; ++j) t[j] = g[2 * j], t[half + j] = g[2 * j + 1];
      std::memcpy(g, t, sizeof(float) * width);
    }
}
inline void merge_columns(float* x, int rows, int d, int width = 16) {
  const int half = width / 2;
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < d; i += width) {
      float* g = x + static_cast<int64_t>(r) * d + i;
      float t[32];
      for (int j = 0; j < half; ++j) t[2 * j] = g[j], t[2 * j + 1] = g[half + j];
      std::memcpy(g, t, sizeof(float) * width);
    }
}

// decode_pv_pairs's column order (each 32 columns: lane 4l + j of the first 16 is column 8l + j,
// of the second 16 column 8l + 4 + j, l < 4, j < 4) back to columns in order.
inline void unpair_columns(float* x, int rows, int d) {
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < d; i += 32) {
      float* g = x + static_cast<int64_t>(r) * d + i;
      float t[32];
      for (int j = 0; j < 16; ++j) t[8 * (j / 4) + j % 4] = g[j], t[8 * (j / 4) + 4 + j % 4] = g[16 + j];
      std::memcpy(g, t, sizeof(t));
    }
}

// Few-row tiles (decode, rows < 8): s [n x rows] = alpha * k q^T. k_scratch: n x d floats.
// split: q is in split column order (decode_split said so).
template <typename T>
void decode_qk(const float* q, int rows, int d, const T* k, int64_t ldk, int n, float alpha,
               float* s, float* k_scratch, bool split) {
#ifdef BEACON_CPU_X86
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (split) {
      small_qk_gqa_avx2<true>(q, rows, d, k, ldk, n, alpha, s);
      return;
    }
  }
  // The AVX2 kernels at every x86 level: they keep rows x keys blocks in registers and
  // prefetch, where small_qk_avx512 sums each (key, row) across a register (measured 1.5-3.6x
  // slower on an AVX-512 Xeon); that one stays for 5 or 7 rows.
  if (cpu_has(Isa::kAvx2) && small_qk_gqa_avx2<false>(q, rows, d, k, ldk, n, alpha, s)) return;
  if constexpr (!std::is_same_v<T, at::Half>) {
    if (d % 16 == 0 && cpu_has(Isa::kAvx512)) {
      small_qk_avx512(q, rows, d, k, ldk, n, alpha, s);
      return;
    }
  }
  if (cpu_has(Isa::kAvx2)) {
    // 5 or 7 rows. For a 16-bit cache, reading it in place would widen every K element once per
    // row: widen the block once (read from memory once, with prefetching), then take the dot
    // products from the cache.
    if constexpr (!std::is_same_v<T, float>) {
      for (int c = 0; c < n; ++c) {
        prefetch_key_row(k + (c + kPrefetchKeys) * ldk, d);
        to_float(k + c * ldk, ldk, 1, d, k_scratch + static_cast<int64_t>(c) * d);
      }
      small_qk_avx2(q, rows, d, static_cast<const float*>(k_scratch), d, n, alpha, s);
      return;
    }
    small_qk_avx2(q, rows, d, k, ldk, n, alpha, s);
    return;
  }
#endif
  (void)split;
  small_qk_generic(q, rows, d, k, ldk, n, alpha, s);
}

// Few-row tiles (decode, rows < 8): acc [rows x d] += p v, p stored transposed [n x rows].
// split: acc is in split column order.
template <typename T>
void decode_pv(const float* p, int rows, int n, const T* v, int64_t ldv, int d, float* acc,
               bool split) {
#ifdef BEACON_CPU_X86
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (split) {
      small_pv_rows_dispatch_avx2<true>(p, rows, n, v, ldv, d, acc);
      return;
    }
  }
  if (rows <= 7 && cpu_has(Isa::kAvx2)) {
    small_pv_rows_dispatch_avx2<false>(p, rows, n, v, ldv, d, acc);
    return;
  }
#endif
  (void)split;
  small_pv(p, rows, n, v, ldv, d, acc);
}

}  // namespace beacon::cpu::attn

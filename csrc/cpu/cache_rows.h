// Row kernels of the CPU cache ops: rotate rows of head_dim elements by one RoPE angle set,
// computed in fp32 and rounded once. Pair layout and the rotation formula come from rope.h.
//
// Two implementations give bit-identical results (multiply, multiply, add/subtract in fp32; no
// FMA contraction; round-to-nearest-even conversions): a portable one, and on x86-64 an
// AVX2 + F16C one chosen at run time (the build targets baseline x86-64, so the compiler alone
// would use SSE2 and scalar fp16/bf16 conversions, several times slower).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "rope.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BEACON_ROWS_X86 1
#include <immintrin.h>
#endif

namespace beacon::rows {

// Portable kernel: dst row <- src row rotated. Each pair is read before it is written, so
// src == dst is safe (in-place rope_), as are distinct rows.
template <typename T, bool kInterleaved>
inline void rotate_row_portable(const T* src, T* dst, const float* c, const float* s, float sin_sign,
                                int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const int i0 = pair_first(static_cast<int>(i), static_cast<int>(half), kInterleaved);
    const int i1 = pair_second(static_cast<int>(i), static_cast<int>(half), kInterleaved);
    float x0 = static_cast<float>(src[i0]), x1 = static_cast<float>(src[i1]);
    rotate_pair(x0, x1, c[i], sin_sign * s[i]);
    dst[i0] = static_cast<T>(x0);
    dst[i1] = static_cast<T>(x1);
  }
}

#ifdef BEACON_ROWS_X86
#define BEACON_AVX2 __attribute__((target("avx2,f16c"))) inline

// 8 consecutive elements <-> 8 floats.
BEACON_AVX2 __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
BEACON_AVX2 __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
BEACON_AVX2 __m256 load8(const c10::BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
BEACON_AVX2 void store8(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
BEACON_AVX2 void store8(c10::Half* p, __m256 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
BEACON_AVX2 void store8(c10::BFloat16* p, __m256 x) {
  // c10's rounding: NaN -> 0x7FC0, else (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16.
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

// Rotate-half: pairs (i, i + half), 8 pairs per iteration; half % 8 == 0.
template <typename T>
BEACON_AVX2 void rotate_row_avx2_half(const T* src, T* dst, const float* c, const float* s, float sin_sign,
                                      int64_t half) {
  const __m256 sign = _mm256_set1_ps(sin_sign);
  for (int64_t i = 0; i < half; i += 8) {
    const __m256 x0 = load8(src + i), x1 = load8(src + half + i);
    const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_mul_ps(_mm256_loadu_ps(s + i), sign);
    store8(dst + i, _mm256_sub_ps(_mm256_mul_ps(x0, cv), _mm256_mul_ps(x1, sv)));
    store8(dst + half + i, _mm256_add_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x0, sv)));
  }
}

// Interleaved: pairs (2i, 2i + 1), 4 pairs per 8 elements; y = x * [c c] + swap(x) * [-s s],
// which is x0 c - x1 s, x1 c + x0 s exactly (negation is exact).
template <typename T>
BEACON_AVX2 void rotate_row_avx2_interleaved(const T* src, T* dst, const float* c, const float* s,
                                             float sin_sign, int64_t half) {
  const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256 alternate = _mm256_setr_ps(-sin_sign, sin_sign, -sin_sign, sin_sign, -sin_sign, sin_sign,
                                          -sin_sign, sin_sign);
  for (int64_t i = 0; i < half; i += 4) {
    const __m256 x = load8(src + 2 * i);
    const __m256 cv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(c + i)), dup);
    const __m256 sv = _mm256_mul_ps(
        _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + i)), dup), alternate);
    const __m256 swapped = _mm256_permute_ps(x, 0b10110001);
    store8(dst + 2 * i, _mm256_add_ps(_mm256_mul_ps(x, cv), _mm256_mul_ps(swapped, sv)));
  }
}

template <typename T>
BEACON_AVX2 void rotate_rows_avx2(const T* src, T* dst, int64_t nrows, int64_t D, const float* c,
                                  const float* s, float sin_sign, bool interleaved) {
  const int64_t half = D / 2;
  for (int64_t r = 0; r < nrows; ++r) {
    if (interleaved) {
      rotate_row_avx2_interleaved(src + r * D, dst + r * D, c, s, sin_sign, half);
    } else {
      rotate_row_avx2_half(src + r * D, dst + r * D, c, s, sin_sign, half);
    }
  }
}

inline bool cpu_has_avx2_f16c() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}
#undef BEACON_AVX2
#endif  // BEACON_ROWS_X86

// dst row i <- src row i rotated by (cos_row, sin_row * sin_sign), i = 0..nrows-1 in increasing
// order. Every row is read before it is written and rows are whole, so src == dst (in place)
// and dst below src with overlapping ranges (the carried-raw shift of compaction, a shift by a
// whole number of rows) are both safe.
template <typename T>
inline void rotate_rows(const T* src, T* dst, int64_t nrows, int64_t D, const float* cos_row,
                        const float* sin_row, float sin_sign, bool interleaved) {
  const int64_t half = D / 2;
#ifdef BEACON_ROWS_X86
  if (half % 8 == 0 && cpu_has_avx2_f16c()) {
    rotate_rows_avx2(src, dst, nrows, D, cos_row, sin_row, sin_sign, interleaved);
    return;
  }
#endif
  for (int64_t r = 0; r < nrows; ++r) {
    if (interleaved) {
      rotate_row_portable<T, true>(src + r * D, dst + r * D, cos_row, sin_row, sin_sign, half);
    } else {
      rotate_row_portable<T, false>(src + r * D, dst + r * D, cos_row, sin_row, sin_sign, half);
    }
  }
}

}  // namespace beacon::rows

// Row kernels of the CPU cache ops: rotate rows of head_dim elements by one RoPE angle set,
// computed in fp32 and rounded once. Pair layout and the rotation formula come from rope.h.
//
// Three implementations give bit-identical results (multiply, multiply, add/subtract in fp32; no
// FMA contraction; round-to-nearest-even conversions; NaN payloads aside): a portable one, and
// on x86-64 AVX2 + F16C and AVX-512 ones chosen at run time by cpu_isa() (cpu_isa.h; the build
// targets baseline x86-64, so the compiler alone would use SSE2 and scalar fp16/bf16 conversions,
// several times slower).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_isa.h"
#include "rope.h"

#ifdef BEACON_CPU_X86
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns about _mm512_undefined_ps() inside its own intrinsics headers (a false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace beacon::rows {

// The rotation of each row of a batch: row r turns by the table row of |delta(r)| (sin negated
// for a negative delta); delta(r) = deltas[r], or `delta` for every row when deltas is null.
struct Angles {
  const float* cos_t;  // fp32 [rows, half]
  const float* sin_t;
  int64_t half;
  const int* deltas;
  int delta;

  int delta_of(int64_t r) const { return deltas != nullptr ? deltas[r] : delta; }
  const float* cos_row(int d) const { return cos_t + static_cast<int64_t>(d < 0 ? -d : d) * half; }
  const float* sin_row(int d) const { return sin_t + static_cast<int64_t>(d < 0 ? -d : d) * half; }
  static float sin_sign(int d) { return d < 0 ? -1.f : 1.f; }
};

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

#ifdef BEACON_CPU_X86
// GCC contracts multiply + add into FMA by default (-ffp-contract=fast) wherever the target has
// FMA (AVX-512 implies it), which would make the paths differ in the last bit.
#if defined(__GNUC__) && !defined(__clang__)
#define BEACON_NO_FMA optimize("fp-contract=off"),
#else
#define BEACON_NO_FMA
#endif
#define BEACON_AVX2 __attribute__((BEACON_NO_FMA target("avx2,f16c"))) inline

// Prefetch the rows `ahead` rows further (hardware prefetchers ramp up slowly on the short
// per-plane streams of compaction: measured 0.6x -> ~0.95x of copy bandwidth for bf16).
template <typename T>
inline __attribute__((always_inline)) void prefetch_row_ahead(const T* src, int64_t src_stride, T* dst,
                                                              int64_t dst_stride, int64_t r, int64_t nrows,
                                                              int64_t row_bytes) {
  constexpr int64_t kAhead = 4;
  if (r + kAhead >= nrows) return;
  const char* px = reinterpret_cast<const char*>(src + (r + kAhead) * src_stride);
  const char* py = reinterpret_cast<const char*>(dst + (r + kAhead) * dst_stride);
  for (int64_t off = 0; off < row_bytes; off += 64) {
    _mm_prefetch(px + off, _MM_HINT_T0);
    _mm_prefetch(py + off, _MM_HINT_T0);
  }
}

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
BEACON_AVX2 void rotate_rows_avx2(const T* src, int64_t src_stride, T* dst, int64_t dst_stride, int64_t nrows,
                   int64_t D, const Angles& a, bool interleaved) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < nrows; ++r) {
    const T* x = src + r * src_stride;
    T* y = dst + r * dst_stride;
    prefetch_row_ahead(src, src_stride, dst, dst_stride, r, nrows, row_bytes);
    const int d = a.delta_of(r);
    if (d == 0) {  // no rotation: an exact copy
      if (x != y) std::memcpy(y, x, D * sizeof(T));
    } else if (interleaved) {
      rotate_row_avx2_interleaved(x, y, a.cos_row(d), a.sin_row(d), Angles::sin_sign(d), a.half);
    } else {
      rotate_row_avx2_half(x, y, a.cos_row(d), a.sin_row(d), Angles::sin_sign(d), a.half);
    }
  }
}

#define BEACON_AVX512_NS avx512
#define BEACON_AVX512_BF16 0
#define BEACON_AVX512 __attribute__((BEACON_NO_FMA target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c"))) inline
#include "cpu/cache_rows_avx512.inc"
#undef BEACON_AVX512
#undef BEACON_AVX512_BF16
#undef BEACON_AVX512_NS
#define BEACON_AVX512_NS avx512bf16
#define BEACON_AVX512_BF16 1
#define BEACON_AVX512 \
  __attribute__((BEACON_NO_FMA target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,f16c"))) inline
#include "cpu/cache_rows_avx512.inc"
#undef BEACON_AVX512
#undef BEACON_AVX512_BF16
#undef BEACON_AVX512_NS

#endif  // BEACON_CPU_X86

template <typename T>
inline void rotate_rows_portable(const T* src, int64_t src_stride, T* dst, int64_t dst_stride, int64_t nrows,
                   int64_t D, const Angles& a, bool interleaved) {
  for (int64_t r = 0; r < nrows; ++r) {
    const T* x = src + r * src_stride;
    T* y = dst + r * dst_stride;
    const int d = a.delta_of(r);
    if (d == 0) {  // no rotation: an exact copy
      if (x != y) std::memcpy(y, x, D * sizeof(T));
    } else if (interleaved) {
      rotate_row_portable<T, true>(x, y, a.cos_row(d), a.sin_row(d), Angles::sin_sign(d), a.half);
    } else {
      rotate_row_portable<T, false>(x, y, a.cos_row(d), a.sin_row(d), Angles::sin_sign(d), a.half);
    }
  }
}

// Rotate a batch of rows: row r (0 <= r < nrows, in increasing order) is read at
// src + r * src_stride and written at dst + r * dst_stride. Every row is read before it is
// written and rows never partly overlap, so in place (src == dst) and a shift of rows towards
// lower addresses with overlapping ranges (the carried-raw shift of compaction) are both safe.
template <typename T>
inline void rotate_rows(const T* src, int64_t src_stride, T* dst, int64_t dst_stride, int64_t nrows, int64_t D,
                        const Angles& a, bool interleaved) {
  const int64_t half = D / 2;
#ifdef BEACON_CPU_X86
  using beacon::cpu::Isa;
  if (beacon::cpu::cpu_has(Isa::kAvx512) && half % (interleaved ? 8 : 16) == 0) {
    if (beacon::cpu::cpu_has(Isa::kAvx512Bf16) && std::is_same_v<T, c10::BFloat16>) {
      avx512bf16::rotate_rows_avx512(src, src_stride, dst, dst_stride, nrows, D, a, interleaved);
    } else {
      avx512::rotate_rows_avx512(src, src_stride, dst, dst_stride, nrows, D, a, interleaved);
    }
    return;
  }
  if (beacon::cpu::cpu_has(Isa::kAvx2) && half % 8 == 0) {
    rotate_rows_avx2(src, src_stride, dst, dst_stride, nrows, D, a, interleaved);
    return;
  }
#endif
  rotate_rows_portable(src, src_stride, dst, dst_stride, nrows, D, a, interleaved);
}

}  // namespace beacon::rows

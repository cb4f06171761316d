// Decode (few-row tiles) with AVX-512. fp32 cache (level avx512 and above): Q K^T and P V by
// 16-wide FMAs, the Q K^T sums of 16 (key, row) pairs reduced together (hsum16x16), where the
// AVX2 kernels of attention_blocks.h take twice the instructions (a 4-row fp32 decode over a
// cache in the CPU caches ran at ~7.5 GB/s there, under one core's DRAM stream).
// bf16 cache on CPUs with AVX-512-BF16 (cpu_isa() level avx512bf16
// and above): Q K^T by vdpbf16ps straight from the cache against the queries' own bf16 rows (each
// pair product exact in fp32, as in the prefill's bf16 GEMM), P V by 16-wide fp32 FMAs with V
// widened in registers. The AVX2 decode kernels (attention_blocks.h) left a bf16 decode step
// bound by instructions, not memory (a cache that stays in the CPU caches ran no faster than
// one read from DRAM, ~0.6x copy bandwidth); these take about a quarter (Q K^T) and half (P V)
// of their instructions per key. head_dim % 32 == 0; other head dims take the AVX2 kernels.
// At level amx, Q K^T runs on AMX tiles instead (decode_qk_amx, below).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/amx_gemm.h"          // TileConfig
#include "cpu/attention_blocks.h"  // prefetch_key_row, kPvChunkKeys
#include "cpu/cpu_isa.h"

namespace beacon::cpu::attn {

// The most rows a tile streamed through pv_stream has (d 64; three at d 128): attention.cpp sizes
// those tiles' scores by it.
constexpr int kPvStreamRowsMax = 6;

#if defined(BEACON_CPU_X86) && !defined(BEACON_OPS_EMULATE_BF16_DOT)
#define BEACON_DECODE_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define BEACON_DECODE_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
// GCC 12 reports the intrinsics' own undefined-vector idiom as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Whether a decode tile's P V over an fp32 or bf16 cache takes pv_stream (below; the head dims
// of the models in use): where decode_avx512_preferred() is false. Its Q K^T is the AVX2 kernel's,
// or for bf16 on CPUs with AVX-512-BF16 decode_qk_bf16's (attention.cpp, dec_qk_dot).
inline bool use_decode_pv_stream(int rows, int d) {
  return cpu_has(Isa::kAvx512) && !decode_avx512_preferred() &&
         ((d == 128 && rows >= 1 && rows <= 3) || (d == 64 && rows >= 1 && rows <= kPvStreamRowsMax));
}

// Whether a decode tile of `rows` rows over an fp32 cache takes these kernels.
inline bool use_decode_f32(int rows, int d) {
  return rows >= 1 && rows <= 7 && d % 32 == 0 && cpu_has(Isa::kAvx512) && decode_avx512_preferred();
}

// Whether decode_qk_bf16 (below) runs for a tile of `rows` rows at head_dim d on this CPU.
inline bool use_decode_qk_bf16(int rows, int d) {
  return rows >= 1 && rows <= 7 && d % 32 == 0 && cpu_has(Isa::kAvx512Bf16);
}

// Whether a decode tile of `rows` rows over a bf16 cache takes these kernels (Q K^T and P V): also
// where the AVX2 family is preferred, except where bf16 V streams faster through pv_stream (Zen 4,
// one thread, 4,608 keys: 1-3 rows at d 128, 0.83-0.90 ms against 1.2-1.35 with these; 1-2 rows
// at d 64). Elsewhere these win there: 32 query heads over 8 kv heads (4 rows, bf16) 0.53-0.63 of
// copy bandwidth against 0.47-0.56 with the AVX2 kernels before decode_pv_pairs, 0.7 after;
// SmolLM2's 9 over 3 (3 rows, d 64) 0.18-0.20 ms against 0.25 (on Zen 5 pv_stream after
// decode_qk_bf16 was no faster for 3-6 rows at d 64: bench/decode_rows.py --shapes
// 3/3/64,4/3/64,6/3/64, 0.53-0.58 of copy against 0.50-0.63); fp32 the other way round
// (0.37-0.40 against 0.56-0.63), so fp32 keeps the AVX2 family there.
inline bool use_decode_bf16(int rows, int d) {
  const bool stream = use_decode_pv_stream(rows, d) && (d == 128 || rows <= 2);
  return use_decode_qk_bf16(rows, d) && (decode_avx512_preferred() || !stream);
}

// Lane i of the result = the sum of v[i]'s 16 lanes: pairs of vectors, then of 64-bit halves,
// then of 128-bit lanes combined (45 instructions for 16 sums, where a reduction per vector
// takes 8 dependent ones each).
BEACON_DECODE_AVX512_TARGET inline __m512 hsum16x16(const __m512* v) {
  __m512 w[8];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: a0+a2, b0+b2, a1+a3, b1+b3
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m512 z[4];
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: the lane's sum of v[4j], ..., v[4j + 3]
    const __m512d x = _mm512_castps_pd(w[2 * j]), y = _mm512_castps_pd(w[2 * j + 1]);
    z[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // 0x88: 128-bit lanes 0 and 2 of each operand; 0xDD: lanes 1 and 3.
  const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                                   _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
  const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], 0x88),
                                   _mm512_shuffle_f32x4(z[2], z[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88), _mm512_shuffle_f32x4(u01, u23, 0xDD));
}

// s [n x ROWS] = alpha * k q^T, KEYS = 16 / ROWS keys at a time: ROWS x KEYS accumulators,
// reduced together by hsum16x16 straight into the scores' key-major order (accumulator
// j * ROWS + r = key j, row r), one masked store per KEYS keys. q: ROWS rows of d bf16.
template <int ROWS>
BEACON_DECODE_BF16_TARGET __attribute__((aligned(64))) void decode_qk_bf16_rows(const uint16_t* q, int d,
                                                                                const uint16_t* k, int64_t ldk,
                                                                                int n, float alpha, float* s) {
  constexpr int KEYS = 16 / ROWS;
  const __m512 va = _mm512_set1_ps(alpha);
  for (int c = 0; c < n; c += KEYS) {
    const int nk = std::min(KEYS, n - c);
    const uint16_t* kr[KEYS];
    // A short last group repeats its last key (read, never stored): no read past the block.
    for (int j = 0; j < KEYS; ++j) kr[j] = k + (c + std::min(j, nk - 1)) * ldk;
    // The group 16 keys ahead (whatever KEYS is), as the AVX2 kernel's 8 keys ahead of 4 at a time.
    for (int j = 0; j < KEYS; ++j) prefetch_key_row(k + (c + 16 + j) * ldk, d);
    __m512 acc[16];
    for (int a = 0; a < 16; ++a) acc[a] = _mm512_setzero_ps();
    for (int i = 0; i < d; i += 32) {
      __m512bh kv[KEYS];
      for (int j = 0; j < KEYS; ++j) kv[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(kr[j] + i));
      for (int r = 0; r < ROWS; ++r) {
        const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + r * d + i));
        for (int j = 0; j < KEYS; ++j) acc[j * ROWS + r] = _mm512_dpbf16_ps(acc[j * ROWS + r], qv, kv[j]);
      }
    }
    const __mmask16 keep = static_cast<__mmask16>((1u << (nk * ROWS)) - 1u);
    _mm512_mask_storeu_ps(s + static_cast<int64_t>(c) * ROWS, keep, _mm512_mul_ps(hsum16x16(acc), va));
  }
}

// decode_qk_bf16_rows for an fp32 cache and fp32 queries: 16-wide FMAs over d, 16 at a time.
template <int ROWS>
BEACON_DECODE_AVX512_TARGET void decode_qk_f32_rows(const float* q, int d, const float* k, int64_t ldk, int n,
                                                    float alpha, float* s) {
  constexpr int KEYS = 16 / ROWS;
  const __m512 va = _mm512_set1_ps(alpha);
  for (int c = 0; c < n; c += KEYS) {
    const int nk = std::min(KEYS, n - c);
    const float* kr[KEYS];
    for (int j = 0; j < KEYS; ++j) kr[j] = k + (c + std::min(j, nk - 1)) * ldk;
    for (int j = 0; j < KEYS; ++j) prefetch_key_row(k + (c + 16 + j) * ldk, d);
    __m512 acc[16];
    for (int a = 0; a < 16; ++a) acc[a] = _mm512_setzero_ps();
    for (int i = 0; i < d; i += 16) {
      __m512 kv[KEYS];
      for (int j = 0; j < KEYS; ++j) kv[j] = _mm512_loadu_ps(kr[j] + i);
      for (int r = 0; r < ROWS; ++r) {
        const __m512 qv = _mm512_loadu_ps(q + r * d + i);
        for (int j = 0; j < KEYS; ++j) acc[j * ROWS + r] = _mm512_fmadd_ps(qv, kv[j], acc[j * ROWS + r]);
      }
    }
    const __mmask16 keep = static_cast<__mmask16>((1u << (nk * ROWS)) - 1u);
    _mm512_mask_storeu_ps(s + static_cast<int64_t>(c) * ROWS, keep, _mm512_mul_ps(hsum16x16(acc), va));
  }
}

// Keys c0 .. c1 - 1 of decode_pv_rows (one chunk), prefetching the keys after it up to pf_end.
// 32 columns of a V row: fp32 two loads in order; bf16 one load widened (the 32-split order).
template <int ROWS, typename T>
BEACON_DECODE_AVX512_TARGET inline void pv_chunk(const float* p, int c0, int c1, int pf_end, const T* v,
                                                 int64_t ldv, int d, float* acc) {
  const int row_lines = d * static_cast<int>(sizeof(T)) / 64;
  const __m512i odd = _mm512_set1_epi32(-65536);
  int pf_row = c1, pf_line = 0;  // the next chunk's line to prefetch next
  for (int i0 = 0; i0 < d; i0 += 32) {
    __m512 lo[ROWS], hi[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      lo[r] = _mm512_loadu_ps(acc + r * d + i0);
      hi[r] = _mm512_loadu_ps(acc + r * d + i0 + 16);
    }
    for (int c = c0; c < c1; ++c) {
      if (pf_row < pf_end) {
        _mm_prefetch(reinterpret_cast<const char*>(v + pf_row * ldv) + 64 * pf_line, _MM_HINT_T0);
        if (++pf_line == row_lines) pf_line = 0, ++pf_row;
      }
      __m512 v0, v1;
      if constexpr (std::is_same_v<T, float>) {
        v0 = _mm512_loadu_ps(v + c * ldv + i0);
        v1 = _mm512_loadu_ps(v + c * ldv + i0 + 16);
      } else {
        const __m512i w = _mm512_loadu_si512(v + c * ldv + i0);
        v0 = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        v1 = _mm512_castsi512_ps(_mm512_and_si512(w, odd));
      }
      const float* pc = p + static_cast<int64_t>(c) * ROWS;
      for (int r = 0; r < ROWS; ++r) {
        const __m512 pr = _mm512_set1_ps(pc[r]);
        lo[r] = _mm512_fmadd_ps(pr, v0, lo[r]);
        hi[r] = _mm512_fmadd_ps(pr, v1, hi[r]);
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      _mm512_storeu_ps(acc + r * d + i0, lo[r]);
      _mm512_storeu_ps(acc + r * d + i0 + 16, hi[r]);
    }
  }
  if (pf_row < pf_end) {  // lines the passes did not reach (see small_pv_rows_avx2)
    for (int c = pf_row; c < pf_end; ++c) prefetch_key_row(v + c * ldv, d);
  }
}

// acc [ROWS x D] += p v (p transposed [n x ROWS]) for an fp32 or bf16 cache (acc in order), with every row's D columns
// in registers: V read once, key after key, in address order, which the hardware prefetchers
// follow (no software prefetch). For the AVX2 decode family (decode_avx512_preferred() false):
// on Zen 4 one query over 3,584 keys, d 128, read at 0.79-0.87 of copy bandwidth with it against
// 0.70-0.73 with the AVX2 P V (chunks of 32 keys in 8 passes of 16 columns, prefetched).
// Aligned to a 64-byte line, so that its loops' placement moves with the function only: on Zen 4
// an unrelated change that left pv_stream<3, 128, float> 32 bytes past a line made a 3-row fp32
// decode step over 4,608 keys 1.5x slower from memory (1.6-1.8 -> 2.4-2.7 ms; aligned, 1.6 again).
template <int ROWS, int D, typename T>
BEACON_DECODE_AVX512_TARGET __attribute__((aligned(64))) void pv_stream(const float* p, int n, const T* v,
                                                                        int64_t ldv, float* acc) {
  constexpr int NV = D / 16;
  static_assert(ROWS * NV <= 24, "accumulators in registers");
  __m512 a[ROWS][NV];
  for (int r = 0; r < ROWS; ++r)
    for (int i = 0; i < NV; ++i) a[r][i] = _mm512_loadu_ps(acc + r * D + 16 * i);
  for (int c = 0; c < n; ++c) {
    const T* vr = v + c * ldv;
    const float* pc = p + static_cast<int64_t>(c) * ROWS;
    for (int i = 0; i < NV; ++i) {
      __m512 vi;
      if constexpr (std::is_same_v<T, float>)
        vi = _mm512_loadu_ps(vr + 16 * i);
      else  // 16 bf16 widened in order
        vi = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + 16 * i))), 16));
      for (int r = 0; r < ROWS; ++r) a[r][i] = _mm512_fmadd_ps(_mm512_set1_ps(pc[r]), vi, a[r][i]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc + r * D + 16 * i, a[r][i]);
}

// pv_stream for 1-3 rows at d 128, 1-6 at d 64 (use_decode_pv_stream said so).
template <typename T>
inline void decode_pv_stream(const float* p, int rows, int n, const T* v, int64_t ldv, int d, float* acc) {
  if (d == 128) {
    switch (rows) {
      case 1: pv_stream<1, 128>(p, n, v, ldv, acc); return;
      case 2: pv_stream<2, 128>(p, n, v, ldv, acc); return;
      default: pv_stream<3, 128>(p, n, v, ldv, acc); return;
    }
  }
  switch (rows) {
    case 1: pv_stream<1, 64>(p, n, v, ldv, acc); return;
    case 2: pv_stream<2, 64>(p, n, v, ldv, acc); return;
    case 3: pv_stream<3, 64>(p, n, v, ldv, acc); return;
    case 4: pv_stream<4, 64>(p, n, v, ldv, acc); return;
    case 5: pv_stream<5, 64>(p, n, v, ldv, acc); return;
    default: pv_stream<6, 64>(p, n, v, ldv, acc); return;
  }
}

// acc [ROWS x d] += p v (p transposed [n x ROWS]); bf16: acc in 32-split column order (each 32
// columns: the even 16, then the odd 16; merge_columns(acc, rows, d, 32) undoes it): a 64-byte
// load of V is widened by one shift (even columns) and one mask (odd); fp32: in order. Chunks of kPvChunkKeys
// keys stay in L1 while 32 columns of every row are accumulated in registers per pass, and the
// next chunk is prefetched a line per key visited (as small_pv_rows_avx2).
template <int ROWS, typename T>
BEACON_DECODE_AVX512_TARGET void decode_pv_rows(const float* p, int n, const T* v, int64_t ldv, int d,
                                                float* acc) {
  for (int c = 0; c < std::min(n, kPvChunkKeys); ++c) prefetch_key_row(v + c * ldv, d);
  for (int c0 = 0; c0 < n; c0 += kPvChunkKeys) {
    const int c1 = std::min(n, c0 + kPvChunkKeys);
    pv_chunk<ROWS>(p, c0, c1, std::min(n, c1 + kPvChunkKeys), v, ldv, d, acc);
  }
}

// P V of a bf16 decode tile by bf16 dot products, where Q K^T takes decode_qk_bf16 (no AMX):
// on Zen 4 (vdpbf16ps at the rate of an fp32 FMA, 32 products each against 16) the 4-row step's
// widen-and-FMA P V was most of its instructions, and the step ran at 0.6 of copy bandwidth from
// memory with ~0.7 of its time spent the same from the CPU caches. P is rounded to bf16 (as the
// prefill's bf16 P V and flash attention's GPU kernels do) and taken two keys at a time: pp
// below holds (p[c][r], p[c + 1][r]) for every row, V rows c and c + 1 are interleaved by
// vpunpck{l,h}wd, so that each accumulator lane sums one column over both keys. acc is then
// kept in the pairs' column order (each 32 columns: 8l + j and 8l + 4 + j for lane l, j < 4,
// the two halves; unpair_columns undoes it). d 64 or 128.
inline bool use_decode_pv_pairs(int rows, int d) {
  return use_decode_bf16(rows, d) && !cpu_has(Isa::kAmx) && (d == 64 || d == 128);
}

// pp[(c / 2) * ROWS + r] = bf16(p[c][r]) | bf16(p[c + 1][r]) << 16 for c = 0, 2, ..., the key
// after an odd n 0; p transposed [n x ROWS]. Four keys a time: their scores (at most 28 floats)
// in two masked loads, each pair's low and high halves gathered by vpermt2ps, rounded together
// (vcvtne2ps2bf16) and interleaved (vpermw).
template <int ROWS>
BEACON_DECODE_BF16_TARGET inline void pack_p_pairs(const float* p, int n, uint32_t* pp) {
  alignas(64) int32_t lo_idx[16], hi_idx[16];
  for (int j = 0; j < 16; ++j) {  // out dword j: pair j / ROWS of the four keys, row j % ROWS
    const int pair = j / ROWS < 2 ? j / ROWS : 1, r = j % ROWS;
    lo_idx[j] = (2 * pair) * ROWS + r;
    hi_idx[j] = (2 * pair + 1) * ROWS + r;
  }
  alignas(64) int16_t mix_idx[32];
  for (int j = 0; j < 16; ++j)  // word 2j from the low half (key c), 2j + 1 from the high (key c + 1)
    mix_idx[2 * j] = static_cast<int16_t>(j), mix_idx[2 * j + 1] = static_cast<int16_t>(16 + j);
  const __m512i lo_i = _mm512_load_si512(lo_idx), hi_i = _mm512_load_si512(hi_idx);
  const __m512i mix = _mm512_load_si512(mix_idx);
  for (int c = 0; c < n; c += 4) {
    const int floats = std::min(4, n - c) * ROWS;  // the rest of the group is zero
    const __mmask16 m0 = floats >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << floats) - 1u);
    const __mmask16 m1 = floats <= 16 ? __mmask16(0) : static_cast<__mmask16>((1u << (floats - 16)) - 1u);
    const float* pc = p + static_cast<int64_t>(c) * ROWS;
    const __m512 x0 = _mm512_maskz_loadu_ps(m0, pc), x1 = _mm512_maskz_loadu_ps(m1, pc + 16);
    const __m512 lo = _mm512_permutex2var_ps(x0, lo_i, x1), hi = _mm512_permutex2var_ps(x0, hi_i, x1);
    const __m512i w = _mm512_permutexvar_epi16(mix, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    const int pairs = (std::min(4, n - c) + 1) / 2;
    const __mmask16 keep = static_cast<__mmask16>((1u << (pairs * ROWS)) - 1u);
    _mm512_mask_storeu_epi32(pp + static_cast<int64_t>(c / 2) * ROWS, keep, w);
  }
}

// Keys c0 .. c1 - 1 (c0 even) of decode_pv_pairs_rows, CB columns of every row in registers per
// pass, prefetching the keys after the chunk up to pf_end (as pv_chunk: the chunk's lines over
// its visits).
template <int ROWS, int CB>
BEACON_DECODE_BF16_TARGET inline void pv_pairs_chunk(const uint32_t* pp, int c0, int c1, int n, int pf_end,
                                                     const uint16_t* v, int64_t ldv, int d, float* acc) {
  constexpr int G = CB / 32;  // 32-column groups per pass
  const int row_lines = d * 2 / 64;
  const int lines_per_visit = std::max(1, row_lines * 2 * CB / d);  // two rows a visit
  int pf_row = c1, pf_line = 0;
  for (int i0 = 0; i0 < d; i0 += CB) {
    __m512 lo[ROWS][G], hi[ROWS][G];
    for (int r = 0; r < ROWS; ++r)
      for (int g = 0; g < G; ++g) {
        lo[r][g] = _mm512_loadu_ps(acc + r * d + i0 + 32 * g);
        hi[r][g] = _mm512_loadu_ps(acc + r * d + i0 + 32 * g + 16);
      }
    for (int c = c0; c < c1; c += 2) {
      for (int l = 0; l < lines_per_visit && pf_row < pf_end; ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(v + pf_row * ldv) + 64 * pf_line, _MM_HINT_T0);
        if (++pf_line == row_lines) pf_line = 0, ++pf_row;
      }
      const uint16_t* va = v + c * ldv + i0;
      const uint16_t* vb = c + 1 < n ? va + ldv : va;  // a missing key's p is 0
      __m512bh plo[G], phi[G];
      for (int g = 0; g < G; ++g) {
        const __m512i a = _mm512_loadu_si512(va + 32 * g), b = _mm512_loadu_si512(vb + 32 * g);
        plo[g] = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
        phi[g] = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
      }
      const uint32_t* pc = pp + static_cast<int64_t>(c / 2) * ROWS;
      for (int r = 0; r < ROWS; ++r) {
        const __m512bh pr = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pc[r])));
        for (int g = 0; g < G; ++g) {
          lo[r][g] = _mm512_dpbf16_ps(lo[r][g], plo[g], pr);
          hi[r][g] = _mm512_dpbf16_ps(hi[r][g], phi[g], pr);
        }
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int g = 0; g < G; ++g) {
        _mm512_storeu_ps(acc + r * d + i0 + 32 * g, lo[r][g]);
        _mm512_storeu_ps(acc + r * d + i0 + 32 * g + 16, hi[r][g]);
      }
  }
  if (pf_row < pf_end)
    for (int c = pf_row; c < pf_end; ++c) prefetch_key_row(v + c * ldv, d);
}

// acc [ROWS x d] += p v (p transposed [n x ROWS]) in the pairs' column order; pp: scratch for
// (n + 1) / 2 * ROWS words. Where d takes more than one pass, chunks of kPvChunkKeys keys, as
// decode_pv_rows.
template <int ROWS>
BEACON_DECODE_BF16_TARGET __attribute__((aligned(64))) void decode_pv_pairs_rows(const float* p, int n,
                                                                                 const uint16_t* v, int64_t ldv,
                                                                                 int d, float* acc, uint32_t* pp) {
  pack_p_pairs<ROWS>(p, n, pp);
  // Registers: ROWS x CB / 16 accumulators (16 for 4 rows at 64 columns a pass).
  constexpr int CB = ROWS <= 2 ? 128 : ROWS <= 4 ? 64 : 32;
  if constexpr (CB >= 64) {
    if (CB >= d) {  // one pass: V key after key, the hardware prefetchers alone (as pv_stream; Zen
      // 4, 3 rows at d 64: 0.18 ms against 0.20 with the chunks' prefetches)
      if constexpr (CB == 128) {
        if (d == 128) return pv_pairs_chunk<ROWS, 128>(pp, 0, n, n, n, v, ldv, d, acc);
      }
      return pv_pairs_chunk<ROWS, 64>(pp, 0, n, n, n, v, ldv, d, acc);
    }
  }
  for (int c = 0; c < std::min(n, kPvChunkKeys); ++c) prefetch_key_row(v + c * ldv, d);
  for (int c0 = 0; c0 < n; c0 += kPvChunkKeys) {
    const int c1 = std::min(n, c0 + kPvChunkKeys);
    pv_pairs_chunk<ROWS, CB>(pp, c0, c1, n, std::min(n, c1 + kPvChunkKeys), v, ldv, d, acc);
  }
}

inline void decode_pv_pairs(const float* p, int rows, int n, const uint16_t* v, int64_t ldv, int d, float* acc,
                            uint32_t* pp) {
  switch (rows) {
    case 1: decode_pv_pairs_rows<1>(p, n, v, ldv, d, acc, pp); return;
    case 2: decode_pv_pairs_rows<2>(p, n, v, ldv, d, acc, pp); return;
    case 3: decode_pv_pairs_rows<3>(p, n, v, ldv, d, acc, pp); return;
    case 4: decode_pv_pairs_rows<4>(p, n, v, ldv, d, acc, pp); return;
    case 5: decode_pv_pairs_rows<5>(p, n, v, ldv, d, acc, pp); return;
    case 6: decode_pv_pairs_rows<6>(p, n, v, ldv, d, acc, pp); return;
    default: decode_pv_pairs_rows<7>(p, n, v, ldv, d, acc, pp); return;
  }
}

// The two kernels for 1-7 rows (use_decode_bf16 said so).
inline void decode_qk_bf16(const uint16_t* q, int rows, int d, const uint16_t* k, int64_t ldk, int n,
                           float alpha, float* s) {
  switch (rows) {
    case 1: decode_qk_bf16_rows<1>(q, d, k, ldk, n, alpha, s); return;
    case 2: decode_qk_bf16_rows<2>(q, d, k, ldk, n, alpha, s); return;
    case 3: decode_qk_bf16_rows<3>(q, d, k, ldk, n, alpha, s); return;
    case 4: decode_qk_bf16_rows<4>(q, d, k, ldk, n, alpha, s); return;
    case 5: decode_qk_bf16_rows<5>(q, d, k, ldk, n, alpha, s); return;
    case 6: decode_qk_bf16_rows<6>(q, d, k, ldk, n, alpha, s); return;
    default: decode_qk_bf16_rows<7>(q, d, k, ldk, n, alpha, s); return;
  }
}
template <typename T>
inline void decode_pv_t(const float* p, int rows, int n, const T* v, int64_t ldv, int d, float* acc) {
  switch (rows) {
    case 1: decode_pv_rows<1>(p, n, v, ldv, d, acc); return;
    case 2: decode_pv_rows<2>(p, n, v, ldv, d, acc); return;
    case 3: decode_pv_rows<3>(p, n, v, ldv, d, acc); return;
    case 4: decode_pv_rows<4>(p, n, v, ldv, d, acc); return;
    case 5: decode_pv_rows<5>(p, n, v, ldv, d, acc); return;
    case 6: decode_pv_rows<6>(p, n, v, ldv, d, acc); return;
    default: decode_pv_rows<7>(p, n, v, ldv, d, acc); return;
  }
}
inline void decode_pv_bf16(const float* p, int rows, int n, const uint16_t* v, int64_t ldv, int d,
                           float* acc) {
  decode_pv_t(p, rows, n, v, ldv, d, acc);
}

// The fp32 kernels for 1-7 rows (use_decode_f32 said so): s [n x rows] = alpha * k q^T, q fp32
// rows in order; acc [rows x d] += p v, acc in order.
inline void decode_qk_f32(const float* q, int rows, int d, const float* k, int64_t ldk, int n, float alpha,
                          float* s) {
  switch (rows) {
    case 1: decode_qk_f32_rows<1>(q, d, k, ldk, n, alpha, s); return;
    case 2: decode_qk_f32_rows<2>(q, d, k, ldk, n, alpha, s); return;
    case 3: decode_qk_f32_rows<3>(q, d, k, ldk, n, alpha, s); return;
    case 4: decode_qk_f32_rows<4>(q, d, k, ldk, n, alpha, s); return;
    case 5: decode_qk_f32_rows<5>(q, d, k, ldk, n, alpha, s); return;
    case 6: decode_qk_f32_rows<6>(q, d, k, ldk, n, alpha, s); return;
    default: decode_qk_f32_rows<7>(q, d, k, ldk, n, alpha, s); return;
  }
}
inline void decode_pv_f32(const float* p, int rows, int n, const float* v, int64_t ldv, int d, float* acc) {
  decode_pv_t(p, rows, n, v, ldv, d, acc);
}

// Q K^T of a decode tile on AMX tiles (cpu_isa() level amx): S^T for 16 keys = K's 16 rows (read
// from the cache as tile A, 32 bf16 a row) times Q^T in pairs (tile B, 16 pair rows x `rows`
// words), per 32 columns of d. A tile product costs about the same for 1-16 columns of B, so a
// decode tile's few rows take ~3-4 ns a key (d 128, 4 rows, K in L2) where decode_qk_bf16_rows
// took ~20: on this machine kind vdpbf16ps ran at a quarter of the fp32 FMA instruction rate
// (12 independent chains, registers only). Same products and pair sums as decode_qk_bf16_rows
// (each pair product exact, added in fp32).
#define BEACON_DECODE_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))
// The tile intrinsics are inline asm whose memory operands the compiler does not see (amx_gemm.h).
#define BEACON_DECODE_AMX_BARRIER() __asm__ volatile("" ::: "memory")

// Whether a decode tile's Q K^T takes decode_qk_amx (d up to 8 chunks of 32: tiles 1-7 below).
inline bool use_decode_amx(int rows, int d) {
  return use_decode_bf16(rows, d) && d <= 256 && cpu_has(Isa::kAmx);
}

// Tiles (amx_gemm.h's TileConfig, narrowed): 0: S^T of 16 keys (16 x rows fp32); 1, 2: K chunks
// (16 keys x 32 bf16), alternating; 3-7: Q^T's pair chunks (16 pair rows x rows words), resident
// when d has at most 5 chunks, else reloaded per chunk into tiles 3 and 4.

// The tile intrinsics take tile numbers as literal tokens: these map template arguments to them.
template <int T>
BEACON_DECODE_AMX_TARGET inline void tile_load(const void* p, int64_t stride) {
  static_assert(T >= 1 && T <= 7);
  if constexpr (T == 1) _tile_loadd(1, p, stride);
  else if constexpr (T == 2) _tile_loadd(2, p, stride);
  else if constexpr (T == 3) _tile_loadd(3, p, stride);
  else if constexpr (T == 4) _tile_loadd(4, p, stride);
  else if constexpr (T == 5) _tile_loadd(5, p, stride);
  else if constexpr (T == 6) _tile_loadd(6, p, stride);
  else _tile_loadd(7, p, stride);
}
// tile 0 += tile A times tile B (A in {1, 2}, B in 3-7).
template <int A, int B>
BEACON_DECODE_AMX_TARGET inline void tile_dp() {
  static_assert((A == 1 || A == 2) && B >= 3 && B <= 7);
  if constexpr (A == 1) {
    if constexpr (B == 3) _tile_dpbf16ps(0, 1, 3);
    else if constexpr (B == 4) _tile_dpbf16ps(0, 1, 4);
    else if constexpr (B == 5) _tile_dpbf16ps(0, 1, 5);
    else if constexpr (B == 6) _tile_dpbf16ps(0, 1, 6);
    else _tile_dpbf16ps(0, 1, 7);
  } else {
    if constexpr (B == 3) _tile_dpbf16ps(0, 2, 3);
    else if constexpr (B == 4) _tile_dpbf16ps(0, 2, 4);
    else if constexpr (B == 5) _tile_dpbf16ps(0, 2, 5);
    else if constexpr (B == 6) _tile_dpbf16ps(0, 2, 6);
    else _tile_dpbf16ps(0, 2, 7);
  }
}

// Chunks C .. CH - 1 of 16 keys' S^T, accumulated in tile 0.
template <int C, int CH>
BEACON_DECODE_AMX_TARGET inline void qk_amx_chunks(const uint16_t* k, int64_t k_bytes, const uint32_t* qp,
                                                   int rows) {
  if constexpr (C < CH) {
    constexpr int a = 1 + C % 2;
    tile_load<a>(k + 32 * C, k_bytes);
    if constexpr (CH <= 5) {
      tile_dp<a, 3 + C>();
    } else {
      tile_load<3 + C % 2>(qp + 16 * C * rows, rows * 4);
      tile_dp<a, 3 + C % 2>();
    }
    qk_amx_chunks<C + 1, CH>(k, k_bytes, qp, rows);
  }
}

template <int C, int CH>
BEACON_DECODE_AMX_TARGET inline void load_q_tiles(const uint32_t* qp, int rows) {
  if constexpr (C < CH) {
    tile_load<3 + C>(qp + 16 * C * rows, rows * 4);
    load_q_tiles<C + 1, CH>(qp, rows);
  }
}

// s [n16 x rows] = k q^T (unscaled) for n16 keys, a multiple of 16; qp [d / 2 x rows] Q^T's pairs.
// Tiles configured for a decode tile's `rows`, Q^T's chunks loaded where they stay resident.
template <int CH>
BEACON_DECODE_AMX_TARGET inline void start_qk_tiles(const uint32_t* qp, int rows) {
  beacon_cpu::amx::TileConfig cfg;  // tiles 0-7: 16 rows x 64 bytes
  for (int t : {0, 3, 4, 5, 6, 7}) cfg.colsb[t] = static_cast<uint16_t>(rows * 4);
  BEACON_DECODE_AMX_BARRIER();
  _tile_loadconfig(&cfg);
  if constexpr (CH <= 5) load_q_tiles<0, CH>(qp, rows);
}
BEACON_DECODE_AMX_TARGET inline void end_qk_tiles() {
  _tile_release();
  BEACON_DECODE_AMX_BARRIER();
}

// s [16 x rows] = k q^T (unscaled) for the 16 keys from k; tiles started.
template <int CH>
BEACON_DECODE_AMX_TARGET inline void qk_amx_16(const uint32_t* qp, int rows, const uint16_t* k, int64_t ldk,
                                               float* s) {
  // The next 16 keys (as decode_qk_bf16_rows): without it a cold cache ran ~10% slower.
  for (int j = 0; j < 16; ++j) prefetch_key_row(k + (16 + j) * ldk, 32 * CH);
  _tile_zero(0);
  qk_amx_chunks<0, CH>(k, ldk * 2, qp, rows);
  _tile_stored(0, s, rows * 4);
}

template <int CH>
BEACON_DECODE_AMX_TARGET void decode_qk_amx_tiles(const uint32_t* qp, int rows, const uint16_t* k,
                                                  int64_t ldk, int n16, float* s) {
  start_qk_tiles<CH>(qp, rows);
  for (int c = 0; c < n16; c += 16) qk_amx_16<CH>(qp, rows, k + c * ldk, ldk, s + static_cast<int64_t>(c) * rows);
  end_qk_tiles();
}

// P V of one key block (decode_pv_rows) with Q K^T of the next block's first n16 keys
// (decode_qk_amx_tiles) between its chunks, at the same pace: one core's demand reads of two
// streams at once (this block's V, the next block's K) ran faster than of one after the other
// (bf16 decode over 3,584 keys, d 128: 0.77 -> 0.80 of copy bandwidth, medians of 6; a third
// stream, the next block's K in two halves, gained nothing more; V prefetched into L2 during
// Q K^T instead lost 7%).
template <int ROWS, int CH>
BEACON_DECODE_AMX_TARGET void decode_pv_qk_amx_tiles(const float* p, int n, const uint16_t* v, int64_t ldv,
                                                     float* acc, const uint32_t* qp, const uint16_t* k,
                                                     int64_t ldk, int n16, float* s) {
  constexpr int d = 32 * CH;
  start_qk_tiles<CH>(qp, ROWS);
  for (int c = 0; c < std::min(n, kPvChunkKeys); ++c) prefetch_key_row(v + c * ldv, d);
  int kc = 0;  // the next block's keys done
  for (int c0 = 0; c0 < n; c0 += kPvChunkKeys) {
    const int c1 = std::min(n, c0 + kPvChunkKeys);
    for (; kc < std::min(n16, c1); kc += 16)
      qk_amx_16<CH>(qp, ROWS, k + kc * ldk, ldk, s + static_cast<int64_t>(kc) * ROWS);
    pv_chunk<ROWS>(p, c0, c1, std::min(n, c1 + kPvChunkKeys), v, ldv, d, acc);
  }
  for (; kc < n16; kc += 16) qk_amx_16<CH>(qp, ROWS, k + kc * ldk, ldk, s + static_cast<int64_t>(kc) * ROWS);
  end_qk_tiles();
}

// s [n x rows] *= alpha for the first n16 keys, then the last n % 16 keys by decode_qk_bf16.
inline void finish_qk_amx(const uint16_t* q, int rows, int d, const uint16_t* k, int64_t ldk, int n, int n16,
                          float alpha, float* s) {
  const int64_t m = static_cast<int64_t>(n16) * rows;
  for (int64_t i = 0; i < m; ++i) s[i] *= alpha;
  if (n > n16)
    decode_qk_bf16(q, rows, d, k + n16 * ldk, ldk, n - n16, alpha, s + static_cast<int64_t>(n16) * rows);
}

// s [n x rows] = alpha * k q^T as decode_qk_bf16 (which takes the last n % 16 keys); qp: Q^T's
// pairs (pack_rows_pairs_transposed), q: the same rows in bf16. use_decode_amx said so.
inline void decode_qk_amx(const uint32_t* qp, const uint16_t* q, int rows, int d, const uint16_t* k,
                          int64_t ldk, int n, float alpha, float* s) {
  const int n16 = n & ~15;
  if (n16 > 0) {
    switch (d / 32) {
      case 1: decode_qk_amx_tiles<1>(qp, rows, k, ldk, n16, s); break;
      case 2: decode_qk_amx_tiles<2>(qp, rows, k, ldk, n16, s); break;
      case 3: decode_qk_amx_tiles<3>(qp, rows, k, ldk, n16, s); break;
      case 4: decode_qk_amx_tiles<4>(qp, rows, k, ldk, n16, s); break;
      case 5: decode_qk_amx_tiles<5>(qp, rows, k, ldk, n16, s); break;
      case 6: decode_qk_amx_tiles<6>(qp, rows, k, ldk, n16, s); break;
      case 7: decode_qk_amx_tiles<7>(qp, rows, k, ldk, n16, s); break;
      default: decode_qk_amx_tiles<8>(qp, rows, k, ldk, n16, s); break;
    }
  }
  finish_qk_amx(q, rows, d, k, ldk, n, n16, alpha, s);
}

// Whether decode_pv_qk_amx takes a tile (the head dims of the models in use: instantiations
// are rows x head dims).
inline bool use_decode_pv_qk(int rows, int d) { return use_decode_amx(rows, d) && (d == 64 || d == 128); }

template <int CH>
inline void decode_pv_qk_amx_rows(const float* p, int rows, int n, const uint16_t* v, int64_t ldv, float* acc,
                                  const uint32_t* qp, const uint16_t* k, int64_t ldk, int n16, float* s) {
  switch (rows) {
    case 1: decode_pv_qk_amx_tiles<1, CH>(p, n, v, ldv, acc, qp, k, ldk, n16, s); return;
    case 2: decode_pv_qk_amx_tiles<2, CH>(p, n, v, ldv, acc, qp, k, ldk, n16, s); return;
    case 3: decode_pv_qk_amx_tiles<3, CH>(p, n, v, ldv, acc, qp, k, ldk, n16, s); return;
    case 4: decode_pv_qk_amx_tiles<4, CH>(p, n, v, ldv, acc, qp, k, ldk, n16, s); return;
    case 5: decode_pv_qk_amx_tiles<5, CH>(p, n, v, ldv, acc, qp, k, ldk, n16, s); return;
    case 6: decode_pv_qk_amx_tiles<6, CH>(p, n, v, ldv, acc, qp, k, ldk, n16, s); return;
    default: decode_pv_qk_amx_tiles<7, CH>(p, n, v, ldv, acc, qp, k, ldk, n16, s); return;
  }
}

// acc += p v over n keys (decode_pv_bf16), and s [n_next x rows] = alpha * k_next q^T
// (decode_qk_amx) for the next key block, the two interleaved (decode_pv_qk_amx_tiles).
// use_decode_pv_qk said so.
inline void decode_pv_qk_amx(const float* p, int rows, int n, const uint16_t* v, int64_t ldv, int d, float* acc,
                             const uint32_t* qp, const uint16_t* q, const uint16_t* k_next, int64_t ldk,
                             int n_next, float alpha, float* s_next) {
  const int n16 = n_next & ~15;
  if (d == 64) decode_pv_qk_amx_rows<2>(p, rows, n, v, ldv, acc, qp, k_next, ldk, n16, s_next);
  else decode_pv_qk_amx_rows<4>(p, rows, n, v, ldv, acc, qp, k_next, ldk, n16, s_next);
  finish_qk_amx(q, rows, d, k_next, ldk, n_next, n16, alpha, s_next);
}
#undef BEACON_DECODE_AMX_BARRIER
#undef BEACON_DECODE_AMX_TARGET
#pragma GCC diagnostic pop
#undef BEACON_DECODE_BF16_TARGET
#undef BEACON_DECODE_AVX512_TARGET
#else
// Not compiled here (no x86, or the bf16 dot products emulated): never taken.
inline bool use_decode_f32(int, int) { return false; }
inline bool use_decode_pv_stream(int, int) { return false; }
template <typename T>
inline void decode_pv_stream(const float*, int, int, const T*, int64_t, int, float*) {}
inline void decode_qk_f32(const float*, int, int, const float*, int64_t, int, float, float*) {}
inline void decode_pv_f32(const float*, int, int, const float*, int64_t, int, float*) {}
inline bool use_decode_bf16(int, int) { return false; }
inline bool use_decode_qk_bf16(int, int) { return false; }
inline void decode_qk_bf16(const uint16_t*, int, int, const uint16_t*, int64_t, int, float, float*) {}
inline void decode_pv_bf16(const float*, int, int, const uint16_t*, int64_t, int, float*) {}
inline bool use_decode_amx(int, int) { return false; }
inline bool use_decode_pv_pairs(int, int) { return false; }
inline void decode_pv_pairs(const float*, int, int, const uint16_t*, int64_t, int, float*, uint32_t*) {}
inline void decode_qk_amx(const uint32_t*, const uint16_t*, int, int, const uint16_t*, int64_t, int, float,
                          float*) {}
inline bool use_decode_pv_qk(int, int) { return false; }
inline void decode_pv_qk_amx(const float*, int, int, const uint16_t*, int64_t, int, float*, const uint32_t*,
                             const uint16_t*, const uint16_t*, int64_t, int, float, float*) {}
#endif

}  // namespace beacon::cpu::attn

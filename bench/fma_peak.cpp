// One core's arithmetic ceiling: fp32 FMA GFLOP/s with 256-bit and 512-bit vectors, and bf16 dot
// products (vdpbf16ps) where the CPU has them; 12 independent chains in registers, no memory.
// The attention benchmark's ratios are against measured peers (a matmul, a copy); this is the
// bound none of them can pass (e.g. the useful GF/s a 2x lead over FlexAttention would need).
// Plain C++, x86-64 only: `make bench-peak`.
#include <immintrin.h>

#include <chrono>
#include <cstdio>

namespace {

constexpr long kIters = 100000000;
constexpr int kChains = 12;
volatile float sink;  // the chains' results, so that the loops are kept

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

__attribute__((target("avx2,fma"))) double fma256() {
  __m256 a[kChains];
  const __m256 b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < kChains; ++i) a[i] = _mm256_set1_ps(static_cast<float>(i));
  const auto t0 = std::chrono::steady_clock::now();
  for (long n = 0; n < kIters; ++n)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  const double s = seconds_since(t0);
  for (int i = 0; i < kChains; ++i) sink = sink + a[i][0];
  return 2.0 * 8 * kChains * kIters / s / 1e9;
}

__attribute__((target("avx512f"))) double fma512() {
  __m512 a[kChains];
  const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  const auto t0 = std::chrono::steady_clock::now();
  for (long n = 0; n < kIters; ++n)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  const double s = seconds_since(t0);
  for (int i = 0; i < kChains; ++i) sink = sink + _mm512_reduce_add_ps(a[i]);
  return 2.0 * 16 * kChains * kIters / s / 1e9;
}

// vdpbf16ps: 32 products a 512-bit instruction, counted as 2 FLOP each.
__attribute__((target("avx512f,avx512bf16"))) double dpbf16() {
  __m512 a[kChains];
  const __m512bh b = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x3f803f80));
  const __m512bh c = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x33803380));
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  const auto t0 = std::chrono::steady_clock::now();
  for (long n = 0; n < kIters; ++n)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm512_dpbf16_ps(a[i], b, c);
  const double s = seconds_since(t0);
  for (int i = 0; i < kChains; ++i) sink = sink + _mm512_reduce_add_ps(a[i]);
  return 2.0 * 32 * kChains * kIters / s / 1e9;
}

}  // namespace

int main() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("this CPU has no AVX2 + FMA: nothing to measure\n");
    return 0;
  }
  std::printf("fp32 FMA, 256-bit: %.1f GFLOP/s\n", fma256());
  if (__builtin_cpu_supports("avx512f")) std::printf("fp32 FMA, 512-bit: %.1f GFLOP/s\n", fma512());
  if (__builtin_cpu_supports("avx512bf16"))
    std::printf("bf16 dot products (vdpbf16ps, 512-bit): %.1f GFLOP/s\n", dpbf16());
  return 0;
}

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

// Each kernel runs kIters rounds of kChains independent multiply-adds in registers and returns
// their sum, so that the loop is kept.
__attribute__((target("avx2,fma"))) float fma256() {
  __m256 a[kChains];
  const __m256 b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < kChains; ++i) a[i] = _mm256_set1_ps(static_cast<float>(i));
  for (long n = 0; n < kIters; ++n)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  float sum = 0;
  for (int i = 0; i < kChains; ++i) sum += a[i][0];
  return sum;
}

__attribute__((target("avx512f"))) float fma512() {
  __m512 a[kChains];
  const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  for (long n = 0; n < kIters; ++n)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  float sum = 0;
  for (int i = 0; i < kChains; ++i) sum += _mm512_cvtss_f32(a[i]);
  return sum;
}

// vdpbf16ps: 32 products a 512-bit instruction; the accumulators start as the FMA kernels' do.
__attribute__((target("avx512f,avx512bf16"))) float dpbf16() {
  __m512 a[kChains];
  const __m512bh b = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x3f803f80));
  const __m512bh c = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x33803380));
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  for (long n = 0; n < kIters; ++n)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm512_dpbf16_ps(a[i], b, c);
  float sum = 0;
  for (int i = 0; i < kChains; ++i) sum += _mm512_cvtss_f32(a[i]);
  return sum;
}

volatile float sink;

// GFLOP/s of a kernel doing `lanes` multiply-adds (2 FLOP each) an instruction.
double gflops(float (*kernel)(), int lanes) {
  const auto t0 = std::chrono::steady_clock::now();
  sink = kernel();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 2.0 * lanes * kChains * kIters / s / 1e9;
}

}  // namespace

int main() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("this CPU has no AVX2 + FMA: nothing to measure\n");
    return 0;
  }
  std::printf("fp32 FMA, 256-bit: %.1f GFLOP/s\n", gflops(fma256, 8));
  if (__builtin_cpu_supports("avx512f")) std::printf("fp32 FMA, 512-bit: %.1f GFLOP/s\n", gflops(fma512, 16));
  if (__builtin_cpu_supports("avx512bf16"))
    std::printf("bf16 dot products (vdpbf16ps, 512-bit): %.1f GFLOP/s\n", gflops(dpbf16, 32));
  return 0;
}

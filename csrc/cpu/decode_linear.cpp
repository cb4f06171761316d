// CPU kernel of torch.ops.beacon.decode_linear: y = x W^T (+ b) for the few rows of a decode
// step, reading each weight once, straight through.
//
// Why: a decode step multiplies one row (a few with a batch) by every weight matrix of the
// model, so it is bound by how fast the weights stream from memory, and torch's one-row
// F.linear reads them well below that on some machines (SmolLM2's 576-wide matrices, bf16 on an
// AMX Xeon: 7.7 GB/s where one core reads 14; fp32 on AMD Zen 4: 11 GB/s where it reads 28).
// Threads take chunks of at least kTaskBytes of weights. Products accumulate in fp32, the bias is
// added in fp32 and the result is rounded once to x's dtype, as F.linear does (the sums' order
// differs, so the last bits may too).
//   fp32, fp16   AVX2 + FMA (fp16 widened by F16C)
//   bf16         AVX-512-BF16 dot products of pairs (vdpbf16ps, fp32 accumulation, as torch's
//                bf16 GEMMs): 512-bit on Intel, 256-bit on AMD (Zen 4 runs 512-bit operations
//                as two halves; cpu_isa.h); without it, widened to fp32 for AVX2 FMAs.
// The AVX2 kernel reads one weight row at a time, start to end, and multiplies it by every x row
// while it is in L1: the weights are one sequential stream, which the hardware prefetchers keep
// up with. (Four rows side by side, four streams a row apart, measured 0.89x (fp32) and 1.02-1.13x
// (bf16) of F.linear's time on Zen 3, the one-row kernel 0.80x and 0.74x; software prefetches
// added nothing to it there; bench/decode_linear.py.) The dot-product kernel takes four rows a
// pass and prefetches the blocks kPrefetchBlocks on (SmolLM2's weights on an AMX Xeon: one row
// 0.67 -> 0.59 of F.linear's time, four rows 0.97-1.03 -> 0.73; two x rows a weight load instead
// measured slower, 0.81 at four rows).
// Without AVX2 (the portable level), and for fp32 on Intel CPUs (fp32_by_blas), the op is at::linear.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>

#include "cpu/cpu_isa.h"
#include "op_checks.h"

namespace {

constexpr const char* kOp = "beacon.decode_linear";
constexpr int kRowBlock = 4;                        // rows a block: a dot-product pass; tasks' unit
constexpr int64_t kTaskBytes = int64_t{256} << 10;  // weight bytes a thread takes at least
constexpr int kPrefetchBlocks = 2;                  // dot products: blocks prefetched ahead

#ifdef BEACON_CPU_X86
// GCC 12 warns falsely inside masked loads and _mm512_reduce_add_ps (its headers' placeholders,
// "__Y = __Y").
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define BEACON_DL_AVX2 __attribute__((target("avx2,fma,f16c")))
#define BEACON_DL_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Eight weights as fp32.
BEACON_DL_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
BEACON_DL_AVX2 inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
BEACON_DL_AVX2 inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The `bytes` (a multiple of 64) at p into L1, unless they run past `end`, the end of the
// range's weights (beyond it lie another thread's rows, or nothing mapped). always_inline: left
// out of line, GCC 12 found it free of side effects and deleted its calls, prefetches and all
// (python_tests/test_build.py checks that the kernels keep them).
__attribute__((always_inline)) inline void prefetch_ahead(const char* p, const char* end, int bytes) {
  if (p + bytes <= end)
    for (int l = 0; l < bytes; l += 64) _mm_prefetch(p + l, _MM_HINT_T0);
}

BEACON_DL_AVX2 inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[j, o] = dot(w row o, x row j) for the weight rows [o0, o1) and every x row j < n; x is fp32
// [n, in], y fp32 [n, out]. One weight row at a time (the header says why).
template <typename T>
BEACON_DL_AVX2 void rows_avx2(const float* x, int64_t n, int64_t in, const T* w, int64_t ldw, int64_t o0,
                              int64_t o1, float* y, int64_t out) {
  const int64_t in32 = in / 32 * 32, in8 = in / 8 * 8;
  for (int64_t o = o0; o < o1; ++o) {
    const T* wo = w + o * ldw;
    for (int64_t j = 0; j < n; ++j) {
      const float* xj = x + j * in;
      // four sums: an FMA waits 4 cycles for its accumulator
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
             a3 = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i < in32; i += 32) {
        a0 = _mm256_fmadd_ps(load8(wo + i), _mm256_loadu_ps(xj + i), a0);
        a1 = _mm256_fmadd_ps(load8(wo + i + 8), _mm256_loadu_ps(xj + i + 8), a1);
        a2 = _mm256_fmadd_ps(load8(wo + i + 16), _mm256_loadu_ps(xj + i + 16), a2);
        a3 = _mm256_fmadd_ps(load8(wo + i + 24), _mm256_loadu_ps(xj + i + 24), a3);
      }
      for (; i < in8; i += 8) a0 = _mm256_fmadd_ps(load8(wo + i), _mm256_loadu_ps(xj + i), a0);
      float s = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; i < in; ++i) s += static_cast<float>(wo[i]) * xj[i];
      y[j * out + o] = s;
    }
  }
}

// The bf16 dot products at one vector width: kPairs bf16 a register, loads (masked for the
// last < kPairs), vdpbf16ps, the sum of the lanes. Static member functions, not lambdas: GCC does
// not carry a target attribute into a lambda.
struct Bf16x32 {  // 512-bit (Intel)
  using Acc = __m512;
  using Pairs = __m512bh;
  using Mask = __mmask32;
  static constexpr int kPairs = 32;
  BEACON_DL_BF16 static Acc zero() { return _mm512_setzero_ps(); }
  BEACON_DL_BF16 static Pairs load(const uint16_t* p) { return (Pairs)_mm512_loadu_si512(p); }
  BEACON_DL_BF16 static Pairs load(const uint16_t* p, Mask m) { return (Pairs)_mm512_maskz_loadu_epi16(m, p); }
  BEACON_DL_BF16 static Acc dot(Acc a, Pairs w, Pairs x) { return _mm512_dpbf16_ps(a, w, x); }
  BEACON_DL_BF16 static float sum(Acc v) { return _mm512_reduce_add_ps(v); }
};
struct Bf16x16 {  // 256-bit (AMD: Zen 4 runs 512-bit operations as two halves)
  using Acc = __m256;
  using Pairs = __m256bh;
  using Mask = __mmask16;
  static constexpr int kPairs = 16;
  BEACON_DL_BF16 static Acc zero() { return _mm256_setzero_ps(); }
  BEACON_DL_BF16 static Pairs load(const uint16_t* p) {
    return (Pairs)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  BEACON_DL_BF16 static Pairs load(const uint16_t* p, Mask m) { return (Pairs)_mm256_maskz_loadu_epi16(m, p); }
  BEACON_DL_BF16 static Acc dot(Acc a, Pairs w, Pairs x) { return _mm256_dpbf16_ps(a, w, x); }
  BEACON_DL_BF16 static float sum(Acc v) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
  }
};

// bf16 by dot products of pairs: rows_avx2's loop with x bf16 [n, in] (the input's own bits),
// the weights prefetched the same way. A block shorter than four rows repeats its last row (the
// extra sums are not stored).
template <typename V>
BEACON_DL_BF16 void rows_bf16(const uint16_t* x, int64_t n, int64_t in, const uint16_t* w, int64_t ldw, int64_t o0,
                              int64_t o1, float* y, int64_t out) {
  const int64_t in_full = in / V::kPairs * V::kPairs;
  const auto tail = static_cast<typename V::Mask>((uint64_t{1} << (in - in_full)) - 1);
  const int64_t ahead = kPrefetchBlocks * kRowBlock * ldw;
  const char* const w_end = reinterpret_cast<const char*>(w + o1 * ldw);
  for (int64_t o = o0; o < o1; o += kRowBlock) {
    const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, o1 - o));
    const uint16_t* wr[kRowBlock];
    for (int r = 0; r < kRowBlock; ++r) wr[r] = w + (o + std::min(r, rows - 1)) * ldw;
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* xj = x + j * in;
      typename V::Acc a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
      for (int64_t i = 0; i < in_full; i += V::kPairs) {
        if (j == 0)  // 4 rows x 2 kPairs bytes consumed: as many bytes of lines ahead
          prefetch_ahead(reinterpret_cast<const char*>(wr[0] + ahead + 4 * i), w_end, 8 * V::kPairs);
        const typename V::Pairs xv = V::load(xj + i);
        a0 = V::dot(a0, V::load(wr[0] + i), xv);
        a1 = V::dot(a1, V::load(wr[1] + i), xv);
        a2 = V::dot(a2, V::load(wr[2] + i), xv);
        a3 = V::dot(a3, V::load(wr[3] + i), xv);
      }
      if (in_full < in) {
        const typename V::Pairs xv = V::load(xj + in_full, tail);
        a0 = V::dot(a0, V::load(wr[0] + in_full, tail), xv);
        a1 = V::dot(a1, V::load(wr[1] + in_full, tail), xv);
        a2 = V::dot(a2, V::load(wr[2] + in_full, tail), xv);
        a3 = V::dot(a3, V::load(wr[3] + in_full, tail), xv);
      }
      const float s[kRowBlock] = {V::sum(a0), V::sum(a1), V::sum(a2), V::sum(a3)};
      for (int r = 0; r < rows; ++r) y[j * out + o + r] = s[r];
    }
  }
}
#endif

// fp32 sums y [n, out] of x [n, in] (fp32, or bf16 for the dot products) and weight. x's rows
// are read in place where they already are what the kernel reads, else copied into a buffer here
// (a decode step's few rows: cheaper than the ATen conversion's dispatch and allocation).
template <typename T>
void decode_linear_kernel(const at::Tensor& x, const at::Tensor& weight, float* y) {
#ifdef BEACON_CPU_X86
  const int64_t n = x.size(0), in = x.size(1), out = weight.size(0), ldx = x.stride(0);
  const T* w = weight.const_data_ptr<T>();
  const int64_t ldw = weight.stride(0);
  const int64_t blocks = (out + kRowBlock - 1) / kRowBlock;
  const int64_t block_bytes = std::max<int64_t>(1, kRowBlock * in * static_cast<int64_t>(sizeof(T)));
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / block_bytes);
  const bool dot = std::is_same_v<T, at::BFloat16> && beacon::cpu::cpu_has(beacon::cpu::Isa::kAvx512Bf16);
  const bool wide = beacon::cpu::decode_avx512_preferred();
  const T* xp = x.const_data_ptr<T>();
  // the rows the kernel reads: x's own (T) for the dot products, else fp32
  std::unique_ptr<T[]> x_rows;
  std::unique_ptr<float[]> x_f32;
  const T* xd = xp;
  const float* xs = nullptr;
  if (dot) {
    if (ldx != in) {
      x_rows.reset(new T[n * in]);
      for (int64_t j = 0; j < n; ++j) std::copy(xp + j * ldx, xp + j * ldx + in, x_rows.get() + j * in);
      xd = x_rows.get();
    }
  } else if (std::is_same_v<T, float> && ldx == in) {
    xs = reinterpret_cast<const float*>(xp);
  } else {
    x_f32.reset(new float[n * in]);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < in; ++i) x_f32[j * in + i] = static_cast<float>(xp[j * ldx + i]);
    xs = x_f32.get();
  }
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t o0 = b0 * kRowBlock, o1 = std::min(out, b1 * kRowBlock);
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (dot) {
        const auto* xb = reinterpret_cast<const uint16_t*>(xd);
        const auto* wb = reinterpret_cast<const uint16_t*>(w);
        if (wide) rows_bf16<Bf16x32>(xb, n, in, wb, ldw, o0, o1, y, out);
        else rows_bf16<Bf16x16>(xb, n, in, wb, ldw, o0, o1, y, out);
        return;
      }
    }
    rows_avx2<T>(xs, n, in, w, ldw, o0, o1, y, out);
  });
#endif
}

// y [n, out] of x's dtype (T): the fp32 sums (in y's own memory for fp32, else in a buffer) plus
// the bias in fp32, each value rounded once.
template <typename T>
void decode_linear_typed(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         at::Tensor& y) {
  const int64_t n = y.size(0), out = y.size(1);
  T* yp = y.mutable_data_ptr<T>();
  std::unique_ptr<float[]> sums;
  float* ys = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    ys = yp;
  } else {
    sums.reset(new float[n * out]);
    ys = sums.get();
  }
  if (x.size(1) == 0) std::fill(ys, ys + n * out, 0.0f);
  else decode_linear_kernel<T>(x, weight, ys);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const T* bp = b.defined() ? b.const_data_ptr<T>() : nullptr;
  if (std::is_same_v<T, float> && bp == nullptr) return;  // the sums are y
  for (int64_t j = 0; j < n; ++j)
    for (int64_t o = 0; o < out; ++o)
      yp[j * out + o] = static_cast<T>(ys[j * out + o] + (bp ? static_cast<float>(bp[o]) : 0.0f));
}

// fp32 through torch's BLAS (at::linear) instead of the kernel: without AVX2, and on Intel CPUs,
// where MKL's one-row GEMM already reads at the memory's pace (the kernel was 3-7% slower on
// SmolLM2's decode step there); BEACON_OPS_FP32_GEMM=blas|kernel overrides, as for the attention's GEMMs.
bool fp32_by_blas() {
  static const bool blas = !beacon::cpu::cpu_has(beacon::cpu::Isa::kAvx2) ||
                           beacon::cpu::intel_default("BEACON_OPS_FP32_GEMM", "blas", "kernel");
  return blas;
}

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  beacon::checks::check_decode_linear(kOp, x, weight, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  if ((x.scalar_type() == at::kFloat && fp32_by_blas()) || !beacon::cpu::cpu_has(beacon::cpu::Isa::kAvx2))
    return at::linear(x, weight, has_bias ? *bias : at::Tensor());  // torch's own
  const int64_t n = x.size(0), out = weight.size(0);
  at::Tensor y = at::empty({n, out}, x.options());
  if (n == 0 || out == 0) return y;
  switch (x.scalar_type()) {
    case at::kFloat: decode_linear_typed<float>(x, weight, bias, y); break;
    case at::kBFloat16: decode_linear_typed<at::BFloat16>(x, weight, bias, y); break;
    default: decode_linear_typed<at::Half>(x, weight, bias, y); break;
  }
  return y;
}

}  // namespace

namespace beacon_cpu {
// For build_info() (bindings.cpp).
const char* decode_linear_fp32_path() {
  return fp32_by_blas() ? "blas" : "kernel";
}
}  // namespace beacon_cpu

TORCH_LIBRARY_IMPL(beacon, CPU, m) { m.impl("decode_linear", &decode_linear_cpu); }

// CPU kernel of torch.ops.beacon.rms_norm: Llama's RMSNorm over x's last dimension,
// y = x / sqrt(mean(x^2) + eps) * weight, in one call.
//
// Why: torch's rms_norm is several operations (a square, a mean, an rsqrt, two products), each
// a dispatch and an allocation; on the one row of a decode step that overhead is its whole cost
// (SmolLM2 normalises 61 times a step; bench/rms_norm.py). Here one pass sums the squares (fp32
// values summed in double, four sums side by side) and a second writes the result.
// Rounding follows the model's own path (Hugging Face's LlamaRMSNorm): fp32 and fp64
// (x * r) * weight in x's dtype; fp16 and bf16 t = x * r in fp32 rounded to x's dtype, then
// weight * t in fp32, rounded again. r is computed in double and rounded to fp32 (fp64: kept).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "op_checks.h"

namespace {

constexpr const char* kOp = "beacon.rms_norm";
constexpr int64_t kTaskElements = int64_t{1} << 15;  // elements a thread takes at least

// Rows [r0, r1) of x [rows, n] into y; Acc: the arithmetic's type (float, or double for fp64).
template <typename T, typename Acc>
void rms_rows(const T* x, const T* w, T* y, int64_t r0, int64_t r1, int64_t n, double eps) {
  for (int64_t i = r0; i < r1; ++i) {
    const T* xr = x + i * n;
    T* yr = y + i * n;
    double s[4] = {0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4)
      for (int u = 0; u < 4; ++u) {
        const double v = static_cast<Acc>(xr[j + u]);
        s[u] += v * v;
      }
    for (; j < n; ++j) {
      const double v = static_cast<Acc>(xr[j]);
      s[0] += v * v;
    }
    const Acc r = static_cast<Acc>(1.0 / std::sqrt((s[0] + s[1] + s[2] + s[3]) / static_cast<double>(n) + eps));
    if constexpr (std::is_same_v<T, Acc>) {
      for (j = 0; j < n; ++j) yr[j] = (xr[j] * r) * w[j];
    } else {
      for (j = 0; j < n; ++j) {
        const T t = static_cast<T>(static_cast<Acc>(xr[j]) * r);
        yr[j] = static_cast<T>(static_cast<Acc>(w[j]) * static_cast<Acc>(t));
      }
    }
  }
}

template <typename T, typename Acc>
void rms_norm_kernel(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, double eps) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const T* xp = x.const_data_ptr<T>();
  const T* wp = weight.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  // a decode step's row runs on the calling thread (no wake-up of the others)
  at::parallel_for(0, rows, std::max<int64_t>(1, kTaskElements / n), [&](int64_t r0, int64_t r1) {
    rms_rows<T, Acc>(xp, wp, yp, r0, r1, n, eps);
  });
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  beacon::checks::check_rms_norm(kOp, x, weight, eps);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  switch (x.scalar_type()) {
    case at::kFloat: rms_norm_kernel<float, float>(xc, wc, y, eps); break;
    case at::kDouble: rms_norm_kernel<double, double>(xc, wc, y, eps); break;
    case at::kBFloat16: rms_norm_kernel<at::BFloat16, float>(xc, wc, y, eps); break;
    default: rms_norm_kernel<at::Half, float>(xc, wc, y, eps); break;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(beacon, CPU, m) { m.impl("rms_norm", &rms_norm_cpu); }

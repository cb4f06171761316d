// Backward of torch.ops.beacon.attention on the CPU, FlashAttention-2 style: the probabilities
// of each (query block, key block) tile are recomputed from the saved log-sum-exp, so no
// [queries x keys] tensor is ever materialised. With D_i = rowsum(dout_i * out_i):
//   P = exp(scale * q k^T - lse),  dP = dout v^T,  dS = P * (dP - D),
//   dV = P^T dout,  dK = scale * dS^T q,  dQ = scale * dS k.
// Which keys a row sees comes from beacon_mask.h (row_spans / classify_block / key_visible).
//
// Two race-free passes (each output element is written by exactly one task):
//   1. dK, dV: parallel over (sequence, kv head, key block); the task loops over the query
//      heads of the GQA group and every query block that sees the key block.
//   2. dQ:     parallel over (sequence, query head, query block).
// Recomputing P in both passes costs two extra tile products but needs no atomics and no
// per-thread copies of the cache. bf16/fp16/fp32 run in fp32 (inputs widened once); fp64 runs
// in fp64 (so that gradcheck can test this kernel against finite differences). Extra memory:
// the widened inputs, a transposed copy of the layer's K and V, and one tile per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "beacon_mask.h"

namespace {

using beacon::BlockKind;
using beacon::Mode;
using beacon::RowSpans;
using beacon::SeqLens;

constexpr int kBlockQ = 32;  // query rows per tile
constexpr int kBlockK = 64;  // keys per tile

Mode parse_mode(const std::string& mode) {
  if (mode == "segmentation") return Mode::kSegmentation;
  if (mode == "step-expansion") return Mode::kStepExpansion;
  if (mode == "full-coverage") return Mode::kFullCoverage;
  TORCH_CHECK(false, "mode: expected 'segmentation', 'step-expansion' or 'full-coverage', got '",
              mode, "'");
}

// Per-sequence query ranges and key lengths, read from the (host) length tensors.
struct Sequences {
  std::vector<SeqLens> lens;
  std::vector<int> q_start, n_q;
};

void check_int_vector(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, ": expected shape [", n, "], got ",
              t.sizes());
}

// Every check of the op, in one place, before anything is computed. Returns the sequences.
Sequences check_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& out, const at::Tensor& lse,
                       const at::Tensor& cu_seqlens_q, const at::Tensor& mem_len,
                       const at::Tensor& raw_len, const at::Tensor& beacon_len,
                       const at::Tensor& ratio, int64_t max_seqlen_q, double softmax_scale) {
  const std::pair<const at::Tensor*, const char*> floats[] = {
      {&dout, "dout"}, {&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
      {&out, "out"}, {&lse, "lse"}};
  for (const auto& [t, name] : floats)
    TORCH_CHECK(t->device().is_cpu(), name, ": expected a CPU tensor, got ", t->device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                  dtype == at::kDouble,
              "q: expected float32, bfloat16, float16 or float64, got ", dtype);
  TORCH_CHECK(q.dim() == 3, "q: expected [total_q, heads, head_dim], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4,
              "k_cache: expected [batch, kv_heads, capacity, head_dim], got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache: expected the shape of k_cache ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                                {&out, "out"}, {&dout, "dout"}})
    TORCH_CHECK(t->scalar_type() == dtype, name, ": expected ", dtype, " like q, got ",
                t->scalar_type());
  TORCH_CHECK(out.sizes() == q.sizes(), "out: expected the shape of q ", q.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout: expected the shape of q ", q.sizes(), ", got ",
              dout.sizes());
  const int64_t total_q = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t batch = k_cache.size(0), kv_heads = k_cache.size(1);
  const int64_t capacity = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim, "k_cache: head_dim ", k_cache.size(3),
              " differs from q's ", dim);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "k_cache: kv_heads ", kv_heads,
              " must divide q's heads ", heads);
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse: expected float32, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == total_q && lse.size(1) == heads,
              "lse: expected [", total_q, ", ", heads, "], got ", lse.sizes());
  TORCH_CHECK(std::isfinite(softmax_scale), "softmax_scale: expected a finite number, got ",
              softmax_scale);

  check_int_vector(cu_seqlens_q, "cu_seqlens_q", batch + 1);
  check_int_vector(mem_len, "mem_len", batch);
  check_int_vector(raw_len, "raw_len", batch);
  check_int_vector(beacon_len, "beacon_len", batch);
  check_int_vector(ratio, "ratio", batch);
  auto cu = cu_seqlens_q.accessor<int, 1>();
  auto mem = mem_len.accessor<int, 1>(), raw = raw_len.accessor<int, 1>();
  auto bea = beacon_len.accessor<int, 1>(), rat = ratio.accessor<int, 1>();
  TORCH_CHECK(cu[0] == 0, "cu_seqlens_q: must start at 0, got ", cu[0]);
  TORCH_CHECK(cu[batch] == total_q, "cu_seqlens_q: must end at total_q = ", total_q, ", got ",
              cu[batch]);
  Sequences s;
  for (int64_t b = 0; b < batch; ++b) {
    const int n = cu[b + 1] - cu[b];
    TORCH_CHECK(n >= 0, "cu_seqlens_q: must be non-decreasing (sequence ", b, ")");
    TORCH_CHECK(n <= max_seqlen_q, "max_seqlen_q: ", max_seqlen_q, " is below sequence ", b,
                "'s ", n, " queries");
    TORCH_CHECK(mem[b] >= 0, "mem_len: negative for sequence ", b);
    TORCH_CHECK(raw[b] >= 0, "raw_len: negative for sequence ", b);
    TORCH_CHECK(bea[b] >= 0, "beacon_len: negative for sequence ", b);
    TORCH_CHECK(rat[b] >= 0, "ratio: negative for sequence ", b);
    TORCH_CHECK(bea[b] == 0 || rat[b] > 0, "ratio: must be > 0 for sequence ", b,
                " with beacon_len ", bea[b]);
    TORCH_CHECK(int64_t(mem[b]) + raw[b] + bea[b] <= capacity, "k_cache: capacity ", capacity,
                " is below sequence ", b, "'s mem_len + raw_len + beacon_len = ",
                int64_t(mem[b]) + raw[b] + bea[b]);
    TORCH_CHECK(n >= bea[b] && n - bea[b] <= raw[b], "cu_seqlens_q: sequence ", b, " has ", n,
                " queries, expected beacon_len (", bea[b], ") plus at most raw_len (", raw[b],
                ") raw tokens");
    s.lens.push_back(SeqLens{mem[b], raw[b], bea[b], rat[b]});
    s.q_start.push_back(cu[b]);
    s.n_q.push_back(n);
  }
  return s;
}

// Contiguous views of the inputs in the accumulation type T, and the problem's dimensions.
template <typename T>
struct Problem {
  const T *q, *k, *dout, *delta;
  const T *k_t, *v_t;  // keys and values transposed, [batch, kv_heads, dim, capacity]
  const float* lse;
  int64_t heads, kv_heads, group, capacity, dim;
  T scale;
  Mode mode;
  bool attend_previous;
  const Sequences* seqs;

  // Offsets of a query-like row [total_q, heads, dim] and of a cache row [b, kv_heads, cap, dim].
  int64_t q_off(int64_t token, int64_t h) const { return (token * heads + h) * dim; }
  int64_t kv_off(int64_t b, int64_t g, int64_t key) const {
    return ((b * kv_heads + g) * capacity + key) * dim;
  }
  int64_t kv_t_off(int64_t b, int64_t g) const { return (b * kv_heads + g) * dim * capacity; }
};

template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// P and dS ([kBlockQ x kBlockK], row-major) of the tile (sequence b, query head h, local query
// rows [i0, i1), keys [k0, k1)). Masked entries and rows that see nothing (lse = +inf) are 0.
// Returns false when no row of the tile sees any key of the block.
template <typename T>
bool tile_probs_and_dscores(const Problem<T>& p, int b, int64_t h, int i0, int i1, int k0,
                            int k1, T* P, T* dS) {
  const SeqLens& L = p.seqs->lens[b];
  const int n_q = p.seqs->n_q[b];
  const int64_t g = h / p.group;
  const T* k_t = p.k_t + p.kv_t_off(b, g);
  const T* v_t = p.v_t + p.kv_t_off(b, g);
  bool any = false;
  for (int i = i0; i < i1; ++i) {
    T* P_row = P + (i - i0) * kBlockK;
    T* dS_row = dS + (i - i0) * kBlockK;
    const int64_t token = p.seqs->q_start[b] + i;
    const T lse = p.lse[token * p.heads + h];
    const RowSpans spans = beacon::row_spans(L, n_q, i, p.mode, p.attend_previous);
    const BlockKind kind =
        std::isinf(lse) ? BlockKind::kSkip : beacon::classify_block(spans, k0, k1);
    if (kind == BlockKind::kSkip) {
      std::fill(P_row, P_row + (k1 - k0), T(0));
      std::fill(dS_row, dS_row + (k1 - k0), T(0));
      continue;
    }
    any = true;
    const T* q_i = p.q + p.q_off(token, h);
    const T* do_i = p.dout + p.q_off(token, h);
    const T delta_i = p.delta[token * p.heads + h];
    // Scores q_i.k and dP = dout_i.v over the whole block at once: one multiply-add along the
    // (transposed, contiguous) keys per head_dim element, which vectorises.
    std::fill(P_row, P_row + (k1 - k0), T(0));
    std::fill(dS_row, dS_row + (k1 - k0), T(0));
    for (int64_t d = 0; d < p.dim; ++d) {
      axpy(q_i[d], k_t + d * p.capacity + k0, P_row, k1 - k0);
      axpy(do_i[d], v_t + d * p.capacity + k0, dS_row, k1 - k0);
    }
    for (int key = k0; key < k1; ++key) {
      if (kind == BlockKind::kPartial && !beacon::key_visible(spans, key)) {
        P_row[key - k0] = T(0);
        dS_row[key - k0] = T(0);
        continue;
      }
      const T prob = std::exp(p.scale * P_row[key - k0] - lse);
      P_row[key - k0] = prob;
      dS_row[key - k0] = prob * (dS_row[key - k0] - delta_i);
    }
  }
  return any;
}

// Pass 1: dK and dV of key block [k0, k1) of (sequence b, kv head g).
template <typename T>
void key_block_grads(const Problem<T>& p, int b, int64_t g, int k0, int k1, T* P, T* dS, T* dk,
                     T* dv) {
  const int n_q = p.seqs->n_q[b];
  const int64_t d = p.dim;
  for (int64_t h = g * p.group; h < (g + 1) * p.group; ++h) {
    for (int i0 = 0; i0 < n_q; i0 += kBlockQ) {
      const int i1 = std::min(i0 + kBlockQ, n_q);
      if (!tile_probs_and_dscores(p, b, h, i0, i1, k0, k1, P, dS)) continue;
      for (int i = i0; i < i1; ++i) {
        const int64_t token = p.seqs->q_start[b] + i;
        const T* q_i = p.q + p.q_off(token, h);
        const T* do_i = p.dout + p.q_off(token, h);
        const T* P_row = P + (i - i0) * kBlockK;
        const T* dS_row = dS + (i - i0) * kBlockK;
        for (int key = k0; key < k1; ++key) {
          if (P_row[key - k0] == T(0)) continue;  // masked (or underflowed: contributes 0)
          const int64_t off = p.kv_off(b, g, key);
          axpy(P_row[key - k0], do_i, dv + off, d);
          axpy(p.scale * dS_row[key - k0], q_i, dk + off, d);
        }
      }
    }
  }
}

// Pass 2: dQ of local query rows [i0, i1) of (sequence b, query head h).
template <typename T>
void query_block_grads(const Problem<T>& p, int b, int64_t h, int i0, int i1, T* P, T* dS,
                       T* dq) {
  const SeqLens& L = p.seqs->lens[b];
  const int n_q = p.seqs->n_q[b];
  const int64_t g = h / p.group;
  int key_end = 0;  // past the last key any row of the block sees
  for (int i = i0; i < i1; ++i)
    key_end = std::max(key_end, beacon::key_end(beacon::row_spans(L, n_q, i, p.mode,
                                                                  p.attend_previous)));
  for (int k0 = 0; k0 < key_end; k0 += kBlockK) {
    const int k1 = std::min(k0 + kBlockK, key_end);
    if (!tile_probs_and_dscores(p, b, h, i0, i1, k0, k1, P, dS)) continue;
    for (int i = i0; i < i1; ++i) {
      const int64_t token = p.seqs->q_start[b] + i;
      T* dq_i = dq + p.q_off(token, h);
      const T* dS_row = dS + (i - i0) * kBlockK;
      for (int key = k0; key < k1; ++key) {
        if (dS_row[key - k0] == T(0)) continue;
        axpy(p.scale * dS_row[key - k0], p.k + p.kv_off(b, g, key), dq_i, p.dim);
      }
    }
  }
}

// Both passes in accumulation type T (float, or double for fp64 inputs); returns the
// gradients in T.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& out, const at::Tensor& lse,
    const Sequences& seqs, Mode mode, bool attend_previous, double softmax_scale) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  // Widen once (no copy for contiguous inputs already in T). autograd may hand in an expanded
  // or otherwise strided dout: contiguous() covers that too.
  const at::Tensor q_t = q.to(acc).contiguous();
  const at::Tensor k_acc = k_cache.to(acc).contiguous();
  const at::Tensor k_t = k_acc.transpose(2, 3).contiguous();
  const at::Tensor v_t = v_cache.to(acc).transpose(2, 3).contiguous();
  const at::Tensor do_t = dout.to(acc).contiguous();
  const at::Tensor lse_t = lse.contiguous();
  const at::Tensor delta = (do_t * out.to(acc)).sum(-1).contiguous();  // D: [total_q, heads]

  at::Tensor dq = at::zeros(q.sizes(), q.options().dtype(acc));
  at::Tensor dk = at::zeros(k_cache.sizes(), k_cache.options().dtype(acc));
  at::Tensor dv = at::zeros(v_cache.sizes(), v_cache.options().dtype(acc));

  Problem<T> p;
  p.q = q_t.data_ptr<T>();
  p.k = k_acc.data_ptr<T>();
  p.k_t = k_t.data_ptr<T>();
  p.v_t = v_t.data_ptr<T>();
  p.dout = do_t.data_ptr<T>();
  p.delta = delta.data_ptr<T>();
  p.lse = lse_t.data_ptr<float>();
  p.heads = q.size(1);
  p.kv_heads = k_cache.size(1);
  p.group = p.heads / p.kv_heads;
  p.capacity = k_cache.size(2);
  p.dim = q.size(2);
  // As the forward: a scale <= 0 means 1/sqrt(head_dim).
  p.scale = static_cast<T>(softmax_scale > 0 ? softmax_scale
                                             : 1.0 / std::sqrt(static_cast<double>(q.size(2))));
  p.mode = mode;
  p.attend_previous = attend_previous;
  p.seqs = &seqs;
  const int batch = static_cast<int>(seqs.lens.size());

  struct Work {
    int b;
    int64_t head;
    int begin, end;
  };
  // Pass 1: (sequence, kv head, key block) -> dK, dV.
  std::vector<Work> key_work;
  for (int b = 0; b < batch; ++b) {
    if (seqs.n_q[b] == 0) continue;
    const int keys = beacon::num_keys(seqs.lens[b]);
    for (int64_t g = 0; g < p.kv_heads; ++g)
      for (int k0 = 0; k0 < keys; k0 += kBlockK)
        key_work.push_back({b, g, k0, std::min(k0 + kBlockK, keys)});
  }
  T* dk_ptr = dk.data_ptr<T>();
  T* dv_ptr = dv.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(key_work.size()), 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> P(kBlockQ * kBlockK), dS(kBlockQ * kBlockK);
    for (int64_t w = lo; w < hi; ++w) {
      const Work& it = key_work[w];
      key_block_grads(p, it.b, it.head, it.begin, it.end, P.data(), dS.data(), dk_ptr, dv_ptr);
    }
  });
  // Pass 2: (sequence, query head, query block) -> dQ.
  std::vector<Work> query_work;
  for (int b = 0; b < batch; ++b)
    for (int64_t h = 0; h < p.heads; ++h)
      for (int i0 = 0; i0 < seqs.n_q[b]; i0 += kBlockQ)
        query_work.push_back({b, h, i0, std::min(i0 + kBlockQ, seqs.n_q[b])});
  T* dq_ptr = dq.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(query_work.size()), 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> P(kBlockQ * kBlockK), dS(kBlockQ * kBlockK);
    for (int64_t w = lo; w < hi; ++w) {
      const Work& it = query_work[w];
      query_block_grads(p, it.b, it.head, it.begin, it.end, P.data(), dS.data(), dq_ptr);
    }
  });
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& mem_len, const at::Tensor& raw_len,
    const at::Tensor& beacon_len, const at::Tensor& ratio, int64_t max_seqlen_q,
    c10::string_view mode, bool attend_previous, double softmax_scale) {
  const Mode mode_enum = parse_mode(std::string(mode));
  const Sequences seqs = check_inputs(dout, q, k_cache, v_cache, out, lse, cu_seqlens_q,
                                      mem_len, raw_len, beacon_len, ratio, max_seqlen_q,
                                      softmax_scale);
  auto grads = q.scalar_type() == at::kDouble
                   ? run_backward<double>(dout, q, k_cache, v_cache, out, lse, seqs, mode_enum,
                                          attend_previous, softmax_scale)
                   : run_backward<float>(dout, q, k_cache, v_cache, out, lse, seqs, mode_enum,
                                         attend_previous, softmax_scale);
  const auto dtype = q.scalar_type();
  return {std::get<0>(grads).to(dtype), std::get<1>(grads).to(dtype),
          std::get<2>(grads).to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(beacon, CPU, m) {
  m.impl("attention_backward", &attention_backward_cpu);
}

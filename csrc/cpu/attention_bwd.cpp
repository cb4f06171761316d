// Backward of torch.ops.beacon.attention on the CPU, FlashAttention-2 style: the probabilities
// of each (query block, key block) tile are recomputed from the saved log-sum-exp, so no
// [queries x keys] tensor is ever materialised. With D_i = rowsum(dout_i * out_i):
//   P = exp(scale * q k^T - lse),  dP = dout v^T,  dS = P * (dP - D),
//   dV = P^T dout,  dK = scale * dS^T q,  dQ = scale * dS k.
// Which keys a row sees comes from beacon_mask.h (row_spans / classify_block / key_visible).
//
// Two race-free passes (each output element is written by exactly one task):
//   1. dK, dV: parallel over (sequence, kv head, key block); the task runs over the query
//      tokens that see the block, all query heads of the GQA group stacked as GEMM rows.
//   2. dQ:     parallel over (sequence, kv head, query block), same stacking.
// Recomputing P in both passes costs two extra tile products but needs no atomics and no
// per-thread copies of the cache. bf16/fp16/fp32 run in fp32 (inputs widened once): the tile
// products by block_gemm.h (no per-call dispatch: on a training step's small tiles, ATen's GEMMs
// made this op ~1.9x slower), the exp by attention_blocks.h's fast_exp in loops compiled per ISA
// level. fp64 runs in fp64 with ATen GEMMs and std::exp (so that gradcheck can test this kernel
// against finite differences). Extra memory: the widened, head-regrouped inputs (K and V also
// transposed: the B operands of S and dP) and per-thread tiles of at most kChunkQ * group x
// kBlockK; nothing grows with queries x keys.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "attn_params.h"
#include "beacon_mask.h"
#include "cpu/attention_blocks.h"
#include "cpu/block_gemm.h"
#include "cpu/step_lengths.h"
#include "op_checks.h"

namespace {

using beacon::BlockKind;
using beacon::Mode;
using beacon::RowSpans;
using beacon::SeqLens;
using beacon::cpu::cpu_isa;
using beacon::cpu::Isa;
using beacon::cpu::attn::fast_exp;

constexpr int kBlockQ = 32;   // query tokens per dQ work item (times the GQA group: GEMM rows)
constexpr int kBlockK = 64;   // keys per tile
constexpr int kChunkQ = 256;  // query tokens per GEMM in the dK/dV pass (bounds its buffers)

// Per-sequence query ranges and key lengths, read from the (host) length tensors.
struct Sequences {
  std::vector<SeqLens> lens;
  std::vector<int> q_start, n_q;
};

// Reads the sequences' lengths (checked against each other and the cache; the arguments'
// metadata was checked by check_attention_backward).
Sequences read_sequences(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& cu_seqlens_q,
                         const at::Tensor& mem_len, const at::Tensor& raw_len, const at::Tensor& beacon_len,
                         const at::Tensor& ratio, int64_t max_seqlen_q) {
  Sequences s;
  s.lens = beacon::cpu::read_step_lengths(cu_seqlens_q, mem_len, raw_len, beacon_len, ratio, q.size(0),
                                          max_seqlen_q, k_cache.size(2));
  const int32_t* cu = cu_seqlens_q.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < k_cache.size(0); ++b) {
    s.q_start.push_back(cu[b]);
    s.n_q.push_back(cu[b + 1] - cu[b]);
  }
  return s;
}

// The inputs in the accumulation type T, query-like tensors regrouped per kv head so that the
// rows of one GQA group are one contiguous matrix: row (token, j) of kv head g, for query head
// h = g * group + j, lives at ((g * total_q + token) * group + j).
template <typename T>
struct Problem {
  const T *q, *dout, *lse, *delta;  // [kv_heads, total_q, group, (dim)]
  const T* k;                       // [batch, kv_heads, capacity, dim]
  const T *kT, *vT;                 // K and V transposed: [batch, kv_heads, dim, capacity]
  int64_t total_q, kv_heads, group, capacity, dim;
  T scale;
  Mode mode;
  bool attend_previous;
  const Sequences* seqs;

  int64_t row(int64_t g, int64_t token) const { return (g * total_q + token) * group; }
  int64_t kv_off(int64_t b, int64_t g, int64_t key) const {
    return ((b * kv_heads + g) * capacity + key) * dim;
  }
  // Column `key` of the transposed cache (row stride: capacity).
  int64_t kvT_off(int64_t b, int64_t g, int64_t key) const {
    return (b * kv_heads + g) * dim * capacity + key;
  }
};

// C [M x N] = alpha * A * B (+ C when accumulate); A(i, k) = A[i * sa_m + k * sa_k], B and C
// row-major with leading dimensions ldb, ldc.
template <typename T>
void tile_gemm(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t sa_m, int64_t sa_k,
               const T* B, int64_t ldb, bool accumulate, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    beacon_cpu::block_gemm(static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), alpha, A,
                           sa_m, sa_k, B, ldb, accumulate, C, ldc);
  } else {
    beacon_cpu::aten_gemm<T>(M, N, K, alpha, A, sa_m, sa_k, B, ldb, accumulate, C, ldc);
  }
}

// One row of a tile: scores s -> P = exp(scale s - lse), dP -> dS = P (dP - D). fp32 by fast_exp
// in a loop compiled per ISA level (std::exp is a scalar libm call: the loop did not vectorise).
BEACON_ALWAYS_INLINE void probs_and_dscores_row_body(float* s, float* dp, int n, float scale, float lse,
                                                     float delta) {
#pragma omp simd
  for (int c = 0; c < n; ++c) {
    const float prob = fast_exp(scale * s[c] - lse);
    s[c] = prob;
    dp[c] = prob * (dp[c] - delta);
  }
}
BEACON_ISA_VARIANTS(probs_and_dscores_row, (float* s, float* dp, int n, float scale, float lse, float delta),
                    (s, dp, n, scale, lse, delta))

inline void probs_and_dscores_row(double* s, double* dp, int n, double scale, double lse, double delta) {
  for (int c = 0; c < n; ++c) {
    const double prob = std::exp(scale * s[c] - lse);
    s[c] = prob;
    dp[c] = prob * (dp[c] - delta);
  }
}

// P and dS of one tile: query tokens [i0, i1) of sequence b (all `group` heads of kv head g,
// stacked as rows) against keys [k0, k1). Both products are GEMMs; the mask (beacon_mask.h) and
// exp are applied row by row. S and dS are [(i1 - i0) * group, k1 - k0] row-major buffers;
// S becomes P. Masked entries and rows that see nothing (lse = +inf) are 0. Returns false,
// computing nothing, when no row of the tile sees a key of the block.
template <typename T>
bool tile_probs_and_dscores(const Problem<T>& p, int b, int64_t g, int i0, int i1, int k0,
                            int k1, T* S, T* dS) {
  const SeqLens& L = p.seqs->lens[b];
  const int n_q = p.seqs->n_q[b];
  const int nk = k1 - k0;
  thread_local std::vector<RowSpans> spans;
  thread_local std::vector<BlockKind> kinds;
  spans.resize(i1 - i0);
  kinds.resize(i1 - i0);
  bool any = false;
  for (int i = i0; i < i1; ++i) {
    spans[i - i0] = beacon::row_spans(L, n_q, i, p.mode, p.attend_previous);
    kinds[i - i0] = beacon::classify_block(spans[i - i0], k0, k1);
    any = any || kinds[i - i0] != BlockKind::kSkip;
  }
  if (!any) return false;
  const int64_t rows = int64_t(i1 - i0) * p.group;
  const int64_t first = p.row(g, p.seqs->q_start[b] + i0);
  // S = q k^T, dP = dout v^T (into dS), with k^T, v^T read from the transposed caches.
  tile_gemm<T>(rows, nk, p.dim, T(1), p.q + first * p.dim, p.dim, 1, p.kT + p.kvT_off(b, g, k0), p.capacity,
               false, S, nk);
  tile_gemm<T>(rows, nk, p.dim, T(1), p.dout + first * p.dim, p.dim, 1, p.vT + p.kvT_off(b, g, k0),
               p.capacity, false, dS, nk);
  for (int64_t r = 0; r < rows; ++r) {
    const int i = static_cast<int>(r / p.group);
    T* P_row = S + r * nk;
    T* dS_row = dS + r * nk;
    const T lse = p.lse[first + r];
    if (kinds[i] == BlockKind::kSkip || std::isinf(lse)) {
      std::fill(P_row, P_row + nk, T(0));
      std::fill(dS_row, dS_row + nk, T(0));
      continue;
    }
    probs_and_dscores_row(P_row, dS_row, nk, p.scale, lse, p.delta[first + r]);
    if (kinds[i] == BlockKind::kPartial)
      for (int c = 0; c < nk; ++c)
        if (!beacon::key_visible(spans[i], k0 + c)) {
          P_row[c] = T(0);
          dS_row[c] = T(0);
        }
  }
  return true;
}

// Pass 1: dK and dV of key block [k0, k1) of (sequence b, kv head g): over the query tokens
// that see the block, in chunks of kChunkQ tokens, dV += P^T dout and dK += scale dS^T q.
template <typename T>
void key_block_grads(const Problem<T>& p, int b, int64_t g, int k0, int k1, std::vector<T>& S,
                     std::vector<T>& dS, T* dk, T* dv) {
  const SeqLens& L = p.seqs->lens[b];
  const int n_q = p.seqs->n_q[b];
  int lo = n_q, hi = 0;  // hull of the query tokens that see the block
  for (int i = 0; i < n_q; ++i) {
    const RowSpans spans = beacon::row_spans(L, n_q, i, p.mode, p.attend_previous);
    if (beacon::classify_block(spans, k0, k1) != BlockKind::kSkip) {
      lo = std::min(lo, i);
      hi = i + 1;
    }
  }
  const int nk = k1 - k0;
  for (int i0 = lo; i0 < hi; i0 += kChunkQ) {
    const int i1 = std::min(i0 + kChunkQ, hi);
    const int64_t rows = int64_t(i1 - i0) * p.group;
    S.resize(rows * nk);
    dS.resize(rows * nk);
    if (!tile_probs_and_dscores(p, b, g, i0, i1, k0, k1, S.data(), dS.data())) continue;
    const int64_t first = p.row(g, p.seqs->q_start[b] + i0);
    // P^T and dS^T: the tiles read column-major.
    tile_gemm<T>(nk, p.dim, rows, T(1), S.data(), 1, nk, p.dout + first * p.dim, p.dim, true,
                 dv + p.kv_off(b, g, k0), p.dim);
    tile_gemm<T>(nk, p.dim, rows, p.scale, dS.data(), 1, nk, p.q + first * p.dim, p.dim, true,
                 dk + p.kv_off(b, g, k0), p.dim);
  }
}

// Pass 2: dQ of query tokens [i0, i1) of sequence b, all heads of kv head g:
// dQ += scale dS k over the key blocks the tokens see.
template <typename T>
void query_block_grads(const Problem<T>& p, int b, int64_t g, int i0, int i1, std::vector<T>& S,
                       std::vector<T>& dS, T* dq) {
  const SeqLens& L = p.seqs->lens[b];
  const int n_q = p.seqs->n_q[b];
  int key_end = 0;  // past the last key any token of the block sees
  for (int i = i0; i < i1; ++i)
    key_end = std::max(key_end, beacon::key_end(beacon::row_spans(L, n_q, i, p.mode,
                                                                  p.attend_previous)));
  const int64_t rows = int64_t(i1 - i0) * p.group;
  const int64_t first = p.row(g, p.seqs->q_start[b] + i0);
  S.resize(rows * kBlockK);
  dS.resize(rows * kBlockK);
  for (int k0 = 0; k0 < key_end; k0 += kBlockK) {
    const int k1 = std::min(k0 + kBlockK, key_end);
    if (!tile_probs_and_dscores(p, b, g, i0, i1, k0, k1, S.data(), dS.data())) continue;
    tile_gemm<T>(rows, p.dim, k1 - k0, p.scale, dS.data(), k1 - k0, 1, p.k + p.kv_off(b, g, k0), p.dim,
                 true, dq + first * p.dim, p.dim);
  }
}

// Runs fn(item, S, dS) for items [0, n) on torch's threads, each thread pulling the next item
// (their costs differ a lot: memory blocks are seen by every row, late raw blocks by few), with
// its own tile buffers.
template <typename T, typename F>
void for_each_item_dynamic(int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<T> S, dS;
    for (int64_t w = next++; w < n; w = next++) fn(w, S, dS);
  });
}

// Both passes in accumulation type T (float, or double for fp64 inputs); returns the
// gradients in T.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& out, const at::Tensor& lse,
    const Sequences& seqs, const beacon::HostAttnParams& params) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const int64_t total_q = params.total_q, heads = params.heads, dim = params.head_dim;
  const int64_t kv_heads = params.kv_heads, group = params.group;
  // [total_q, heads, ...] -> [kv_heads, total_q, group, ...]: one GQA group's rows contiguous.
  // This also widens to T and makes a strided (e.g. expanded) dout contiguous.
  auto grouped = [&](const at::Tensor& t) {
    return t.to(acc)
        .reshape({total_q, kv_heads, group, t.size(2)})
        .permute({1, 0, 2, 3})
        .contiguous();
  };
  const at::Tensor q_g = grouped(q), do_g = grouped(dout), lse_g = grouped(lse.unsqueeze(-1));
  const at::Tensor delta_g = (do_g * grouped(out)).sum(-1, true).contiguous();  // D
  const at::Tensor k_acc = k_cache.to(acc).contiguous();
  // The B operands of S and dP (V is read only there, so only transposed).
  const at::Tensor kT_acc = k_acc.transpose(2, 3).contiguous();
  const at::Tensor vT_acc = v_cache.to(acc).transpose(2, 3).contiguous();

  at::Tensor dq_g = at::zeros_like(q_g);
  at::Tensor dk = at::zeros(k_cache.sizes(), k_cache.options().dtype(acc));
  at::Tensor dv = at::zeros(v_cache.sizes(), v_cache.options().dtype(acc));

  Problem<T> p;
  p.q = q_g.data_ptr<T>();
  p.dout = do_g.data_ptr<T>();
  p.lse = lse_g.data_ptr<T>();
  p.delta = delta_g.data_ptr<T>();
  p.k = k_acc.data_ptr<T>();
  p.kT = kT_acc.data_ptr<T>();
  p.vT = vT_acc.data_ptr<T>();
  p.total_q = total_q;
  p.kv_heads = kv_heads;
  p.group = group;
  p.capacity = params.capacity;
  p.dim = dim;
  p.scale = static_cast<T>(params.scale);  // as the forward: a scale <= 0 means 1/sqrt(head_dim)
  p.mode = params.mode;
  p.attend_previous = params.attend_previous;
  p.seqs = &seqs;
  const int batch = static_cast<int>(seqs.lens.size());

  struct Work {
    int b;
    int64_t g;
    int begin, end;
  };
  // Pass 1: (sequence, kv head, key block) -> dK, dV; early key blocks (seen by the most rows)
  // first.
  std::vector<Work> key_work;
  for (int b = 0; b < batch; ++b) {
    if (seqs.n_q[b] == 0) continue;
    const int keys = beacon::num_keys(seqs.lens[b]);
    for (int64_t g = 0; g < kv_heads; ++g)
      for (int k0 = 0; k0 < keys; k0 += kBlockK)
        key_work.push_back({b, g, k0, std::min(k0 + kBlockK, keys)});
  }
  T* dk_ptr = dk.data_ptr<T>();
  T* dv_ptr = dv.data_ptr<T>();
  for_each_item_dynamic<T>(static_cast<int64_t>(key_work.size()),
                          [&](int64_t w, std::vector<T>& S, std::vector<T>& dS) {
                            const Work& it = key_work[w];
                            key_block_grads(p, it.b, it.g, it.begin, it.end, S, dS, dk_ptr,
                                            dv_ptr);
                          });
  // Pass 2: (sequence, kv head, query block) -> dQ of the group's heads; late query blocks
  // (which see the most keys) first.
  std::vector<Work> query_work;
  for (int b = 0; b < batch; ++b)
    for (int64_t g = 0; g < kv_heads; ++g)
      for (int i0 = 0; i0 < seqs.n_q[b]; i0 += kBlockQ)
        query_work.push_back({b, g, i0, std::min(i0 + kBlockQ, seqs.n_q[b])});
  std::stable_sort(query_work.begin(), query_work.end(),
                   [](const Work& x, const Work& y) { return x.begin > y.begin; });
  T* dq_ptr = dq_g.data_ptr<T>();
  for_each_item_dynamic<T>(static_cast<int64_t>(query_work.size()),
                          [&](int64_t w, std::vector<T>& S, std::vector<T>& dS) {
                            const Work& it = query_work[w];
                            query_block_grads(p, it.b, it.g, it.begin, it.end, S, dS, dq_ptr);
                          });
  const at::Tensor dq = dq_g.permute({1, 0, 2, 3}).reshape({total_q, heads, dim});
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& mem_len, const at::Tensor& raw_len,
    const at::Tensor& beacon_len, const at::Tensor& ratio, int64_t max_seqlen_q,
    c10::string_view mode, bool attend_previous, double softmax_scale) {
  constexpr const char* op = "beacon.attention_backward";
  const Mode mode_enum = beacon::checks::check_attention_backward(
      op, dout, q, k_cache, v_cache, out, lse, cu_seqlens_q, mem_len, raw_len, beacon_len, ratio, max_seqlen_q,
      mode, softmax_scale);
  TORCH_CHECK_VALUE(q.size(2) >= 1, op, ": q head_dim must be >= 1, got ", q.size(2));
  const Sequences seqs =
      read_sequences(q, k_cache, cu_seqlens_q, mem_len, raw_len, beacon_len, ratio, max_seqlen_q);
  const beacon::HostAttnParams params =
      beacon::fill_attn_params(q, k_cache, v_cache, max_seqlen_q, mode_enum, attend_previous, softmax_scale);
  if (params.heads == 0)  // no query heads: no gradient flows
    return {at::zeros_like(q), at::zeros_like(k_cache), at::zeros_like(v_cache)};
  auto grads = q.scalar_type() == at::kDouble
                   ? run_backward<double>(dout, q, k_cache, v_cache, out, lse, seqs, params)
                   : run_backward<float>(dout, q, k_cache, v_cache, out, lse, seqs, params);
  const auto dtype = q.scalar_type();
  return {std::get<0>(grads).to(dtype), std::get<1>(grads).to(dtype),
          std::get<2>(grads).to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(beacon, CPU, m) {
  m.impl("attention_backward", &attention_backward_cpu);
}

// Backward of torch.ops.beacon.attention on the CPU, FlashAttention-2 style: the probabilities
// of each (query block, key block) tile are recomputed from the saved log-sum-exp, so no
// [queries x keys] tensor is ever materialised. With D_i = rowsum(dout_i * out_i):
//   P = exp(scale * q k^T - lse),  dP = dout v^T,  dS = P * (dP - D),
//   dV = P^T dout,  dK = scale * dS^T q,  dQ = scale * dS k.
// Which keys a row sees comes from beacon_mask.h (row_spans / classify_block / key_visible).
//
// Race-free (each output element is written by exactly one task), in one of two schemes:
//   one pass: parallel over (sequence, kv head); the task runs over its key blocks, each over
//      the query tokens that see it (all query heads of the GQA group stacked as GEMM rows),
//      and adds the tiles' dK, dV and dQ (its dQ rows are no other task's);
//   two passes, where there are too few such tasks for the threads:
//      1. dK, dV: parallel over (sequence, kv head, key block), the tiles as above;
//      2. dQ:     parallel over (sequence, kv head, query block), same stacking; recomputing P
//         costs two extra tile products but needs no atomics and no per-thread copies.
// (The one pass is the fp32/fp64 path's, run_backward; the bf16 operand path keeps two.)
// bf16 on CPUs with AVX-512-BF16 (head_dim even) multiplies bf16 operands (run_backward_bf16,
// below: AMX tiles where it can, P and dS rounded to bf16); otherwise bf16/fp16/fp32 run in fp32
// (inputs widened once): the tile products by block_gemm.h (no per-call dispatch: on a training
// step's small tiles, ATen's GEMMs made this op ~1.9x slower), the exp by attention_blocks.h's
// fast_exp in loops compiled per ISA level (fast_exp8 by hand for AVX2). fp64 runs
// in fp64 with ATen GEMMs and std::exp (so that gradcheck can test this kernel against finite
// differences). Extra memory: the widened, head-regrouped inputs (K and V also
// transposed: the B operands of S and dP) and per-thread tiles of at most kChunkQ * group x
// kBlockK; nothing grows with queries x keys.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "attn_params.h"
#include "beacon_mask.h"
#include "cpu/attention_blocks.h"
#include "cpu/bf16_gemm.h"
#include "cpu/block_gemm.h"
#include "cpu/line_aligned.h"
#include "cpu/probs_to_bf16.h"
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
#ifdef BEACON_CPU_X86
using beacon::cpu::attn::fast_exp8;
#endif

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
#ifdef BEACON_CPU_X86
// For AVX2 GCC leaves the loop above scalar (fast_exp's ternaries stay branches): it took more of
// an fp32 backward than its tile products. fast_exp8 does fast_exp's operations in its order and
// the rest is the loop's (no FMA at this level), so the results are the loop's bit for bit.
__attribute__((target("avx2"))) inline void probs_and_dscores_row_avx2(float* s, float* dp, int n, float scale,
                                                                       float lse, float delta) {
  const __m256 vscale = _mm256_set1_ps(scale), vlse = _mm256_set1_ps(lse), vdelta = _mm256_set1_ps(delta);
  int c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 prob = fast_exp8(_mm256_sub_ps(_mm256_mul_ps(vscale, _mm256_loadu_ps(s + c)), vlse));
    _mm256_storeu_ps(s + c, prob);
    _mm256_storeu_ps(dp + c, _mm256_mul_ps(prob, _mm256_sub_ps(_mm256_loadu_ps(dp + c), vdelta)));
  }
  probs_and_dscores_row_body(s + c, dp + c, n - c, scale, lse, delta);
}
#endif
BEACON_ISA_VARIANTS_OWN_AVX2(probs_and_dscores_row,
                             (float* s, float* dp, int n, float scale, float lse, float delta),
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
// The key spans of query tokens [i0, i1) of sequence b and how each meets keys [k0, k1) (in
// thread-local vectors, indexed from i0); null when none of them sees a key of the block.
struct TileRows {
  std::vector<RowSpans> spans;
  std::vector<BlockKind> kinds;
};
template <typename T>
const TileRows* tile_rows(const Problem<T>& p, int b, int i0, int i1, int k0, int k1) {
  const SeqLens& L = p.seqs->lens[b];
  const int n_q = p.seqs->n_q[b];
  thread_local TileRows t;
  t.spans.resize(i1 - i0);
  t.kinds.resize(i1 - i0);
  bool any = false;
  for (int i = i0; i < i1; ++i) {
    t.spans[i - i0] = beacon::row_spans(L, n_q, i, p.mode, p.attend_previous);
    t.kinds[i - i0] = beacon::classify_block(t.spans[i - i0], k0, k1);
    any = any || t.kinds[i - i0] != BlockKind::kSkip;
  }
  return any ? &t : nullptr;
}

template <typename T>
bool tile_probs_and_dscores(const Problem<T>& p, int b, int64_t g, int i0, int i1, int k0,
                            int k1, T* S, T* dS) {
  const int nk = k1 - k0;
  const TileRows* t = tile_rows(p, b, i0, i1, k0, k1);
  if (t == nullptr) return false;
  const std::vector<RowSpans>& spans = t->spans;
  const std::vector<BlockKind>& kinds = t->kinds;
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
std::pair<int, int> tokens_seeing(const Problem<T>& p, int b, int k0, int k1) {
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
  return {lo, hi};
}

// dq: also dQ += scale dS k for the tiles' rows (the one-pass scheme, run_backward), or null.
template <typename T>
void key_block_grads(const Problem<T>& p, int b, int64_t g, int k0, int k1, std::vector<T>& S,
                     std::vector<T>& dS, T* dk, T* dv, T* dq = nullptr) {
  const auto [lo, hi] = tokens_seeing(p, b, k0, k1);
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
    if (dq != nullptr)
      tile_gemm<T>(rows, p.dim, nk, p.scale, dS.data(), nk, 1, p.k + p.kv_off(b, g, k0), p.dim, true,
                   dq + first * p.dim, p.dim);
  }
}

// Pass 2: dQ of query tokens [i0, i1) of sequence b, all heads of kv head g:
// dQ += scale dS k over the key blocks the tokens see.
template <typename T>
int keys_seen(const Problem<T>& p, int b, int i0, int i1) {
  const SeqLens& L = p.seqs->lens[b];
  const int n_q = p.seqs->n_q[b];
  int key_end = 0;  // past the last key any token of the block sees
  for (int i = i0; i < i1; ++i)
    key_end = std::max(key_end, beacon::key_end(beacon::row_spans(L, n_q, i, p.mode,
                                                                  p.attend_previous)));
  return key_end;
}

template <typename T>
void query_block_grads(const Problem<T>& p, int b, int64_t g, int i0, int i1, std::vector<T>& S,
                       std::vector<T>& dS, T* dq) {
  const int key_end = keys_seen(p, b, i0, i1);
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

// ---- bf16 operands ------------------------------------------------------------------------
// bf16 inputs where the CPU has bf16 dot products (level avx512bf16 or amx) and head_dim is even:
// the five tile products multiply bf16 operands with fp32 accumulation (bf16_gemm.h: AMX tiles
// for the whole 16s at level amx, vdpbf16ps for the rest), P and scale * dS rounded to bf16
// before they multiply (probs_to_bf16.h), as FlashAttention-2's GPU backward does; the exp, D
// and every accumulator stay fp32. Operand layouts, made once per call (pairs: two bf16 in one
// 32-bit word, the GEMMs' B operands, bf16_gemm.h):
struct Bf16Operands {
  const uint16_t *q, *dout;           // [rows_pad, d]: Problem::row order; A of S, dP (pass 2)
  const uint32_t *q_t, *dout_t;       // [d / 2, rows_pad]: pairs of each row, B of S^T, dP^T (pass 1)
  const uint32_t *q_pairs, *do_pairs;  // [rows_pad / 2, d]: rows 2p and 2p + 1, B of dK, dV (pass 1)
  const uint16_t *k, *v;              // the caches [batch, kv_heads, capacity, d]: A of S^T, dP^T
  const uint32_t *k_t, *v_t;          // [batch, kv_heads, d / 2, capacity_16]: B of S, dP (pass 2)
  const uint32_t* k_pairs;            // [batch, kv_heads, capacity_pad / 2, d]: B of dQ (pass 2)
  int64_t rows_pad, capacity_16, capacity_pad;  // rows_pad: kRowSlack zero rows past a multiple of 16
};
// Pass 1's tiles start 0-15 rows early (their B operand, q_t's columns, on a line) and take a
// multiple of 32 columns (P^T's bf16 rows on lines): up to 47 rows past the last.
constexpr int64_t kRowSlack = 48;

// Scratch that starts on a cache line (line_aligned.h: AMX tile rows that straddle two lines
// load ~3x slower) and grows as needed; not initialised.
template <typename T>
struct LineScratch {
  beacon_cpu::LineBuffer<T> buf;
  size_t size = 0;
  T* get(int64_t n) {
    if (static_cast<size_t>(n) > size) {
      buf = beacon_cpu::line_buffer<T>(static_cast<size_t>(n));
      size = static_cast<size_t>(n);
    }
    return buf.get();
  }
};
struct Bf16Scratch {
  LineScratch<float> s, dp, lse, delta;
  LineScratch<uint16_t> p, ds;
};

// Pass 1 in bf16: the tiles are computed transposed, keys x query rows (S^T = k q^T), so that
// P^T and dS^T come out as the A operands of dV = P^T dout and dK = dS^T q (pairs along the rows)
// with no transpose. A tile starts on a row of the packed layout that is a multiple of 16 and
// spans a multiple of 32 rows (whole cache lines of q_t and of P^T, whole pairs of q_pairs): the
// rows it takes before and after the chunk's join with lse = +inf (P = 0).
void key_block_grads_bf16(const Problem<float>& p, const Bf16Operands& o, int b, int64_t g, int k0,
                          int k1, Bf16Scratch& t, float* dk, float* dv) {
  using beacon::cpu::attn::probs_to_bf16_cols;
  const auto [lo, hi] = tokens_seeing(p, b, k0, k1);
  const int nk = k1 - k0, d = static_cast<int>(p.dim), group = static_cast<int>(p.group);
  const int64_t kv = p.kv_off(b, g, k0);
  for (int i0 = lo; i0 < hi; i0 += kChunkQ) {
    const int i1 = std::min(i0 + kChunkQ, hi);
    const TileRows* tr = tile_rows(p, b, i0, i1, k0, k1);
    if (tr == nullptr) continue;
    const int64_t first = p.row(g, p.seqs->q_start[b] + i0);
    const int64_t r0 = first & ~int64_t{15};
    const int off = static_cast<int>(first - r0), rows = (i1 - i0) * group;
    const int n = (off + rows + 31) & ~31;  // columns, within rows_pad
    float *s = t.s.get(int64_t(nk) * n), *dp = t.dp.get(int64_t(nk) * n);
    float *lse = t.lse.get(n), *delta = t.delta.get(n);
    uint16_t *pt = t.p.get(int64_t(nk) * n), *dst = t.ds.get(int64_t(nk) * n);
    beacon_cpu::gemm_bf16_pairs(nk, n, d / 2, 1.0f, o.k + kv, d, o.q_t + r0, o.rows_pad, false, s, n);
    beacon_cpu::gemm_bf16_pairs(nk, n, d / 2, 1.0f, o.v + kv, d, o.dout_t + r0, o.rows_pad, false, dp, n);
    for (int c = 0; c < n; ++c) {
      const int r = c - off;
      const bool live = r >= 0 && r < rows && tr->kinds[r / group] != BlockKind::kSkip;
      lse[c] = live ? p.lse[first + r] : std::numeric_limits<float>::infinity();
      delta[c] = live ? p.delta[first + r] : 0.0f;
    }
    probs_to_bf16_cols(s, dp, nk, n, p.scale, lse, delta, pt, dst);
    for (int r = 0; r < rows; ++r) {
      const int i = r / group;
      if (tr->kinds[i] != BlockKind::kPartial) continue;
      for (int c = 0; c < nk; ++c)
        if (!beacon::key_visible(tr->spans[i], k0 + c)) {
          pt[int64_t(c) * n + off + r] = 0;
          dst[int64_t(c) * n + off + r] = 0;
        }
    }
    beacon_cpu::gemm_bf16_pairs(nk, d, n / 2, 1.0f, pt, n, o.do_pairs + (r0 / 2) * d, d, true, dv + kv, d);
    beacon_cpu::gemm_bf16_pairs(nk, d, n / 2, 1.0f, dst, n, o.q_pairs + (r0 / 2) * d, d, true, dk + kv, d);
  }
}

// Pass 2 in bf16: S = q k^T and dP = dout v^T as in fp32, then dQ += (scale dS) k with dS rounded
// row by row (pairs along the keys, an odd block padded with a zero key).
void query_block_grads_bf16(const Problem<float>& p, const Bf16Operands& o, int b, int64_t g, int i0, int i1,
                            Bf16Scratch& t, float* dq) {
  using beacon::cpu::attn::dscores_to_bf16_row;
  const int key_end = keys_seen(p, b, i0, i1);
  const int d = static_cast<int>(p.dim), group = static_cast<int>(p.group);
  const int rows = (i1 - i0) * group;
  const int64_t first = p.row(g, p.seqs->q_start[b] + i0);
  const int64_t head = b * p.kv_heads + g;
  float *s = t.s.get(int64_t(rows) * kBlockK), *dp = t.dp.get(int64_t(rows) * kBlockK);
  uint16_t* dss = t.ds.get(int64_t(rows) * kBlockK);
  for (int k0 = 0; k0 < key_end; k0 += kBlockK) {
    const int k1 = std::min(k0 + kBlockK, key_end);
    const TileRows* tr = tile_rows(p, b, i0, i1, k0, k1);
    if (tr == nullptr) continue;
    const int nk = k1 - k0, nk_pad = (nk + 1) & ~1;
    const int64_t cols = head * (d / 2) * o.capacity_16 + k0;  // column k0 of k_t, v_t
    beacon_cpu::gemm_bf16_pairs(rows, nk, d / 2, 1.0f, o.q + first * d, d, o.k_t + cols, o.capacity_16, false, s,
                                nk);
    beacon_cpu::gemm_bf16_pairs(rows, nk, d / 2, 1.0f, o.dout + first * d, d, o.v_t + cols, o.capacity_16, false,
                                dp, nk);
    for (int r = 0; r < rows; ++r) {
      const int i = r / group;
      uint16_t* ds = dss + int64_t(r) * nk_pad;
      const float lse = p.lse[first + r];
      if (tr->kinds[i] == BlockKind::kSkip || std::isinf(lse)) {
        std::fill(ds, ds + nk_pad, uint16_t{0});
        continue;
      }
      dscores_to_bf16_row(s + int64_t(r) * nk, dp + int64_t(r) * nk, nk, nk_pad, p.scale, lse, p.delta[first + r],
                          ds);
      if (tr->kinds[i] == BlockKind::kPartial)
        for (int c = 0; c < nk; ++c)
          if (!beacon::key_visible(tr->spans[i], k0 + c)) ds[c] = 0;
    }
    const uint32_t* kp = o.k_pairs + (head * (o.capacity_pad / 2) + k0 / 2) * d;
    beacon_cpu::gemm_bf16_pairs(rows, d, nk_pad / 2, 1.0f, dss, nk_pad, kp, d, true, dq + first * d, d);
  }
}

// Whether bf16 inputs take the bf16 operand path.
bool use_bf16_backward(const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 && q.size(2) % 2 == 0 && beacon_cpu::use_bf16_dot();
}

// ---- both dtypes ----------------------------------------------------------------------------
// Runs fn(item, scratch) for items [0, n) on torch's threads, each thread pulling the next item
// (their costs differ a lot: memory blocks are seen by every row, late raw blocks by few), with
// its own tile buffers.
template <typename Scratch, typename F>
void for_each_item_dynamic(int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t w = next++; w < n; w = next++) fn(w, scratch);
  });
}

struct Work {
  int b;
  int64_t g;
  int begin, end;
};

// The one pass's items: (sequence, kv head) with queries and keys, each with all its keys.
std::vector<Work> head_work(const Sequences& seqs, int64_t kv_heads) {
  std::vector<Work> work;
  for (int b = 0; b < static_cast<int>(seqs.lens.size()); ++b) {
    const int keys = beacon::num_keys(seqs.lens[b]);
    if (seqs.n_q[b] == 0 || keys == 0) continue;
    for (int64_t g = 0; g < kv_heads; ++g) work.push_back({b, g, 0, keys});
  }
  return work;
}

// Pass 1's items: head_work's keys in blocks of kBlockK, early key blocks (seen by the most
// rows) first.
std::vector<Work> key_work(const Sequences& seqs, int64_t kv_heads) {
  std::vector<Work> work;
  for (const Work& h : head_work(seqs, kv_heads))
    for (int k0 = h.begin; k0 < h.end; k0 += kBlockK) work.push_back({h.b, h.g, k0, std::min(k0 + kBlockK, h.end)});
  return work;
}

// Pass 2's items: (sequence, kv head, query block), late query blocks (which see the most keys)
// first.
std::vector<Work> query_work(const Sequences& seqs, int64_t kv_heads) {
  std::vector<Work> work;
  for (int b = 0; b < static_cast<int>(seqs.lens.size()); ++b)
    for (int64_t g = 0; g < kv_heads; ++g)
      for (int i0 = 0; i0 < seqs.n_q[b]; i0 += kBlockQ)
        work.push_back({b, g, i0, std::min(i0 + kBlockQ, seqs.n_q[b])});
  std::stable_sort(work.begin(), work.end(), [](const Work& x, const Work& y) { return x.begin > y.begin; });
  return work;
}

// [total_q, heads, ...] -> [kv_heads, total_q, group, ...]: one GQA group's rows contiguous
// (Problem::row), in dtype (also makes a strided, e.g. expanded, tensor contiguous).
at::Tensor grouped(const at::Tensor& t, const beacon::HostAttnParams& params, at::ScalarType dtype) {
  return t.to(dtype)
      .reshape({params.total_q, params.kv_heads, params.group, t.size(2)})
      .permute({1, 0, 2, 3})
      .contiguous();
}

// The metadata of the problem (pointers to the operands left to the caller).
template <typename T>
Problem<T> problem_of(const Sequences& seqs, const beacon::HostAttnParams& params) {
  Problem<T> p{};
  p.total_q = params.total_q;
  p.kv_heads = params.kv_heads;
  p.group = params.group;
  p.capacity = params.capacity;
  p.dim = params.head_dim;
  p.scale = static_cast<T>(params.scale);  // as the forward: a scale <= 0 means 1/sqrt(head_dim)
  p.mode = params.mode;
  p.attend_previous = params.attend_previous;
  p.seqs = &seqs;
  return p;
}

// Both passes in accumulation type T (float, or double for fp64 inputs); returns the
// gradients in T.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& out, const at::Tensor& lse,
    const Sequences& seqs, const beacon::HostAttnParams& params) {
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const at::Tensor q_g = grouped(q, params, acc), do_g = grouped(dout, params, acc);
  const at::Tensor lse_g = grouped(lse.unsqueeze(-1), params, acc);
  const at::Tensor delta_g = (do_g * grouped(out, params, acc)).sum(-1, true).contiguous();  // D
  const at::Tensor k_acc = k_cache.to(acc).contiguous();
  // The B operands of S and dP (V is read only there, so only transposed).
  const at::Tensor kT_acc = k_acc.transpose(2, 3).contiguous();
  const at::Tensor vT_acc = v_cache.to(acc).transpose(2, 3).contiguous();

  at::Tensor dq_g = at::zeros_like(q_g);
  at::Tensor dk = at::zeros(k_cache.sizes(), k_cache.options().dtype(acc));
  at::Tensor dv = at::zeros(v_cache.sizes(), v_cache.options().dtype(acc));

  Problem<T> p = problem_of<T>(seqs, params);
  p.q = q_g.data_ptr<T>();
  p.dout = do_g.data_ptr<T>();
  p.lse = lse_g.data_ptr<T>();
  p.delta = delta_g.data_ptr<T>();
  p.k = k_acc.data_ptr<T>();
  p.kT = kT_acc.data_ptr<T>();
  p.vT = vT_acc.data_ptr<T>();

  struct Buffers {
    std::vector<T> S, dS;
  };
  T* dk_ptr = dk.data_ptr<T>();
  T* dv_ptr = dv.data_ptr<T>();
  T* dq_ptr = dq_g.data_ptr<T>();
  // One pass where a (sequence, kv head) can be one task: its dQ rows are its own, so dQ comes
  // from pass 1's tiles (5 tile products and one exp a tile instead of 7 and two: ~1.75x faster
  // on one thread at a training step's shapes). Both schemes add a row's key blocks in key order
  // (the results may differ in the last bit: the tile products have other row counts). Taken
  // where its rounds of tasks cost less than the two passes' finer tasks, taken as 1.5x the work.
  const std::vector<Work> heads = head_work(seqs, params.kv_heads);
  const int64_t tasks = static_cast<int64_t>(heads.size()), threads = at::get_num_threads();
  if (2 * ((tasks + threads - 1) / threads) * threads < 3 * tasks) {
    for_each_item_dynamic<Buffers>(tasks, [&](int64_t h, Buffers& t) {
      const Work& it = heads[h];
      for (int k0 = it.begin; k0 < it.end; k0 += kBlockK)
        key_block_grads(p, it.b, it.g, k0, std::min(k0 + kBlockK, it.end), t.S, t.dS, dk_ptr, dv_ptr, dq_ptr);
    });
  } else {
    const std::vector<Work> keys = key_work(seqs, params.kv_heads);
    for_each_item_dynamic<Buffers>(static_cast<int64_t>(keys.size()), [&](int64_t w, Buffers& t) {
      const Work& it = keys[w];
      key_block_grads(p, it.b, it.g, it.begin, it.end, t.S, t.dS, dk_ptr, dv_ptr);
    });
    const std::vector<Work> queries = query_work(seqs, params.kv_heads);
    for_each_item_dynamic<Buffers>(static_cast<int64_t>(queries.size()), [&](int64_t w, Buffers& t) {
      const Work& it = queries[w];
      query_block_grads(p, it.b, it.g, it.begin, it.end, t.S, t.dS, dq_ptr);
    });
  }
  const at::Tensor dq = dq_g.permute({1, 0, 2, 3}).reshape({params.total_q, params.heads, params.head_dim});
  return {dq, dk, dv};
}

// Both passes on bf16 operands (use_bf16_backward); returns the gradients in fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward_bf16(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& out, const at::Tensor& lse,
    const Sequences& seqs, const beacon::HostAttnParams& params) {
  const int64_t d = params.head_dim, rows = params.kv_heads * params.total_q * params.group;
  const int64_t rows_pad = ((rows + 15) & ~int64_t{15}) + kRowSlack, cap = params.capacity;
  const int64_t cap_16 = (cap + 15) & ~int64_t{15}, cap_pad = (cap + 1) & ~int64_t{1};
  // q and dout: rows in Problem::row order, then zero rows.
  auto rows_of = [&](const at::Tensor& t) {  // one copy: grouped()'s order written in place
    at::Tensor r = at::zeros({rows_pad, d}, t.options().dtype(at::kBFloat16));
    r.narrow(0, 0, rows)
        .view({params.kv_heads, params.total_q, params.group, d})
        .copy_(t.reshape({params.total_q, params.kv_heads, params.group, d}).permute({1, 0, 2, 3}));
    return r;
  };
  // [n, d] bf16 -> [d / 2, cols] words (pair p of row i at (p, i), zero columns past n); [n, d]
  // -> [n / 2, d] words (rows 2p, 2p + 1 of column j at (p, j)). bf16 pairs are int32 views
  // (little endian: the first of a pair is the low half, as bf16_gemm.h's layout).
  auto pairs_t = [](const at::Tensor& m, int64_t cols) {
    // contiguous(): with nothing to pad, constant_pad_nd clones the transposed view's strides
    return at::constant_pad_nd(m.view(at::kInt).transpose(-2, -1), {0, cols - m.size(-2)}).contiguous();
  };
  auto row_pairs = [](const at::Tensor& m) {
    std::vector<int64_t> s(m.sizes().begin(), m.sizes().end() - 2);
    s.insert(s.end(), {m.size(-2) / 2, 2, m.size(-1)});
    return m.reshape(s).transpose(-2, -1).contiguous();  // [..., n / 2, d, 2]
  };
  const at::Tensor q_r = rows_of(q), do_r = rows_of(dout);
  const at::Tensor q_t = pairs_t(q_r, rows_pad), do_t = pairs_t(do_r, rows_pad);
  const at::Tensor q_p = row_pairs(q_r), do_p = row_pairs(do_r);
  const at::Tensor k = k_cache.to(at::kBFloat16).contiguous(), v = v_cache.to(at::kBFloat16).contiguous();
  const at::Tensor k_t = pairs_t(k, cap_16), v_t = pairs_t(v, cap_16);  // rows on cache lines
  const at::Tensor k_p = row_pairs(cap_pad == cap ? k : at::constant_pad_nd(k, {0, 0, 0, 1}));

  const at::Tensor lse_g = grouped(lse.unsqueeze(-1), params, at::kFloat);
  const at::Tensor delta_g =  // D = rowsum(dout * out), in fp32
      (grouped(dout, params, at::kFloat) * grouped(out, params, at::kFloat)).sum(-1, true).contiguous();
  at::Tensor dq_g = at::zeros({params.kv_heads, params.total_q, params.group, d}, q.options().dtype(at::kFloat));
  at::Tensor dk = at::zeros(k_cache.sizes(), k_cache.options().dtype(at::kFloat));
  at::Tensor dv = at::zeros(v_cache.sizes(), v_cache.options().dtype(at::kFloat));

  Problem<float> p = problem_of<float>(seqs, params);
  p.lse = lse_g.data_ptr<float>();
  p.delta = delta_g.data_ptr<float>();
  auto u16 = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr()); };
  auto u32 = [](const at::Tensor& t) { return reinterpret_cast<const uint32_t*>(t.const_data_ptr()); };
  const Bf16Operands o{u16(q_r), u16(do_r), u32(q_t), u32(do_t), u32(q_p), u32(do_p), u16(k), u16(v),
                       u32(k_t), u32(v_t), u32(k_p), rows_pad, cap_16, cap_pad};

  const std::vector<Work> keys = key_work(seqs, params.kv_heads);
  float* dk_ptr = dk.data_ptr<float>();
  float* dv_ptr = dv.data_ptr<float>();
  for_each_item_dynamic<Bf16Scratch>(static_cast<int64_t>(keys.size()), [&](int64_t w, Bf16Scratch& t) {
    const Work& it = keys[w];
    key_block_grads_bf16(p, o, it.b, it.g, it.begin, it.end, t, dk_ptr, dv_ptr);
  });
  const std::vector<Work> queries = query_work(seqs, params.kv_heads);
  float* dq_ptr = dq_g.data_ptr<float>();
  for_each_item_dynamic<Bf16Scratch>(static_cast<int64_t>(queries.size()), [&](int64_t w, Bf16Scratch& t) {
    const Work& it = queries[w];
    query_block_grads_bf16(p, o, it.b, it.g, it.begin, it.end, t, dq_ptr);
  });
  const at::Tensor dq = dq_g.permute({1, 0, 2, 3}).reshape({params.total_q, params.heads, d});
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
               : use_bf16_backward(q)
                   ? run_backward_bf16(dout, q, k_cache, v_cache, out, lse, seqs, params)
                   : run_backward<float>(dout, q, k_cache, v_cache, out, lse, seqs, params);
  const auto dtype = q.scalar_type();
  return {std::get<0>(grads).to(dtype), std::get<1>(grads).to(dtype),
          std::get<2>(grads).to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(beacon, CPU, m) {
  m.impl("attention_backward", &attention_backward_cpu);
}

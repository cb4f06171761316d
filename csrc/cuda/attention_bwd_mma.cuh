// The tensor-core beacon attention backward (bf16/fp16, head dims 64 and 128): the algorithm of
// attention_bwd.cuh (delta pre-pass, a dK/dV kernel over key tiles, a dQ kernel over row
// tiles; each output written once, no atomics) with every product on mma.sync m16n8k16 (fp32
// accumulation), tiles moved by cp.async into the forward's swizzled shared-memory layout
// (kernel_traits.h) and read with ldmatrix, as in the forward (attention_fwd.cuh).
//
// dK/dV: block = 64 keys (4 warps x 16 keys) of one (sequence, KV head). The block works in the
// transposed view: keys are the MMA rows, so S^T = K Q^T and dP^T = V dO^T land in registers
// with one key per accumulator row, and the accumulators of 16 keys x 16 rows are directly the
// A fragments of dV += P^T dO and dK += dS^T Q (no shared-memory round trip). Row tiles (packed
// (query, head) rows as in the forward) stream through a two-stage cp.async buffer with their
// LSE, delta and spans; tiles no row of which sees the block's keys are never loaded.
// dQ: block = 64 packed rows (4 warps x 16 rows), key tiles streamed as in the forward:
// S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
//
// Probabilities are recomputed from the saved LSE: P = exp2(S * scale * log2(e) - lse * log2(e));
// a row with lse = +inf (it saw nothing) gets P = 0 everywhere. dS and P are rounded to the
// input dtype for the MMAs, as in FlashAttention-2.
#pragma once

#include "cuda/attention_bwd.cuh"
#include "cuda/kernel_traits.h"

namespace beacon {
namespace cuda {

constexpr float kBwdLog2e = 1.4426950408889634f;

// Copies rows of one packed (query, head) tile [row0, row0 + kRows) of (sequence, KV head) `sq`
// of q-like tensors into a swizzled [kRows, D] buffer with cp.async (zero rows past its rows).
template <typename Kt, int kRows>
__device__ __forceinline__ void cp_async_rows(typename Kt::T* dst, const void* src_base, int64_t row_stride,
                                              int64_t head_stride, const AttnParams& p, const BwdSeq& sq, int row0) {
  using T = typename Kt::T;
  constexpr int kCh = Kt::kChunks;
  for (int idx = threadIdx.x; idx < kRows * kCh; idx += Kt::kNThreads) {
    const int r = idx / kCh, c = idx % kCh;
    const int row = row0 + r;
    const bool ok = row < sq.n_rows;
    const T* src = static_cast<const T*>(src_base);
    if (ok) {
      const int64_t token = sq.q_start + row / p.group;
      const int64_t head = sq.kv_head * p.group + row % p.group;
      src += token * row_stride + head * head_stride + c * 8;
    }
    cp_async_16(dst + Kt::smem_offset(r, c), src, ok);
  }
}

// Copies keys [k0, k0 + kKeys) of one (sequence, KV head) of a cache into a swizzled buffer
// (zero past nk: stale slots never reach the MMA).
template <typename Kt, int kKeys>
__device__ __forceinline__ void cp_async_keys(typename Kt::T* dst, const typename Kt::T* base, int64_t row_stride,
                                              int k0, int nk) {
  constexpr int kCh = Kt::kChunks;
  for (int idx = threadIdx.x; idx < kKeys * kCh; idx += Kt::kNThreads) {
    const int r = idx / kCh, c = idx % kCh;
    const int key = k0 + r;
    const bool ok = key < nk;
    const int64_t kk = ok ? key : 0;
    cp_async_16(dst + Kt::smem_offset(r, c), base + kk * row_stride + c * 8, ok);
  }
}

// acc[16 x kN] += A[16 rows of a_smem, D] * B[kN rows of b_smem, D]^T for this warp (both
// buffers swizzled [rows, D]; a_row0: the warp's first A row).
template <typename Kt, int kN>
__device__ __forceinline__ void mma_abt(float (&acc)[kN / 8][4], const typename Kt::T* a_smem, int a_row0,
                                        const typename Kt::T* b_smem) {
  using T = typename Kt::T;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int ks = 0; ks < Kt::kHeadDim / 16; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, a_smem + Kt::smem_offset(a_row0 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * ks + (lane >> 4)));
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t bk[4];
      ldmatrix_x4(bk, b_smem + Kt::smem_offset(16 * np + (lane & 7) + (lane >> 4) * 8, 2 * ks + ((lane >> 3) & 1)));
      mma_16816<T>(acc[2 * np], a, bk[0], bk[1]);
      mma_16816<T>(acc[2 * np + 1], a, bk[2], bk[3]);
    }
  }
}

// acc[16 x D] += X[16 x kK] * B[kK rows of b_smem, D], X given as fp32 accumulators of an
// earlier product (rounded to T: exactly the A fragments of the m16n8k16 MMA).
template <typename Kt, int kK>
__device__ __forceinline__ void mma_xb(float (&acc)[Kt::kHeadDim / 8][4], const float (&x)[kK / 8][4],
                                       const typename Kt::T* b_smem) {
  using T = typename Kt::T;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    a[0] = pack2<T>(x[2 * kk][0], x[2 * kk][1]);
    a[1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);
    a[2] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
    a[3] = pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < Kt::kHeadDim / 16; ++dp) {
      uint32_t bv[4];
      ldmatrix_x4_trans(bv, b_smem + Kt::smem_offset(16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * dp + (lane >> 4)));
      mma_16816<T>(acc[2 * dp], a, bv[0], bv[1]);
      mma_16816<T>(acc[2 * dp + 1], a, bv[2], bv[3]);
    }
  }
}

template <int kN>
__device__ __forceinline__ void zero_acc(float (&acc)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }
}

// Stores this thread's two accumulator rows (g and g + 8 of the warp's 16) of a [16 x D]
// result times `mul` into rows dst_a / dst_b (nullptr: not written).
template <typename T, int D>
__device__ __forceinline__ void store_acc_rows(const float (&acc)[D / 8][4], float mul, T* dst_a, T* dst_b) {
  const int col = (threadIdx.x % 4) * 2;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    T* dst = i == 0 ? dst_a : dst_b;
    if (dst == nullptr) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      T* q = dst + dt * 8 + col;
      BEACON_GLOBAL_WRITE(q, 2 * sizeof(T));
      *reinterpret_cast<uint32_t*>(q) = pack2<T>(acc[dt][2 * i] * mul, acc[dt][2 * i + 1] * mul);
    }
  }
}

// The two-stage cp.async pipeline of both kernels (the forward's): the tiles of [0, n_tiles) that
// classify(t) (block-uniform, by barrier votes) does not skip are copied in by load(t, stage) one
// tile ahead and handed to consume(t, kind, stage) once they have landed. Every thread calls it,
// after committing the copies the consumer needs besides the tiles (they land with the first).
template <typename Classify, typename Load, typename Consume>
__device__ __forceinline__ void stream_tiles(int n_tiles, Classify&& classify, Load&& load, Consume&& consume) {
  auto next_tile = [&](int t, BlockKind* kind) -> int {
    for (; t < n_tiles; ++t) {
      *kind = classify(t);
      if (*kind != BlockKind::kSkip) return t;
    }
    return n_tiles;
  };
  BlockKind kind = BlockKind::kSkip;
  int tile = next_tile(0, &kind);
  if (tile < n_tiles) load(tile, 0);
  cp_async_commit();

  int stage = 0;
  while (tile < n_tiles) {
    BlockKind next_kind = BlockKind::kSkip;
    const int next = next_tile(tile + 1, &next_kind);
    if (next < n_tiles) load(next, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // the earlier copies and this tile's have landed (this thread's)
    __syncthreads();     // ... and everyone's
    consume(tile, kind, stage);
    __syncthreads();     // the next iteration's prefetch overwrites this stage
    tile = next;
    kind = next_kind;
    stage ^= 1;
  }
  cp_async_wait<0>();
}

// Keys per dK/dV block (4 warps x 16) and packed rows per streamed row tile.
template <int kHeadDim, typename T>
using BwdKeyTraits = KernelTraits<kHeadDim, 64, (kHeadDim > 64 ? 32 : 64), 4, T>;
// dQ: 64 rows (4 warps x 16) x 64-key tiles, the forward's prefill shape.
template <int kHeadDim, typename T>
using BwdRowTraits = KernelTraits<kHeadDim, 64, 64, 4, T>;

// Shared memory of the dK/dV kernel: K, V [kKeys, D]; Q, dO [2 stages, kRows, D]; per stage and
// row: lse * log2(e), delta, spans (4 ints).
template <typename Kt>
constexpr int bwd_dkdv_smem_bytes() {
  return (2 * Kt::kBlockM * Kt::kHeadDim + 4 * Kt::kBlockN * Kt::kHeadDim) * static_cast<int>(sizeof(typename Kt::T)) +
         2 * Kt::kBlockN * (2 * static_cast<int>(sizeof(float)) + 4 * static_cast<int>(sizeof(int)));
}

template <typename Kt>
__global__ void __launch_bounds__(Kt::kNThreads) beacon_attention_bwd_dkdv_mma_kernel(const AttnBwdParams p) {
  using T = typename Kt::T;
  constexpr int D = Kt::kHeadDim;
  constexpr int kKeys = Kt::kBlockM;  // MMA rows: keys
  constexpr int kRows = Kt::kBlockN;  // MMA columns: packed query rows
  static_assert(kRows <= Kt::kNThreads, "one thread stages each row of a tile");

  BEACON_DYNAMIC_SMEM(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kKeys * D;
  T* sQ = sV + kKeys * D;        // [2][kRows][D]
  T* sdO = sQ + 2 * kRows * D;   // [2][kRows][D]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kRows * D);  // [2][kRows], times log2(e)
  float* sDelta = sLse + 2 * kRows;                              // [2][kRows]
  int* sSpans = reinterpret_cast<int*>(sDelta + 2 * kRows);      // [2][kRows][4]

  const BwdSeq sq = block_seq(p);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int k0 = blockIdx.x * kKeys;
  if (sq.nq <= 0 || k0 >= sq.nk) return;  // uniform; the host zero-filled dK and dV
  const int k1 = imin(k0 + kKeys, sq.nk);
  const int n_tiles = (sq.n_rows + kRows - 1) / kRows;

  // Block-uniform kind of row tile t for the block's keys (barrier votes: every thread calls).
  auto classify = [&](int t) -> BlockKind {
    return vote_tile(sq.row(p, tid < kRows ? t * kRows + tid : kNoRow), k0, k1 - k0);
  };
  const float* delta = static_cast<const float*>(p.delta);
  auto load_rows = [&](int t, int stage) {
    cp_async_rows<Kt, kRows>(sQ + stage * kRows * D, p.q, p.q_row_stride, p.q_head_stride, p, sq, t * kRows);
    cp_async_rows<Kt, kRows>(sdO + stage * kRows * D, p.dout, p.do_row_stride, p.do_head_stride, p, sq, t * kRows);
    if (tid < kRows) {
      const RowInfo r = sq.row(p, t * kRows + tid);
      const int64_t idx = static_cast<int64_t>(r.token) * p.num_heads + r.head;
      const int i = stage * kRows + tid;
      sLse[i] = r.valid ? p.lse[idx] * kBwdLog2e : INFINITY;  // invalid rows: P = 0
      sDelta[i] = r.valid ? delta[idx] : 0.f;
      sSpans[4 * i + 0] = r.spans.head_end;
      sSpans[4 * i + 1] = r.spans.mid_begin;
      sSpans[4 * i + 2] = r.spans.mid_end;
      sSpans[4 * i + 3] = r.spans.self_key;
    }
  };

  cp_async_keys<Kt, kKeys>(sK, static_cast<const T*>(p.k) + sq.b * p.k_batch_stride + sq.kv_head * p.k_head_stride,
                           p.k_row_stride, k0, sq.nk);
  cp_async_keys<Kt, kKeys>(sV, static_cast<const T*>(p.v) + sq.b * p.v_batch_stride + sq.kv_head * p.v_head_stride,
                           p.v_row_stride, k0, sq.nk);
  cp_async_commit();

  float acc_dk[D / 8][4], acc_dv[D / 8][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  // The two keys of this thread's accumulator rows.
  const int key_a = k0 + warp * 16 + lane / 4;
  const int key_b = key_a + 8;
  stream_tiles(n_tiles, classify, load_rows, [&](int, BlockKind kind, int stage) {
    const T* cQ = sQ + stage * kRows * D;
    const T* cdO = sdO + stage * kRows * D;
    const float* cLse = sLse + stage * kRows;
    const float* cDelta = sDelta + stage * kRows;
    const int* cSpans = sSpans + 4 * stage * kRows;

    // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x kRows rows.
    float s[kRows / 8][4], dp[kRows / 8][4];
    zero_acc(s);
    zero_acc(dp);
    mma_abt<Kt, kRows>(s, sK, warp * 16, cQ);
    mma_abt<Kt, kRows>(dp, sV, warp * 16, cdO);

    // P^T (in s) and dS^T (in dp); masked entries (boundary tiles only) are 0.
    const bool partial = kind == BlockKind::kPartial;
#pragma unroll
    for (int nt = 0; nt < kRows / 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = nt * 8 + (lane % 4) * 2 + (j & 1);
        bool visible = true;
        if (partial) {
          const int* sp = cSpans + 4 * r;
          visible = key_visible(RowSpans{sp[0], sp[1], sp[2], sp[3]}, j < 2 ? key_a : key_b);
        }
        const float prob = visible ? exp2f(s[nt][j] * p.scale_log2 - cLse[r]) : 0.f;
        s[nt][j] = prob;
        dp[nt][j] = prob * (dp[nt][j] - cDelta[r]);
      }
    }

    // dV += P^T dO, dK += dS^T Q (the scale of dK applied at the end).
    mma_xb<Kt, kRows>(acc_dv, s, cdO);
    mma_xb<Kt, kRows>(acc_dk, dp, cQ);
  });

  T* dk_base = static_cast<T*>(p.dk) + sq.b * p.dkv_batch_stride + sq.kv_head * p.dkv_head_stride;
  T* dv_base = static_cast<T*>(p.dv) + sq.b * p.dkv_batch_stride + sq.kv_head * p.dkv_head_stride;
  auto row_ptr = [&](T* base, int key) -> T* { return key < sq.nk ? base + key * p.dkv_row_stride : nullptr; };
  store_acc_rows<T, D>(acc_dk, p.scale, row_ptr(dk_base, key_a), row_ptr(dk_base, key_b));
  store_acc_rows<T, D>(acc_dv, 1.f, row_ptr(dv_base, key_a), row_ptr(dv_base, key_b));
}

template <typename Kt>
__global__ void __launch_bounds__(Kt::kNThreads) beacon_attention_bwd_dq_mma_kernel(const AttnBwdParams p) {
  using T = typename Kt::T;
  constexpr int D = Kt::kHeadDim;
  constexpr int kBM = Kt::kBlockM;
  constexpr int kBN = Kt::kBlockN;

  BEACON_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + Kt::kSmemQElems;
  T* sK = sdO + Kt::kSmemQElems;      // [2][kBN][D]
  T* sV = sK + 2 * Kt::kSmemKVElems;  // [2][kBN][D]

  const BwdSeq sq = block_seq(p);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int row0 = blockIdx.x * kBM;
  if (sq.nq <= 0 || row0 >= sq.n_rows) return;  // uniform

  const RowInfo cls_row = sq.row(p, tid < kBM ? row0 + tid : kNoRow);
  const RowInfo row_a = sq.row(p, row0 + warp * 16 + lane / 4);
  const RowInfo row_b = sq.row(p, row0 + warp * 16 + lane / 4 + 8);
  const float* delta = static_cast<const float*>(p.delta);
  float lse2[2], dlt[2];  // lse * log2(e) (+inf: P = 0) and delta of the two rows
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const RowInfo& r = i == 0 ? row_a : row_b;
    const int64_t idx = static_cast<int64_t>(r.token) * p.num_heads + r.head;
    lse2[i] = r.valid ? p.lse[idx] * kBwdLog2e : INFINITY;
    dlt[i] = r.valid ? delta[idx] : 0.f;
  }

  const int nk = sq.nk;
  const int n_tiles = (block_key_end(cls_row, nk) + kBN - 1) / kBN;
  // Block-uniform kind of key tile t; a tile reaching past the cache's keys is never full (the
  // MMAs read all kBN slots: the stale ones are masked).
  auto classify = [&](int t) -> BlockKind {
    const BlockKind kind = vote_tile(cls_row, t * kBN, kBN);
    return kind == BlockKind::kFull && t * kBN + kBN > nk ? BlockKind::kPartial : kind;
  };

  cp_async_rows<Kt, kBM>(sQ, p.q, p.q_row_stride, p.q_head_stride, p, sq, row0);
  cp_async_rows<Kt, kBM>(sdO, p.dout, p.do_row_stride, p.do_head_stride, p, sq, row0);
  cp_async_commit();

  const T* k_base = static_cast<const T*>(p.k) + sq.b * p.k_batch_stride + sq.kv_head * p.k_head_stride;
  const T* v_base = static_cast<const T*>(p.v) + sq.b * p.v_batch_stride + sq.kv_head * p.v_head_stride;
  auto load_kv = [&](int t, int stage) {
    cp_async_keys<Kt, kBN>(sK + stage * Kt::kSmemKVElems, k_base, p.k_row_stride, t * kBN, nk);
    cp_async_keys<Kt, kBN>(sV + stage * Kt::kSmemKVElems, v_base, p.v_row_stride, t * kBN, nk);
  };

  float acc_dq[D / 8][4];
  zero_acc(acc_dq);
  stream_tiles(n_tiles, classify, load_kv, [&](int tile, BlockKind kind, int stage) {
    const T* cK = sK + stage * Kt::kSmemKVElems;
    const T* cV = sV + stage * Kt::kSmemKVElems;
    float s[kBN / 8][4], dp[kBN / 8][4];
    zero_acc(s);
    zero_acc(dp);
    mma_abt<Kt, kBN>(s, sQ, warp * 16, cK);
    mma_abt<Kt, kBN>(dp, sdO, warp * 16, cV);

    const int k0 = tile * kBN;
    const bool partial = kind == BlockKind::kPartial;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        bool visible = true;
        if (partial) {
          const int key = k0 + nt * 8 + (lane % 4) * 2 + (j & 1);
          visible = key < nk && key_visible(j < 2 ? row_a.spans : row_b.spans, key);
        }
        const float prob = visible ? exp2f(s[nt][j] * p.scale_log2 - lse2[j / 2]) : 0.f;
        dp[nt][j] = prob * (dp[nt][j] - dlt[j / 2]);  // dS
      }
    }
    mma_xb<Kt, kBN>(acc_dq, dp, cK);  // dQ += dS K
  });

  auto row_ptr = [&](const RowInfo& r) -> T* {
    return r.valid ? static_cast<T*>(p.dq) + static_cast<int64_t>(r.token) * p.dq_row_stride + r.head * p.dq_head_stride
                   : nullptr;
  };
  store_acc_rows<T, D>(acc_dq, p.scale, row_ptr(row_a), row_ptr(row_b));
}

template <typename T, int kHeadDim>
void run_attention_backward(const AttnBwdParams& p, cudaStream_t stream) {
  launch_bwd_delta<T>(p, stream);

  using KeyKt = BwdKeyTraits<kHeadDim, T>;
  using RowKt = BwdRowTraits<kHeadDim, T>;
  constexpr int dkdv_smem = bwd_dkdv_smem_bytes<KeyKt>();
  constexpr int dq_smem = RowKt::kSmemBytes + RowKt::kSmemQElems * static_cast<int>(sizeof(T));
  static bool dkdv_opted_in[64] = {}, dq_opted_in[64] = {};
  launch_bwd_blocks(&beacon_attention_bwd_dkdv_mma_kernel<KeyKt>, dkdv_opted_in, p.capacity, KeyKt::kBlockM,
                    KeyKt::kNThreads, dkdv_smem, p, stream);
  launch_bwd_blocks(&beacon_attention_bwd_dq_mma_kernel<RowKt>, dq_opted_in, bwd_max_rows(p), RowKt::kBlockM,
                    RowKt::kNThreads, dq_smem, p, stream);
}

}  // namespace cuda
}  // namespace beacon

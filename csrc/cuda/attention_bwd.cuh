// The beacon attention backward kernels (FlashAttention-2's algorithm), templated on kernel
// traits. With D_i = rowsum(dout_i * out_i):
//   P = exp(scale * q k^T - lse),  dP = dout v^T,  dS = P * (dP - D),
//   dV = P^T dout,  dK = scale * dS^T q,  dQ = scale * dS k.
// Three launches, each output element written by exactly one thread (no atomics, so the
// gradients are deterministic), nothing of size queries x keys:
//   1. delta:  D per (query, head), one warp each;
//   2. dK/dV:  block = (key tile, sequence, KV head); it walks the query tiles of its sequence,
//              recomputing P and dS per tile from the saved LSE, and keeps dK, dV of its keys;
//   3. dQ:     block = (row tile, sequence, KV head); it walks the key tiles its rows see.
// Rows are packed (query, query head of the KV head's group) pairs as in the forward
// (kernel_traits.h), so the dK/dV of a KV head sum over the heads of its GQA group, any group
// size. Which keys a row sees comes only from beacon_mask.h (through the forward's make_row):
// every (query tile, key tile) pair is classified once per block by a barrier vote; pairs no
// row sees are skipped (nothing loaded, nothing computed), pairs every row sees completely run
// without per-element masking.
//
// This file: the delta pre-pass (shared by both paths) and the generic path, whose math per
// tile is scalar (CUDA cores, fp32 accumulation; fp64 for fp64 inputs) on tiles staged in
// shared memory in the accumulation type, with the head dim read at run time: fp32, fp64, and
// bf16/fp16 head dims without a tensor-core instantiation (any head_dim <= 256). Correct and
// simple, not fast. bf16/fp16 at head dims 64 and 128 run the tensor-core kernels of
// attention_bwd_mma.cuh (same passes, same conventions).
//
// Resource usage: README.md, "CUDA kernels and the GPU check" (backward registers per thread).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "beacon_mask.h"
#include "cuda/attention_fwd.cuh"  // RowInfo, make_row: the forward's row packing
#include "cuda/backend.h"
#include "cuda/params.h"
#include "cuda/ptx.h"

namespace beacon {
namespace cuda {

template <typename T>
using BwdAcc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ BwdAcc<T> bwd_load(const T* p) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return *p;
  } else {
    return to_float<T>(*p);
  }
}

template <typename T>
__device__ __forceinline__ void bwd_store(T* p, BwdAcc<T> x) {
  BEACON_GLOBAL_WRITE(p, sizeof(T));  // the emulation checks that no two threads write it
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    *p = x;
  } else {
    *p = from_float<T>(x);
  }
}

// kHeadDim 0: the head dim is read from the parameters (the generic path).
template <typename T_, int kHeadDim_, int kBlock_>
struct BwdKernelTraits {
  using T = T_;
  using A = BwdAcc<T>;  // accumulation type
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlock_;  // packed rows per tile
  static constexpr int kBlockN = kBlock_;  // keys per tile
  static constexpr int kNThreads = 128;

  // Shared memory, in elements of A: Q, dO [kBlockM, D]; K, V [kBlockN, D]; P, dS
  // [kBlockM, kBlockN]; accumulators dK, dV [kBlockN, D] (the dQ kernel uses the first
  // kBlockM x D); per row LSE, D; then the rows' spans as ints.
  static constexpr int kRowInts = 5;  // head_end, mid_begin, mid_end, self_key, valid
  static int smem_bytes(int d) {
    const int elems = 2 * kBlockM * d + 2 * kBlockN * d + 2 * kBlockM * kBlockN + 2 * kBlockN * d + 2 * kBlockM;
    return elems * static_cast<int>(sizeof(A)) + kRowInts * kBlockM * static_cast<int>(sizeof(int));
  }
};

// 16 x 16 tiles (8 x 8 for fp64) so that head_dim 256 fits in shared memory.
template <typename T>
using BwdGenericTraits = BwdKernelTraits<T, 0, std::is_same_v<T, double> ? 8 : 16>;

template <typename Kt>
struct BwdSmem {
  using A = typename Kt::A;
  A *q, *dout, *k, *v, *p, *ds, *acc, *lse, *delta;
  int* rows;  // kRowInts per row

  __device__ BwdSmem(unsigned char* raw, int d) {
    constexpr int kBM = Kt::kBlockM, kBN = Kt::kBlockN;
    q = reinterpret_cast<A*>(raw);
    dout = q + kBM * d;
    k = dout + kBM * d;
    v = k + kBN * d;
    p = v + kBN * d;
    ds = p + kBM * kBN;
    acc = ds + kBM * kBN;
    lse = acc + 2 * kBN * d;
    delta = lse + kBM;
    rows = reinterpret_cast<int*>(delta + kBM);
  }
  __device__ RowSpans spans(int i) const {
    const int* r = rows + i * Kt::kRowInts;
    return RowSpans{r[0], r[1], r[2], r[3]};
  }
  __device__ bool valid(int i) const { return rows[i * Kt::kRowInts + 4] != 0; }
};

// The (sequence, KV head) of a block (blockIdx.y, blockIdx.z): its queries and lengths.
struct BwdSeq {
  int b, kv_head;
  int q_start, nq, n_rows;  // n_rows = nq * group packed (query, head) rows
  SeqLens L;
  int nk;                   // keys present, clamped to the capacity (never read past the cache)

  // Packed row `packed` of this (sequence, KV head): invalid at and past n_rows (kNoRow: none).
  __device__ __forceinline__ RowInfo row(const AttnParams& p, int packed) const {
    return make_row(p, L, q_start, nq, kv_head, packed);
  }
};

// The row of threads that have none in a block-wide vote (vote_tile, block_key_end).
constexpr int kNoRow = 0x7fffffff;

__device__ __forceinline__ BwdSeq block_seq(const AttnParams& p) {
  BwdSeq s;
  s.b = blockIdx.y;
  s.kv_head = blockIdx.z;
  s.q_start = p.cu_seqlens_q[s.b];
  s.nq = p.cu_seqlens_q[s.b + 1] - s.q_start;
  s.n_rows = s.nq * p.group;
  s.L = SeqLens{p.mem_len[s.b], p.raw_len[s.b], p.beacon_len[s.b], p.ratio[s.b]};
  s.nk = imax(0, imin(num_keys(s.L), p.capacity));
  return s;
}

// One warp per (query, head): delta = rowsum(dout * out) in the accumulation type.
template <typename T>
__global__ void __launch_bounds__(128) beacon_attention_bwd_delta_kernel(const AttnBwdParams p) {
  using A = BwdAcc<T>;
  const int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (item >= static_cast<int64_t>(p.total_q) * p.num_heads) return;  // whole warps
  const int64_t token = item / p.num_heads;
  const int64_t head = item % p.num_heads;
  const T* o = static_cast<const T*>(p.out) + token * p.o_row_stride + head * p.o_head_stride;
  const T* d_o = static_cast<const T*>(p.dout) + token * p.do_row_stride + head * p.do_head_stride;
  A sum = 0;
  for (int c = lane; c < p.head_dim; c += 32) sum += bwd_load(o + c) * bwd_load(d_o + c);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    A* delta = static_cast<A*>(p.delta) + item;
    BEACON_GLOBAL_WRITE(delta, sizeof(A));
    *delta = sum;
  }
}

// Stages one row of the tile (thread-owned: row i of the block's current query tile) in
// shared memory: its spans (invalid rows see nothing), LSE and delta.
template <typename Kt>
__device__ __forceinline__ void stage_row(const AttnBwdParams& p, const BwdSmem<Kt>& s, int i, const RowInfo& r) {
  using A = typename Kt::A;
  int* dst = s.rows + i * Kt::kRowInts;
  dst[0] = r.spans.head_end;
  dst[1] = r.spans.mid_begin;
  dst[2] = r.spans.mid_end;
  dst[3] = r.spans.self_key;
  dst[4] = r.valid ? 1 : 0;
  const int64_t idx = static_cast<int64_t>(r.token) * p.num_heads + r.head;
  s.lse[i] = r.valid ? static_cast<A>(p.lse[idx]) : A(INFINITY);
  s.delta[i] = r.valid ? static_cast<const A*>(p.delta)[idx] : A(0);
}

// Stages Q and dO of the packed rows [row0, row0 + kBlockM) (zeros past the sequence's rows).
template <typename Kt>
__device__ __forceinline__ void stage_queries(const AttnBwdParams& p, const BwdSmem<Kt>& s, int d, const BwdSeq& sq,
                                              int row0) {
  using T = typename Kt::T;
  for (int idx = threadIdx.x; idx < Kt::kBlockM * d; idx += Kt::kNThreads) {
    const int i = idx / d, c = idx % d;
    const int row = row0 + i;
    typename Kt::A qv = 0, dov = 0;
    if (row < sq.n_rows) {
      const int64_t token = sq.q_start + row / p.group;
      const int64_t head = sq.kv_head * p.group + row % p.group;
      qv = bwd_load(static_cast<const T*>(p.q) + token * p.q_row_stride + head * p.q_head_stride + c);
      dov = bwd_load(static_cast<const T*>(p.dout) + token * p.do_row_stride + head * p.do_head_stride + c);
    }
    s.q[idx] = qv;
    s.dout[idx] = dov;
  }
}

// Stages K and V of keys [k0, k0 + n_keys) (zeros past them: stale slots never enter the math).
template <typename Kt>
__device__ __forceinline__ void stage_keys(const AttnBwdParams& p, const BwdSmem<Kt>& s, int d, const BwdSeq& sq,
                                           int k0, int n_keys) {
  using T = typename Kt::T;
  const T* k_base = static_cast<const T*>(p.k) + sq.b * p.k_batch_stride + sq.kv_head * p.k_head_stride;
  const T* v_base = static_cast<const T*>(p.v) + sq.b * p.v_batch_stride + sq.kv_head * p.v_head_stride;
  for (int idx = threadIdx.x; idx < Kt::kBlockN * d; idx += Kt::kNThreads) {
    const int j = idx / d, c = idx % d;
    typename Kt::A kv = 0, vv = 0;
    if (j < n_keys) {
      const int64_t key = k0 + j;
      kv = bwd_load(k_base + key * p.k_row_stride + c);
      vv = bwd_load(v_base + key * p.v_row_stride + c);
    }
    s.k[idx] = kv;
    s.v[idx] = vv;
  }
}

// P and dS of the staged tile: rows [0, kBlockM) x keys k0 + [0, kBlockN). Masked entries,
// keys past n_keys and rows that see nothing (lse = +inf) are 0. `full`: every valid row sees
// every key of the tile (no per-element mask).
template <typename Kt>
__device__ __forceinline__ void probs_and_dscores(const AttnBwdParams& p, const BwdSmem<Kt>& s, int d, int k0,
                                                  int n_keys, bool full) {
  using A = typename Kt::A;
  constexpr int kBN = Kt::kBlockN;
  constexpr A kLog2e = A(1.4426950408889634);
  for (int e = threadIdx.x; e < Kt::kBlockM * kBN; e += Kt::kNThreads) {
    const int i = e / kBN, j = e % kBN;
    const A lse = s.lse[i];
    A prob = 0, ds = 0;
    if (s.valid(i) && lse < A(INFINITY) && j < n_keys && (full || key_visible(s.spans(i), k0 + j))) {
      const A* qi = s.q + i * d;
      const A* di = s.dout + i * d;
      const A* kj = s.k + j * d;
      const A* vj = s.v + j * d;
      A qk = 0, dp = 0;
#pragma unroll 8
      for (int c = 0; c < d; ++c) {
        qk += qi[c] * kj[c];
        dp += di[c] * vj[c];
      }
      if constexpr (std::is_same_v<A, double>) {
        prob = exp(static_cast<A>(p.scale) * qk - lse);
      } else {
        prob = exp2f(qk * p.scale_log2 - lse * kLog2e);
      }
      ds = prob * (dp - s.delta[i]);
    }
    s.p[e] = prob;
    s.ds[e] = ds;
  }
}

// How key tile [k0, k0 + n_keys) looks to the staged rows (every thread must call it: barrier
// votes). `cls` is this thread's row (threads >= kBlockM pass an invalid row).
__device__ __forceinline__ BlockKind vote_tile(const RowInfo& cls, int k0, int n_keys) {
  BlockKind kind = BlockKind::kSkip;
  if (cls.valid) kind = classify_block(cls.spans, k0, k0 + n_keys);
  if (!__syncthreads_or(kind != BlockKind::kSkip)) return BlockKind::kSkip;
  return __syncthreads_and(!cls.valid || kind == BlockKind::kFull) ? BlockKind::kFull : BlockKind::kPartial;
}

// One past the last key any row of the block sees, at most nk: the dQ kernels' key tiles stop
// there (every thread must call it: barriers). `cls` as for vote_tile.
__device__ __forceinline__ int block_key_end(const RowInfo& cls, int nk) {
  __shared__ int s_key_end;
  if (threadIdx.x == 0) s_key_end = 0;
  __syncthreads();
  if (cls.valid) atomicMax(&s_key_end, imin(key_end(cls.spans), nk));
  __syncthreads();
  return s_key_end;
}

// dK, dV of key tile blockIdx.x of (sequence blockIdx.y, KV head blockIdx.z).
template <typename Kt>
__global__ void __launch_bounds__(Kt::kNThreads) beacon_attention_bwd_dkdv_kernel(const AttnBwdParams p) {
  using T = typename Kt::T;
  using A = typename Kt::A;
  constexpr int kBM = Kt::kBlockM, kBN = Kt::kBlockN, kNT = Kt::kNThreads;
  const int d = Kt::kHeadDim > 0 ? Kt::kHeadDim : p.head_dim;
  const BwdSeq sq = block_seq(p);
  const int tid = threadIdx.x;
  const int k0 = blockIdx.x * kBN;
  if (sq.nq <= 0 || k0 >= sq.nk) return;  // uniform; the host zero-filled dK and dV
  const int n_keys = imin(kBN, sq.nk - k0);

  BEACON_DYNAMIC_SMEM(smem_raw);
  const BwdSmem<Kt> s(smem_raw, d);
  stage_keys<Kt>(p, s, d, sq, k0, n_keys);
  for (int e = tid; e < 2 * kBN * d; e += kNT) s.acc[e] = 0;

  for (int row0 = 0; row0 < sq.n_rows; row0 += kBM) {
    const RowInfo cls = sq.row(p, tid < kBM ? row0 + tid : kNoRow);
    if (tid < kBM) stage_row<Kt>(p, s, tid, cls);  // the last readers passed the barrier below
    const BlockKind kind = vote_tile(cls, k0, n_keys);
    if (kind == BlockKind::kSkip) continue;  // block-uniform
    stage_queries<Kt>(p, s, d, sq, row0);
    __syncthreads();
    probs_and_dscores<Kt>(p, s, d, k0, n_keys, kind == BlockKind::kFull);
    __syncthreads();
    // dV += P^T dO, dK += dS^T Q (scale applied at the end); each thread owns its elements.
    for (int e = tid; e < kBN * d; e += kNT) {
      const int j = e / d, c = e % d;
      A dk = 0, dv = 0;
#pragma unroll 8
      for (int i = 0; i < kBM; ++i) {
        dv += s.p[i * kBN + j] * s.dout[i * d + c];
        dk += s.ds[i * kBN + j] * s.q[i * d + c];
      }
      s.acc[e] += dk;
      s.acc[kBN * d + e] += dv;
    }
    __syncthreads();  // the next tile's staging overwrites Q, dO, P, dS and the rows
  }

  const A scale = static_cast<A>(p.scale);
  T* dk_base = static_cast<T*>(p.dk) + sq.b * p.dkv_batch_stride + sq.kv_head * p.dkv_head_stride;
  T* dv_base = static_cast<T*>(p.dv) + sq.b * p.dkv_batch_stride + sq.kv_head * p.dkv_head_stride;
  for (int e = tid; e < n_keys * d; e += kNT) {
    const int j = e / d, c = e % d;
    const int64_t off = static_cast<int64_t>(k0 + j) * p.dkv_row_stride + c;
    bwd_store(dk_base + off, s.acc[e] * scale);
    bwd_store(dv_base + off, s.acc[kBN * d + e]);
  }
}

// dQ of packed rows tile blockIdx.x of (sequence blockIdx.y, KV head blockIdx.z).
template <typename Kt>
__global__ void __launch_bounds__(Kt::kNThreads) beacon_attention_bwd_dq_kernel(const AttnBwdParams p) {
  using T = typename Kt::T;
  using A = typename Kt::A;
  constexpr int kBM = Kt::kBlockM, kBN = Kt::kBlockN, kNT = Kt::kNThreads;
  const int d = Kt::kHeadDim > 0 ? Kt::kHeadDim : p.head_dim;
  const BwdSeq sq = block_seq(p);
  const int tid = threadIdx.x;
  const int row0 = blockIdx.x * kBM;
  if (sq.nq <= 0 || row0 >= sq.n_rows) return;  // uniform

  BEACON_DYNAMIC_SMEM(smem_raw);
  const BwdSmem<Kt> s(smem_raw, d);
  const RowInfo cls = sq.row(p, tid < kBM ? row0 + tid : kNoRow);
  if (tid < kBM) stage_row<Kt>(p, s, tid, cls);
  stage_queries<Kt>(p, s, d, sq, row0);
  for (int e = tid; e < kBM * d; e += kNT) s.acc[e] = 0;

  const int key_stop = block_key_end(cls, sq.nk);  // key tiles up to the last key any row sees
  for (int k0 = 0; k0 < key_stop; k0 += kBN) {
    const int n_keys = imin(kBN, sq.nk - k0);
    const BlockKind kind = vote_tile(cls, k0, n_keys);  // also: the last tile's readers are done
    if (kind == BlockKind::kSkip) continue;
    stage_keys<Kt>(p, s, d, sq, k0, n_keys);
    __syncthreads();
    probs_and_dscores<Kt>(p, s, d, k0, n_keys, kind == BlockKind::kFull);
    __syncthreads();
    // dQ += dS K (scale applied at the end); each thread owns its elements.
    for (int e = tid; e < kBM * d; e += kNT) {
      const int i = e / d, c = e % d;
      A dq = 0;
#pragma unroll 8
      for (int j = 0; j < kBN; ++j) dq += s.ds[i * kBN + j] * s.k[j * d + c];
      s.acc[e] += dq;
    }
  }

  const A scale = static_cast<A>(p.scale);
  for (int e = tid; e < kBM * d; e += kNT) {
    const int i = e / d, c = e % d;
    const int row = row0 + i;
    if (row >= sq.n_rows) continue;
    const int64_t token = sq.q_start + row / p.group;
    const int64_t head = sq.kv_head * p.group + row % p.group;
    bwd_store(static_cast<T*>(p.dq) + token * p.dq_row_stride + head * p.dq_head_stride + c, s.acc[e] * scale);
  }
}

// Opt in to more than 48 KiB of dynamic shared memory once per (kernel, device).
template <typename Kernel>
void bwd_smem_opt_in(Kernel kernel, int smem, bool (&opted_in)[64]) {
  if (smem <= 48 * 1024) return;
  int device = 0;
  cudaGetDevice(&device);
  if (device >= 64 || !opted_in[device]) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (device < 64) opted_in[device] = true;
  }
}

// Launches `kernel` (kThreads threads, `smem` bytes of dynamic shared memory) with one block per
// `per_block` of `items` (keys for dK/dV, packed rows for dQ) of each (sequence, KV head).
// `opted_in`: the kernel's own once-per-device flags for bwd_smem_opt_in.
template <typename Kernel>
void launch_bwd_blocks(Kernel kernel, bool (&opted_in)[64], int64_t items, int per_block, int threads, int smem,
                       const AttnBwdParams& p, cudaStream_t stream) {
  bwd_smem_opt_in(kernel, smem, opted_in);
  const dim3 grid(static_cast<unsigned>((items + per_block - 1) / per_block), p.batch, p.num_kv_heads);
  BEACON_LAUNCH(kernel, grid, threads, smem, stream)(p);
}

// Packed (query, head) rows of the longest sequence: the dQ kernels' grid covers them.
inline int64_t bwd_max_rows(const AttnBwdParams& p) { return static_cast<int64_t>(p.max_seqlen_q) * p.group; }

// The delta pre-pass on `stream`: p.delta must hold total_q * num_heads accumulators.
template <typename T>
void launch_bwd_delta(const AttnBwdParams& p, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(p.total_q) * p.num_heads;
  auto kernel = &beacon_attention_bwd_delta_kernel<T>;
  BEACON_LAUNCH(kernel, static_cast<unsigned>((warps * 32 + 127) / 128), 128, 0, stream)(p);
}

// The three launches of the scalar kernels on `stream`. dq, dk and dv must be zero-filled
// (slots no row sees, and rows outside every sequence, are not written).
template <typename Kt>
void launch_attention_bwd(const AttnBwdParams& p, cudaStream_t stream) {
  launch_bwd_delta<typename Kt::T>(p, stream);

  const int smem = Kt::smem_bytes(p.head_dim);
  static bool dkdv_opted_in[64] = {}, dq_opted_in[64] = {};
  launch_bwd_blocks(&beacon_attention_bwd_dkdv_kernel<Kt>, dkdv_opted_in, p.capacity, Kt::kBlockN, Kt::kNThreads,
                    smem, p, stream);
  launch_bwd_blocks(&beacon_attention_bwd_dq_kernel<Kt>, dq_opted_in, bwd_max_rows(p), Kt::kBlockM, Kt::kNThreads,
                    smem, p, stream);
}

}  // namespace cuda
}  // namespace beacon

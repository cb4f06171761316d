// The beacon attention forward kernel (FlashAttention-2 style), templated on kernel traits and
// on whether it writes split-KV partial results.
//
// Block (m_block, split) x sequence b x KV head: kBlockM packed rows (query, head-in-group) of
// sequence b (see kernel_traits.h), keys streamed in tiles of kBlockN with cp.async into a
// two-stage buffer, S = Q K^T and O += P V on tensor cores (mma.sync m16n8k16, fp32
// accumulation), online softmax in fp32 with exp2.
//
// Which keys a row sees comes only from beacon_mask.h (row_spans / classify_block /
// key_visible). Every key tile is classified once for the whole block (a barrier vote over the
// rows): tiles no row sees are never loaded, tiles every row sees completely run without
// per-element masking, and only the remaining (boundary) tiles evaluate key_visible per element.
// Keys at or past the sequence's M + R + B (or the capacity) are zero-filled and masked, so
// stale cache slots (possibly NaN) never reach the MMA.
//
// Fully masked rows: out = 0, lse = +inf (split-KV partials: lse = -inf, combined later).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "beacon_mask.h"
#include "cuda/backend.h"
#include "cuda/kernel_traits.h"
#include "cuda/params.h"
#include "cuda/ptx.h"

namespace beacon {
namespace cuda {

// Per-thread view of one packed row of the block.
struct RowInfo {
  bool valid;
  int token;  // packed query index (q_start + query)
  int head;   // query head
  RowSpans spans;
};

__device__ __forceinline__ RowInfo make_row(const AttnParams& p, const SeqLens& L, int q_start, int nq,
                                            int kv_head, int row) {
  RowInfo r;
  const int n_rows = nq * p.group;
  r.valid = row < n_rows;
  const int query = r.valid ? row / p.group : 0;
  r.token = q_start + query;
  r.head = kv_head * p.group + (r.valid ? row % p.group : 0);
  r.spans = RowSpans{0, 0, 0, -1};  // invalid rows see nothing
  if (r.valid) {
    r.spans = row_spans(L, nq, query, static_cast<Mode>(p.mode), p.attend_previous);
  }
  return r;
}

template <typename Kt, bool kSplit>
__global__ void __launch_bounds__(Kt::kNThreads) beacon_attention_fwd_kernel(const AttnParams p) {
  using T = typename Kt::T;
  constexpr int D = Kt::kHeadDim;
  constexpr int kBM = Kt::kBlockM;
  constexpr int kBN = Kt::kBlockN;
  constexpr int kNT = Kt::kNThreads;
  constexpr int kCh = Kt::kChunks;

  BEACON_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Kt::kSmemQElems;      // [2][kBN][D]
  T* sV = sK + 2 * Kt::kSmemKVElems;  // [2][kBN][D]

  const int num_splits = kSplit ? p.num_splits : 1;
  const int m_block = blockIdx.x / num_splits;
  const int split = blockIdx.x % num_splits;
  const int b = blockIdx.y;
  const int kv_head = blockIdx.z;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  const int q_start = p.cu_seqlens_q[b];
  const int nq = p.cu_seqlens_q[b + 1] - q_start;
  const int row0 = m_block * kBM;
  if (nq <= 0 || row0 >= nq * p.group) return;  // uniform over the block

  const SeqLens L{p.mem_len[b], p.raw_len[b], p.beacon_len[b], p.ratio[b]};
  // Keys present in the cache; clamped so that inconsistent lengths can never read past it.
  const int nk = imax(0, imin(num_keys(L), p.capacity));

  // This thread's row for the block-wide tile classification (threads >= kBM are neutral).
  const RowInfo cls_row = make_row(p, L, q_start, nq, kv_head, tid < kBM ? row0 + tid : 0x7fffffff);
  // The two rows this thread holds in the MMA accumulators (g and g + 8 of its warp's 16).
  const RowInfo row_a = make_row(p, L, q_start, nq, kv_head, row0 + warp * 16 + lane / 4);
  const RowInfo row_b = make_row(p, L, q_start, nq, kv_head, row0 + warp * 16 + lane / 4 + 8);

  // Key tiles of this block: [tile_begin, tile_end), cut at the last key any row sees.
  __shared__ int s_key_end;
  if (tid == 0) s_key_end = 0;
  __syncthreads();
  if (cls_row.valid) atomicMax(&s_key_end, imin(key_end(cls_row.spans), nk));
  __syncthreads();
  const int n_tiles = (s_key_end + kBN - 1) / kBN;
  int tile_begin = 0, tile_end = n_tiles;
  if constexpr (kSplit) {
    const int per_split = (n_tiles + num_splits - 1) / num_splits;
    tile_begin = imin(split * per_split, n_tiles);
    tile_end = imin(tile_begin + per_split, n_tiles);
  }

  // Block-uniform kind of key tile t (barrier votes: every thread must call it).
  auto classify = [&](int t) -> BlockKind {
    const int k0 = t * kBN, k1 = k0 + kBN;
    BlockKind kind = BlockKind::kSkip;
    if (cls_row.valid) {
      kind = classify_block(cls_row.spans, k0, k1);
      if (kind == BlockKind::kFull && k1 > nk) kind = BlockKind::kPartial;
    }
    if (!__syncthreads_or(kind != BlockKind::kSkip)) return BlockKind::kSkip;
    return __syncthreads_and(!cls_row.valid || kind == BlockKind::kFull) ? BlockKind::kFull
                                                                        : BlockKind::kPartial;
  };
  auto next_tile = [&](int t, BlockKind* kind) -> int {
    for (; t < tile_end; ++t) {
      *kind = classify(t);
      if (*kind != BlockKind::kSkip) return t;
    }
    return tile_end;
  };

  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k) + b * p.k_batch_stride + kv_head * p.k_head_stride;
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_batch_stride + kv_head * p.v_head_stride;

  // Q tile (zero rows past the sequence's packed rows).
  for (int idx = tid; idx < kBM * kCh; idx += kNT) {
    const int r = idx / kCh, c = idx % kCh;
    const int row = row0 + r;
    const bool ok = row < nq * p.group;
    const T* src = q_base;
    if (ok) {
      const int token = q_start + row / p.group;
      const int head = kv_head * p.group + row % p.group;
      src = q_base + token * p.q_row_stride + head * p.q_head_stride + c * 8;
    }
    cp_async_16(sQ + Kt::smem_offset(r, c), src, ok);
  }
  cp_async_commit();

  auto load_kv = [&](int t, int stage) {
    T* dK = sK + stage * Kt::kSmemKVElems;
    T* dV = sV + stage * Kt::kSmemKVElems;
    for (int idx = tid; idx < kBN * kCh; idx += kNT) {
      const int r = idx / kCh, c = idx % kCh;
      const int key = t * kBN + r;
      const bool ok = key < nk;
      const int64_t kk = ok ? key : 0;
      cp_async_16(dK + Kt::smem_offset(r, c), k_base + kk * p.k_row_stride + c * 8, ok);
      cp_async_16(dV + Kt::smem_offset(r, c), v_base + kk * p.v_row_stride + c * 8, ok);
    }
  };

  float acc_o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc_o[i][j] = 0.f;
  }
  float row_max[2] = {-INFINITY, -INFINITY};  // in units of scores * scale * log2(e)
  float row_sum[2] = {0.f, 0.f};              // this thread's partial sums (quad-reduced at the end)

  BlockKind kind = BlockKind::kSkip;
  int tile = next_tile(tile_begin, &kind);
  if (tile < tile_end) load_kv(tile, 0);
  cp_async_commit();

  int stage = 0;
  while (tile < tile_end) {
    BlockKind next_kind = BlockKind::kSkip;
    const int next = next_tile(tile + 1, &next_kind);
    if (next < tile_end) load_kv(next, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of Q and of `tile` have landed
    __syncthreads();     // ... and everyone else's

    const T* cK = sK + stage * Kt::kSmemKVElems;
    const T* cV = sV + stage * Kt::kSmemKVElems;

    // S = Q K^T for this warp's 16 rows x kBN keys.
    float s[kBN / 8][4];
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[4];
      ldmatrix_x4(a, sQ + Kt::smem_offset(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * ks + (lane >> 4)));
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t bk[4];
        ldmatrix_x4(bk, cK + Kt::smem_offset(16 * np + (lane & 7) + (lane >> 4) * 8, 2 * ks + ((lane >> 3) & 1)));
        mma_16816<T>(s[2 * np], a, bk[0], bk[1]);
        mma_16816<T>(s[2 * np + 1], a, bk[2], bk[3]);
      }
    }

    // Scale, mask (boundary tiles only), online softmax.
    const int k0 = tile * kBN;
    const bool partial = kind == BlockKind::kPartial;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float x = s[nt][j] * p.scale_log2;
        if (partial) {
          const int key = k0 + nt * 8 + (lane % 4) * 2 + (j & 1);
          const RowSpans& sp = (j < 2) ? row_a.spans : row_b.spans;
          if (key >= nk || !key_visible(sp, key)) x = -INFINITY;
        }
        s[nt][j] = x;
        tile_max[j / 2] = fmaxf(tile_max[j / 2], x);
      }
    }
    float scale_o[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
      const float new_max = fmaxf(row_max[i], tile_max[i]);
      // A row that has seen nothing yet keeps max -inf; use 0 so that exp2(-inf - 0) = 0.
      const float ref = new_max == -INFINITY ? 0.f : new_max;
      scale_o[i] = exp2f(row_max[i] - ref);
      row_max[i] = new_max;
      row_sum[i] *= scale_o[i];
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        s[nt][2 * i] = exp2f(s[nt][2 * i] - ref);
        s[nt][2 * i + 1] = exp2f(s[nt][2 * i + 1] - ref);
        row_sum[i] += s[nt][2 * i] + s[nt][2 * i + 1];
      }
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      acc_o[dt][0] *= scale_o[0];
      acc_o[dt][1] *= scale_o[0];
      acc_o[dt][2] *= scale_o[1];
      acc_o[dt][3] *= scale_o[1];
    }

    // O += P V: the S accumulators of keys 16kk..16kk+15 are exactly an A fragment.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, cV + Kt::smem_offset(16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * dp + (lane >> 4)));
        mma_16816<T>(acc_o[2 * dp], a, bv[0], bv[1]);
        mma_16816<T>(acc_o[2 * dp + 1], a, bv[2], bv[3]);
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
    tile = next;
    kind = next_kind;
    stage ^= 1;
  }
  cp_async_wait<0>();

  // Epilogue: normalise, write out (or the split's partial) and the log-sum-exp.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 1);
    row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 2);
    const RowInfo& r = i == 0 ? row_a : row_b;
    if (!r.valid) continue;
    const bool seen = row_sum[i] > 0.f;
    const float inv = seen ? 1.f / row_sum[i] : 0.f;
    constexpr float kLn2 = 0.6931471805599453f;
    const float lse = seen ? (row_max[i] + __log2f(row_sum[i])) * kLn2 : (kSplit ? -INFINITY : INFINITY);
    const int col = (lane % 4) * 2;
    if constexpr (kSplit) {
      const int64_t idx = (static_cast<int64_t>(split) * p.total_q + r.token) * p.num_heads + r.head;
      float* o = p.out_accum + idx * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<float2*>(o + dt * 8 + col) =
            make_float2(acc_o[dt][2 * i] * inv, acc_o[dt][2 * i + 1] * inv);
      }
      if (lane % 4 == 0) p.lse_accum[idx] = lse;
    } else {
      T* o = static_cast<T*>(p.out) + r.token * p.o_row_stride + r.head * p.o_head_stride;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<uint32_t*>(o + dt * 8 + col) =
            pack2<T>(acc_o[dt][2 * i] * inv, acc_o[dt][2 * i + 1] * inv);
      }
      if (lane % 4 == 0) p.lse[static_cast<int64_t>(r.token) * p.num_heads + r.head] = lse;
    }
  }
}

template <typename Kt, bool kSplit>
void launch_attention_fwd(const AttnParams& p, int num_m_blocks, cudaStream_t stream) {
  auto kernel = &beacon_attention_fwd_kernel<Kt, kSplit>;
  constexpr int smem = Kt::kSmemBytes;
  if constexpr (smem > 48 * 1024) {
    // Opt in to > 48 KiB once per device (not on every call: the first call normally happens
    // before any CUDA-graph capture, and replays need no host work).
    static bool opted_in[64] = {};
    int device = 0;
    cudaGetDevice(&device);
    if (device >= 64 || !opted_in[device]) {
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (device < 64) opted_in[device] = true;
    }
  }
  const int splits = kSplit ? p.num_splits : 1;
  dim3 grid(num_m_blocks * splits, p.batch, p.num_kv_heads);
  BEACON_LAUNCH(kernel, grid, Kt::kNThreads, smem, stream)(p);
}

template <typename T, int kHeadDim>
void run_attention_prefill(const AttnParams& p, cudaStream_t stream) {
  using Kt = PrefillTraits<kHeadDim, T>;
  const int64_t rows = static_cast<int64_t>(p.max_seqlen_q) * p.group;
  const int num_m_blocks = static_cast<int>((rows + Kt::kBlockM - 1) / Kt::kBlockM);
  launch_attention_fwd<Kt, false>(p, num_m_blocks, stream);
}

}  // namespace cuda
}  // namespace beacon

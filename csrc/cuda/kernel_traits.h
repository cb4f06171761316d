// Tile shapes and the shared-memory layout of the CUDA beacon attention kernels.
//
// One thread block computes kBlockM "rows" of one (sequence, KV head): a row is a (query,
// query head of the KV head's group) pair, rows = query * group + head_in_group, so a K/V tile
// is loaded once for every query head of its GQA group, for any group size (no template per
// group size). Warps are stacked along M (16 rows each, one m16 MMA row block per warp) and
// share the K/V tile, as in FlashAttention-2.
//
// Shared memory: Q [kBlockM, D], K and V [2 stages, kBlockN, D] each, rows of D 16-bit values.
// 16-byte chunk c of row r is stored at chunk (c ^ (r & 7)) of that row (an XOR swizzle): the
// 8 rows read by one ldmatrix 8x8 matrix then hit 8 different 16-byte bank groups (rows are a
// multiple of 128 bytes long), so ldmatrix and the cp.async writes are bank-conflict free.
//
// Resource usage: see the PTXAS_USAGE table at the end of this file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace beacon {
namespace cuda {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, typename T_>
struct KernelTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = 32 * kNWarps;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row

  static_assert(kBlockM == 16 * kNWarps, "one m16 row block per warp");
  static_assert(kHeadDim % 64 == 0, "rows must be a multiple of 128 bytes for the swizzle");
  static_assert(kBlockN % 16 == 0, "key tiles are consumed 16 keys per MMA k-step");

  static constexpr int kSmemQElems = kBlockM * kHeadDim;
  static constexpr int kSmemKVElems = kBlockN * kHeadDim;  // one stage of K (or V)
  static constexpr int kSmemBytes = (kSmemQElems + 4 * kSmemKVElems) * static_cast<int>(sizeof(T));

  // Element offset of chunk `chunk` (8 values) of tile row `row`.
  static __device__ __forceinline__ int smem_offset(int row, int chunk) {
    return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
  }
};

// Prefill: 64 rows x 64 keys per tile, 4 warps. Shared memory 40 KiB (D=64) / 80 KiB (D=128).
template <int kHeadDim, typename T>
using PrefillTraits = KernelTraits<kHeadDim, 64, 64, 4, T>;

// Decode (split-KV): one warp, 16 rows (the query heads of a GQA group), 64 keys per tile.
// Shared memory 34 KiB (D=64) / 68 KiB (D=128), so several blocks share an SM and keep enough
// bytes in flight; the splits give the parallelism across the keys of a sequence.
template <int kHeadDim, typename T>
using DecodeTraits = KernelTraits<kHeadDim, 16, 64, 1, T>;

// PTXAS_USAGE, measured with `-Xptxas -v` (CMAKE_ARGS=-DBEACON_OPS_PTXAS_VERBOSE=ON), nvcc 13.0,
// registers per thread; every kernel: 0 bytes stack frame, 0 bytes spill stores/loads;
// static shared memory 128 bytes (plus the dynamic tiles above). bf16 and fp16 alike.
//   kernel                                sm_80   sm_90 (sm_90a: the same)
//   prefill  D=64  (64x64 tile, 4 warps)   136     135
//   prefill  D=128 (64x64 tile, 4 warps)   177     181
//   decode   D=64  (16x64 tile, 1 warp)    138     138
//   decode   D=128 (16x64 tile, 1 warp)    180     180
//   split-KV combine (D=64, 128)            32      32
//   simple path (attention_generic.cu)     59-62   59-62  (fp32 / fp16 / bf16)
// Occupancy: prefill D=128 fits 2 blocks (8 warps) per SM on sm_80 and sm_90 (registers and
// 2 x 80 KiB shared memory); decode D=128 fits 3 blocks per SM on sm_90 (3 x 68 KiB).

}  // namespace cuda
}  // namespace beacon

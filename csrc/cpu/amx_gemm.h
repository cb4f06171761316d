// bf16 block GEMM on AMX tiles (cpu_isa() level amx): the tile-aligned part of bf16_gemm.h's
// C [M x N] (+)= alpha * A Bp for alpha = 1 (the attention kernel scales in its softmax), with
// the same operands. AMX's tdpbf16ps multiplies a tile of A (16 rows x 32 bf16, i.e. 16 pairs)
// by a tile of B in exactly the pair ("VNNI") layout bf16_gemm.h uses (16 pair rows x 16 words),
// so both operands load straight from where they lie.
//
// Here M, N and Kp are multiples of 16 (the caller, gemm_bf16_pairs, gives the rest, and any
// alpha != 1, to the AVX-512-BF16 kernel). C is blocked 32 x 32 in four accumulator tiles
// (tmm0-3) with two A tiles (tmm4-5) and two B tiles (tmm6-7): four loads feed four tile products
// per 16 pairs. The tile configuration is loaded at each call and released at its end: other code
// on the thread (oneDNN's matmuls) configures the tiles its own way, and released tiles cost a
// context switch nothing. The tile intrinsics are inline asm without memory operands that the
// compiler sees, so compiler barriers order them against the C++ reads and writes of the same
// buffers.
#pragma once

#include <cstdint>

#include "cpu/cpu_isa.h"

#ifdef BEACON_CPU_X86
#define BEACON_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-bf16")))
#define BEACON_COMPILER_BARRIER() __asm__ volatile("" ::: "memory")

namespace beacon_cpu::amx {

// Palette 1, tiles 0-7 all 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// One block of C: R x NC tiles of 16 x 16 (R, NC in {1, 2}) at C, over Kp pairs, accumulated in
// the tiles themselves (C loaded into them first when accumulating).
template <int R, int NC>
BEACON_AMX_TARGET inline void block(int Kp, const uint16_t* A, int64_t lda, const uint32_t* Bp, int64_t ldb,
                                    bool accumulate, float* C, int64_t ldc) {
  const int64_t sa = lda * 2, sb = ldb * 4, sc = ldc * 4;  // row strides in bytes
  float* c1 = C + 16 * ldc;
  if (accumulate) {
    BEACON_COMPILER_BARRIER();
    _tile_loadd(0, C, sc);
    if constexpr (NC == 2) _tile_loadd(1, C + 16, sc);
    if constexpr (R == 2) _tile_loadd(2, c1, sc);
    if constexpr (R == 2 && NC == 2) _tile_loadd(3, c1 + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (NC == 2) _tile_zero(1);
    if constexpr (R == 2) _tile_zero(2);
    if constexpr (R == 2 && NC == 2) _tile_zero(3);
  }
  for (int p = 0; p < Kp; p += 16) {
    _tile_loadd(4, A + 2 * p, sa);
    if constexpr (R == 2) _tile_loadd(5, A + 16 * lda + 2 * p, sa);
    _tile_loadd(6, Bp + p * ldb, sb);
    if constexpr (NC == 2) _tile_loadd(7, Bp + p * ldb + 16, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NC == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (R == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (R == 2 && NC == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, sc);
  if constexpr (NC == 2) _tile_stored(1, C + 16, sc);
  if constexpr (R == 2) _tile_stored(2, c1, sc);
  if constexpr (R == 2 && NC == 2) _tile_stored(3, c1 + 16, sc);
  BEACON_COMPILER_BARRIER();
}

// C [M x N] = A Bp (+ C when accumulate); M, N, Kp multiples of 16 (see the top).
BEACON_AMX_TARGET inline void gemm_bf16_pairs_tiles(int M, int N, int Kp, const uint16_t* A, int64_t lda,
                                                    const uint32_t* Bp, int64_t ldb, bool accumulate,
                                                    float* C, int64_t ldc) {
  static const TileConfig config;
  BEACON_COMPILER_BARRIER();
  _tile_loadconfig(&config);
  for (int i0 = 0; i0 < M; i0 += 32) {
    const bool two_rows = M - i0 >= 32;
    const uint16_t* a = A + i0 * lda;
    for (int j0 = 0; j0 < N; j0 += 32) {
      const bool two_cols = N - j0 >= 32;
      const uint32_t* b = Bp + j0;
      float* c = C + i0 * ldc + j0;
      if (two_rows && two_cols) block<2, 2>(Kp, a, lda, b, ldb, accumulate, c, ldc);
      else if (two_rows) block<2, 1>(Kp, a, lda, b, ldb, accumulate, c, ldc);
      else if (two_cols) block<1, 2>(Kp, a, lda, b, ldb, accumulate, c, ldc);
      else block<1, 1>(Kp, a, lda, b, ldb, accumulate, c, ldc);
    }
  }
  _tile_release();
  BEACON_COMPILER_BARRIER();
}

}  // namespace beacon_cpu::amx

#undef BEACON_COMPILER_BARRIER
#undef BEACON_AMX_TARGET
#endif

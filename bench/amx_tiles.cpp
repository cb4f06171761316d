// AMX tile probe: what the bf16 prefill's tile GEMMs (csrc/cpu/amx_gemm.h) can reach on this CPU.
// Times, in turns over several rounds (shared machines are noisy; medians are printed):
//   dp     tdpbf16ps alone on resident tiles (two accumulators): the multiply rate;
//   load   tileloadd of 1 KB tiles from L1, alone: from 64-byte lines (as the kernel's scratch,
//          csrc/cpu/line_aligned.h) and 16 bytes off them (what new[] and std::vector give);
//   block  the 2 x 2 block's step, as amx_gemm.h runs it: two A and two B tiles loaded, four products;
//   qk, pv gemm_bf16_pairs_tiles on the attention kernel's two shapes (d 128, a 192-row query tile,
//          a 256-key block): scores^T = K Q^T, and acc += P V.
// Build and run: `make bench-amx` (no torch needed). On a CPU without AMX it says so and exits 0.
#include <algorithm>
#include <cstdlib>
#include <chrono>
#include <cstdio>
#include <vector>

#include "cpu/amx_gemm.h"
#include "cpu/cpu_isa.h"
#include "cpu/line_aligned.h"

#ifdef BEACON_CPU_X86
#define PROBE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-bf16")))
namespace {
using beacon_cpu::amx::TileConfig;

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

constexpr double kTileFlops = 2.0 * 16 * 16 * 32;  // one tdpbf16ps

PROBE_TARGET void dp_only(int n) {
  for (int i = 0; i < n; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 7);
  }
}

PROBE_TARGET void load_only(int n, const char* a) {
  for (int i = 0; i < n; ++i) {
    _tile_loadd(4, a, 64);
    _tile_loadd(5, a + 1024, 64);
  }
}

// amx_gemm.h's block<2, 2> step over `steps` pairs of 16, tiles contiguous (1 KB each).
PROBE_TARGET void block_steps(int n, int steps, const char* a, const char* b) {
  for (int i = 0; i < n; ++i)
    for (int p = 0; p < steps; ++p) {
      _tile_loadd(4, a + p * 2048, 64);
      _tile_loadd(5, a + p * 2048 + 1024, 64);
      _tile_loadd(6, b + p * 2048, 64);
      _tile_loadd(7, b + p * 2048 + 1024, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
}

PROBE_TARGET void configure() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}
PROBE_TARGET void release() { _tile_release(); }
PROBE_TARGET void zero_accumulators() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}
PROBE_TARGET void load_operands(const char* a) {
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a + 1024, 64);
  _tile_loadd(6, a + 2048, 64);
  _tile_loadd(7, a + 3072, 64);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  using beacon::cpu::Isa;
  if (!beacon::cpu::cpu_has(Isa::kAmx)) {
    std::printf("amx_tiles: this CPU (or BEACON_OPS_CPU_ISA) has no AMX-BF16 tiles; nothing to probe\n");
    return 0;
  }
  const int rounds = argc > 1 ? std::max(1, std::atoi(argv[1])) : 7;
  // Operands: varied bf16 values near 1 (the multiply's speed does not depend on them, but zeros
  // are not what attention multiplies), every buffer on a 64-byte line as the kernel's are.
  using beacon_cpu::line_buffer;
  const auto buf = line_buffer<uint16_t>(64 * 1024 + 32);
  for (size_t i = 0; i < 64 * 1024 + 32; ++i) buf[i] = static_cast<uint16_t>(0x3f00 + i % 97);
  const char* a = reinterpret_cast<const char*>(buf.get());
  const char* b = a + 32 * 1024;
  // The kernel's shapes: K [256 x 128] and Q^T pairs [64 x 192]; P [192 x 256] and V pairs [128 x 128].
  const auto K = line_buffer<uint16_t>(256 * 128), P = line_buffer<uint16_t>(192 * 256);
  const auto Qp = line_buffer<uint32_t>(64 * 192), Vp = line_buffer<uint32_t>(128 * 128);
  for (size_t i = 0; i < 256 * 128; ++i) K[i] = static_cast<uint16_t>(0x3c00 + i % 89);
  for (size_t i = 0; i < 192 * 256; ++i) P[i] = static_cast<uint16_t>(0x3c00 + i % 83);
  for (size_t i = 0; i < 64 * 192; ++i) Qp[i] = 0x3c003c00u + static_cast<uint32_t>(i % 79);
  for (size_t i = 0; i < 128 * 128; ++i) Vp[i] = 0x3c003c00u + static_cast<uint32_t>(i % 73);
  const auto S = line_buffer<float>(256 * 192), acc = line_buffer<float>(192 * 128);
  std::fill(acc.get(), acc.get() + 192 * 128, 0.0f);

  const int n_dp = 200000, n_load = 100000, n_block = 20000, steps = 8, n_gemm = 300;
  std::vector<double> dp_ns, load_ns, load_off_ns, block_gf, qk_gf, pv_gf;
  for (int r = 0; r < rounds; ++r) {
    configure();
    zero_accumulators();
    load_operands(a);
    double t = now();
    dp_only(n_dp);
    dp_ns.push_back((now() - t) / (2.0 * n_dp) * 1e9);
    t = now();
    load_only(n_load, a);
    load_ns.push_back((now() - t) / (2.0 * n_load) * 1e9);
    t = now();
    load_only(n_load, a + 16);
    load_off_ns.push_back((now() - t) / (2.0 * n_load) * 1e9);
    t = now();
    block_steps(n_block, steps, a, b);
    block_gf.push_back(4.0 * kTileFlops * n_block * steps / (now() - t) / 1e9);
    release();
    t = now();
    for (int i = 0; i < n_gemm; ++i)
      beacon_cpu::amx::gemm_bf16_pairs_tiles(256, 192, 64, K.get(), 128, Qp.get(), 192, false, S.get(), 192);
    qk_gf.push_back(2.0 * 256 * 192 * 128 * n_gemm / (now() - t) / 1e9);
    t = now();
    for (int i = 0; i < n_gemm; ++i)
      beacon_cpu::amx::gemm_bf16_pairs_tiles(192, 128, 128, P.get(), 256, Vp.get(), 128, true, acc.get(), 128);
    pv_gf.push_back(2.0 * 192 * 128 * 256 * n_gemm / (now() - t) / 1e9);
  }
  const double dp = median(dp_ns), ld = median(load_ns);
  std::printf("AMX tile probe, one thread, medians of %d rounds taken in turns:\n", rounds);
  std::printf("  tdpbf16ps alone          %6.2f ns each  (%5.0f GFLOP/s: the multiply's ceiling)\n", dp,
              kTileFlops / dp);
  std::printf("  tileloadd (1 KB, L1)     %6.2f ns each\n", ld);
  std::printf("  tileloadd 16 B off lines %6.2f ns each (every row straddles two lines)\n", median(load_off_ns));
  std::printf("  2x2 block step           %6.0f GFLOP/s (4 loads + 4 products; alone they'd take %.0f ns, "
              "serialised %.0f ns)\n",
              median(block_gf), 4 * std::max(dp, ld), 4 * (dp + ld));
  std::printf("  gemm QK^T 256x192, d 128 %6.0f GFLOP/s\n", median(qk_gf));
  std::printf("  gemm P V 192x128, 256 k  %6.0f GFLOP/s\n", median(pv_gf));
  return 0;
}
#else
int main() {
  std::printf("amx_tiles: not an x86-64 build; nothing to probe\n");
  return 0;
}
#endif

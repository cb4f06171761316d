// The one place that decides which instruction set the CPU kernels use.
//
// The build targets baseline x86-64, so every kernel that uses AVX2 or AVX-512 is compiled with
// a function-level target attribute and chosen at run time from cpu_isa(): the widest level the
// CPU has, capped by the environment variable BEACON_OPS_CPU_ISA=portable|avx2|avx512|avx512bf16|amx
// (tests force each path with it; a cap above what the CPU has changes nothing).
//   portable    plain C++ (compiler's baseline); GEMMs through ATen matmuls on views
//   avx2        AVX2 + FMA + F16C; GEMMs through torch's BLAS (sgemm_)
//   avx512      AVX-512 F/BW/VL/DQ; the project's fp32 GEMM micro-kernel
//   avx512bf16  also AVX-512-BF16: bf16 dot products (vdpbf16ps) and bf16 conversions
//   amx         also AMX-BF16 tiles (tdpbf16ps), where the kernel lets this process use them
#pragma once

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BEACON_CPU_X86 1
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace beacon::cpu {

enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// The cap named by BEACON_OPS_CPU_ISA (kAmx, i.e. no cap, when unset or unknown).
inline Isa isa_cap_from_env() {
  const char* env = std::getenv("BEACON_OPS_CPU_ISA");
  const std::string c = env ? env : "";
  if (c == "portable") return Isa::kPortable;
  if (c == "avx2") return Isa::kAvx2;
  if (c == "avx512") return Isa::kAvx512;
  if (c == "avx512bf16") return Isa::kAvx512Bf16;
  return Isa::kAmx;
}

#ifdef BEACON_CPU_X86
// AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22), and Linux's permission for this
// process to use the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA):
// without it the first tile instruction faults.
inline bool amx_usable() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 24) & 1u) || !((d >> 22) & 1u)) return false;
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

// What the CPU supports, ignoring the cap.
inline Isa detected_isa() {
#ifdef BEACON_CPU_X86
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")))
    return Isa::kPortable;
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
    return Isa::kAvx2;
  if (!__builtin_cpu_supports("avx512bf16")) return Isa::kAvx512;
  static const bool amx = amx_usable();  // asked once: the permission is per process
  return amx ? Isa::kAmx : Isa::kAvx512Bf16;
#else
  return Isa::kPortable;
#endif
}

// The level the kernels use: detected once per process, capped by BEACON_OPS_CPU_ISA.
inline Isa cpu_isa() {
  static const Isa level = [] {
    const Isa cpu = detected_isa(), cap = isa_cap_from_env();
    return static_cast<int>(cpu) < static_cast<int>(cap) ? cpu : cap;
  }();
  return level;
}

inline bool cpu_has(Isa level) { return static_cast<int>(cpu_isa()) >= static_cast<int>(level); }

// Which few-row (decode) kernels stream the cache at levels avx512 and above: decode_avx512.h's
// 512-bit ones on Intel CPUs, attention_blocks.h's AVX2 ones on others (with decode_avx512.h's
// P V of few rows streamed, and its bf16 kernels where that does not apply). AMD Zen 4 executes 512-bit
// operations as two 256-bit halves, and there its decode kernels read the cache slower than the
// AVX2 ones (one query over 3,584 fp32 keys, 8 heads: 0.41-0.59 of copy bandwidth against
// 0.70-0.73; the same 4-key loop with 512-bit loads 0.66, with 256-bit loads 0.80;
// docs/cpu-kernels-log.md, Zen 4). BEACON_OPS_CPU_DECODE=avx2|avx512 overrides the choice (tests,
// benchmarks).
// A choice between two code paths that defaults to `on` for Intel CPUs (off elsewhere, and off the
// x86 build), unless the environment variable `env` names one of them (on_name or off_name).
inline bool intel_default(const char* env, const char* on_name, const char* off_name) {
  const char* value = std::getenv(env);
  const std::string c = value ? value : "";
  if (c == on_name) return true;
  if (c == off_name) return false;
#ifdef BEACON_CPU_X86
  return __builtin_cpu_is("intel") != 0;
#else
  return false;
#endif
}

inline bool decode_avx512_preferred() {
  static const bool avx512 = intel_default("BEACON_OPS_CPU_DECODE", "avx512", "avx2");
  return avx512;
}

inline const char* isa_name(Isa level) {
  switch (level) {
    case Isa::kPortable: return "portable";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512bf16";
    default: return "amx";
  }
}

}  // namespace beacon::cpu

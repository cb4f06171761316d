// The thin pybind11 module beacon_ops._C. Loading it runs the TORCH_LIBRARY registrations of
// every translation unit linked into it; the only Python-level function is build_info().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "build_info.h"
#include "cpu/cpu_isa.h"

namespace py = pybind11;

namespace beacon_cpu {
const char* fp32_gemm_path();  // cpu/attention.cpp: the fp32 tile GEMMs' path (block_gemm.h)
const char* decode_linear_fp32_path();  // cpu/decode_linear.cpp: kernel or blas
}  // namespace beacon_cpu

namespace {
std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == sep || c == ';') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

// BEACON_OPS_CUDA_KERNELS ("kind=inst inst,kind=,...", cmake/kernel_list.cmake) as
// {kind: [instance, ...]}; an empty list: one kernel for every head dim / dtype it accepts.
py::dict kernel_kinds(const std::string& s) {
  py::dict d;
  for (const std::string& entry : split(s, ',')) {
    const size_t eq = entry.find('=');
    std::vector<std::string> insts;
    for (const std::string& inst : split(entry.substr(eq + 1), ' ')) insts.push_back(inst);
    d[py::str(entry.substr(0, eq))] = insts;
  }
  return d;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "beacon_ops native library (ops are registered under torch.ops.beacon)";
  m.def("build_info", []() {
    py::dict d;
    d["version"] = BEACON_OPS_VERSION;
    d["torch"] = BEACON_OPS_TORCH_VERSION;
#ifdef BEACON_WITH_CUDA
    d["cuda_compiled"] = true;
    d["cuda_head_dims"] = split(BEACON_OPS_HEADDIMS, ',');
    d["cuda_dtypes"] = split(BEACON_OPS_DTYPES, ',');
#else
    d["cuda_compiled"] = false;
    d["cuda_head_dims"] = std::vector<std::string>{};
    d["cuda_dtypes"] = std::vector<std::string>{};
#endif
    d["cuda_archs"] = split(BEACON_OPS_CUDA_ARCHS, ',');
    d["cutlass"] = std::string(BEACON_OPS_CUTLASS_VERSION);
    d["cuda_kernels"] = kernel_kinds(BEACON_OPS_CUDA_KERNELS);
    // The CPU kernels' instruction set: what this CPU has, and what they use (BEACON_OPS_CPU_ISA).
    d["cpu_isa_detected"] = std::string(beacon::cpu::isa_name(beacon::cpu::detected_isa()));
    d["cpu_isa"] = std::string(beacon::cpu::isa_name(beacon::cpu::cpu_isa()));
    d["cpu_fp32_gemm"] = std::string(beacon_cpu::fp32_gemm_path());  // blas, kernel or aten
    // The decode kernels: decode_avx512.h's (avx512) or the AVX2 ones (BEACON_OPS_CPU_DECODE).
    {
      using beacon::cpu::cpu_has;
      using beacon::cpu::Isa;
      d["cpu_decode"] = std::string(!cpu_has(Isa::kAvx2) ? "portable"
                                    : cpu_has(Isa::kAvx512) && beacon::cpu::decode_avx512_preferred() ? "avx512"
                                                                                                       : "avx2");
    }
    d["cpu_decode_linear_fp32"] = std::string(beacon_cpu::decode_linear_fp32_path());
    return d;
  });
}

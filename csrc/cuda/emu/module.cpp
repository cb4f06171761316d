// _cuda_emu: the CUDA ops (csrc/cuda host code and kernels) on the host emulation, registered
// as torch.ops.beacon_cuda_emu.* for CPU tensors (beacon_ops/cuda_emu.py), and the emulation's
// settings.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/emu/emulator.h"
#include "cuda/static_switch.h"

namespace beacon {
namespace emu {
void run_selftest(const std::string& name);  // selftest.cpp
}  // namespace emu
}  // namespace beacon

namespace {

void set_schedule(const std::string& name, uint64_t seed) {
  using beacon::emu::Schedule;
  if (name == "forward") {
    beacon::emu::set_schedule(Schedule::kForward, seed);
  } else if (name == "reverse") {
    beacon::emu::set_schedule(Schedule::kReverse, seed);
  } else if (name == "random") {
    beacon::emu::set_schedule(Schedule::kRandom, seed);
  } else {
    throw std::invalid_argument("schedule must be forward, reverse or random, got '" + name + "'");
  }
}

// {kind: [instance, ...]}: the tensor-core instantiations this module was built with, from the
// same BEACON_BUILT_* flags the ops dispatch on (names as in build_info()["cuda_kernels"]).
pybind11::dict built_kernels() {
  using beacon::cuda::KernelKind;
  auto names = [](const std::string& joined) {
    std::vector<std::string> out;
    for (size_t at = 0; at < joined.size();) {
      const size_t end = std::min(joined.find(' ', at), joined.size());
      out.push_back(joined.substr(at, end - at));
      at = end + 1;
    }
    return out;
  };
  pybind11::dict d;
  d["prefill"] = names(beacon::cuda::built_attention_instances<KernelKind::kPrefill>());
  d["decode"] = names(beacon::cuda::built_attention_instances<KernelKind::kDecode>());
  d["bwd"] = names(beacon::cuda::built_attention_instances<KernelKind::kBwd>());
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "The CUDA kernels of beacon_ops on a host emulation of the CUDA execution model.";
  m.def("set_schedule", &set_schedule, pybind11::arg("name"), pybind11::arg("seed") = 0,
        "Order of threads and blocks for the following launches: forward, reverse or random (seeded).");
  m.def("set_sm_count", &beacon::emu::set_sm_count, pybind11::arg("sms"),
        "Multiprocessor count the ops' host code sizes its grids by.");
  m.def("launch_count", &beacon::emu::launch_count, "Kernel launches so far.");
  m.def("run_selftest", &beacon::emu::run_selftest, pybind11::arg("name"),
        "Runs a small kernel of selftest.cpp; raises RuntimeError when a check of the emulation fails.");
  m.def("built_kernels", &built_kernels,
        "The tensor-core kernel kinds and their instances compiled in: {kind: ['hdim64_bf16', ...]}.");
}

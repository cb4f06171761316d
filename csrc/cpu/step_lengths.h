// The CPU attention kernels (forward and backward) read a step's lengths directly (free on the
// CPU) and validate them before computing anything: cu_seqlens_q against q's rows and
// max_seqlen_q, each sequence's lengths against each other and the cache capacity. Shapes and
// dtypes of these int32 tensors are checked by the caller first.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "beacon_mask.h"

namespace beacon {
namespace cpu {

inline std::vector<SeqLens> read_step_lengths(const at::Tensor& cu_seqlens_q, const at::Tensor& mem_len,
                                              const at::Tensor& raw_len, const at::Tensor& beacon_len,
                                              const at::Tensor& ratio, int64_t total_q, int64_t max_seqlen_q,
                                              int64_t capacity) {
  const int64_t batch = mem_len.size(0);
  const at::Tensor cu_c = cu_seqlens_q.contiguous();
  const at::Tensor m_c = mem_len.contiguous(), r_c = raw_len.contiguous();
  const at::Tensor b_c = beacon_len.contiguous(), ra_c = ratio.contiguous();
  const int32_t* cu = cu_c.const_data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0, "cu_seqlens_q must start at 0, got ", cu[0]);
  TORCH_CHECK(cu[batch] == total_q, "cu_seqlens_q must end at total_q = q.size(0) = ", total_q,
              ", got ", cu[batch]);
  // The whole vector first: a decreasing step is a cu_seqlens_q problem, not a max_seqlen_q one.
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(cu[b + 1] >= cu[b], "cu_seqlens_q must be non-decreasing, got cu_seqlens_q[", b, "] = ", cu[b],
                " > cu_seqlens_q[", b + 1, "] = ", cu[b + 1]);
  std::vector<SeqLens> lens(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t nq = static_cast<int64_t>(cu[b + 1]) - cu[b];
    TORCH_CHECK(nq <= max_seqlen_q, "max_seqlen_q (", max_seqlen_q, ") is smaller than sequence ", b,
                "'s query count ", nq);
    const SeqLens L{m_c.const_data_ptr<int32_t>()[b], r_c.const_data_ptr<int32_t>()[b],
                    b_c.const_data_ptr<int32_t>()[b], ra_c.const_data_ptr<int32_t>()[b]};
    TORCH_CHECK(L.mem >= 0, "mem_len[", b, "] must be >= 0, got ", L.mem);
    TORCH_CHECK(L.raw >= 0, "raw_len[", b, "] must be >= 0, got ", L.raw);
    TORCH_CHECK(L.beacon >= 0, "beacon_len[", b, "] must be >= 0, got ", L.beacon);
    TORCH_CHECK(L.ratio >= 0, "ratio[", b, "] must be >= 0, got ", L.ratio);
    TORCH_CHECK(L.beacon == 0 || L.ratio > 0, "ratio[", b, "] must be > 0 when beacon_len[", b,
                "] = ", L.beacon, " > 0");
    TORCH_CHECK(static_cast<int64_t>(L.mem) + L.raw + L.beacon <= capacity, "mem_len[", b,
                "] + raw_len[", b, "] + beacon_len[", b, "] = ",
                static_cast<int64_t>(L.mem) + L.raw + L.beacon, " exceeds the k_cache capacity ",
                capacity);
    TORCH_CHECK(nq >= L.beacon && nq <= static_cast<int64_t>(L.raw) + L.beacon, "cu_seqlens_q: sequence ",
                b, " has ", nq, " queries, which must lie in [beacon_len, raw_len + beacon_len] = [",
                L.beacon, ", ", static_cast<int64_t>(L.raw) + L.beacon, "]");
    lens[b] = L;
  }
  return lens;
}

}  // namespace cpu
}  // namespace beacon

// The generic path of the beacon attention backward: the kernels of attention_bwd.cuh with the
// head dim read at run time (any head_dim <= 256) for every input dtype (fp32, fp64, and
// bf16/fp16 head dims without a compiled instantiation). Same algorithm and conventions as the
// instantiations; smaller tiles so that head_dim 256 fits in shared memory. No torch headers
// here (compile time).
#include "cuda/attention_bwd.cuh"

namespace beacon {
namespace cuda {

template <typename T>
void run_attention_backward_generic(const AttnBwdParams& p, cudaStream_t stream) {
  launch_attention_bwd<BwdGenericTraits<T>>(p, stream);
}

template void run_attention_backward_generic<float>(const AttnBwdParams&, cudaStream_t);
template void run_attention_backward_generic<double>(const AttnBwdParams&, cudaStream_t);
template void run_attention_backward_generic<__half>(const AttnBwdParams&, cudaStream_t);
template void run_attention_backward_generic<__nv_bfloat16>(const AttnBwdParams&, cudaStream_t);

}  // namespace cuda
}  // namespace beacon

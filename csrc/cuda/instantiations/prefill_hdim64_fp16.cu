// Prefill instantiation: head dim 64, fp16. One translation unit per (head dim x dtype) so
// ninja compiles them in parallel; no torch headers here (compile time).
#include "cuda/attention_fwd.cuh"

template void beacon::cuda::run_attention_prefill<__half, 64>(const beacon::cuda::AttnParams&, cudaStream_t);

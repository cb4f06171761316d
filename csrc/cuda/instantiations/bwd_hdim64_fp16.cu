// Backward instantiation (tensor cores): head dim 64, fp16. One translation unit per (head dim x dtype)
// so ninja compiles them in parallel; no torch headers here (compile time).
#include "cuda/attention_bwd_mma.cuh"

template void beacon::cuda::run_attention_backward<__half, 64>(const beacon::cuda::AttnBwdParams&, cudaStream_t);

// Backward instantiation (tensor cores): head dim 128, bf16. One translation unit per (head dim x dtype)
// so ninja compiles them in parallel; no torch headers here (compile time).
#include "cuda/attention_bwd_mma.cuh"

template void beacon::cuda::run_attention_backward<__nv_bfloat16, 128>(const beacon::cuda::AttnBwdParams&, cudaStream_t);

// Split-KV decode instantiation: head dim 64, bf16. No torch headers here (compile time).
#include "cuda/decode_splitkv.cuh"

template void beacon::cuda::run_attention_decode<__nv_bfloat16, 64>(const beacon::cuda::AttnParams&, cudaStream_t);

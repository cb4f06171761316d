// Split-KV decode instantiation: head dim 128, fp16. No torch headers here (compile time).
#include "cuda/decode_splitkv.cuh"

template void beacon::cuda::run_attention_decode<__half, 128>(const beacon::cuda::AttnParams&, cudaStream_t);

// C launcher API of the CUDA token-statistics kernels (token_stats_cuda.cu). Plain pointers, no
// torch headers, so the .cu compiles on its own (nvcc -c) and the torch glue stays thin.
// Layouts and math: dualrpo_mcore/ops/token_stats.py. All return a cudaError_t as int.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { DUALRPO_F32 = 0, DUALRPO_BF16 = 1, DUALRPO_F16 = 2 };

// out[rows, 6 or 9] float32 partials of this shard; zr = NULL for no reference.
// ld/ldr: row strides in elements (column stride must be 1). Any rows >= 0 (64-bit).
int dualrpo_cuda_partials(const void* z, const void* zr, int dtype, const int64_t* labels,
                          int64_t rows, int64_t ld, int64_t ldr, int64_t n_real,
                          int64_t vocab_start, int64_t vocab_size, float inv_t, float* out,
                          void* stream);

// dz[rows, n_cols] (dtype of z, row stride ldd) from stats[rows, ks] = (M, logS, hbar[, Mr, D])
// and grads[rows, 4] = (c, g_H, g_SC, g_KL), both float32 and contiguous.
int dualrpo_cuda_grad(const void* z, const void* zr, void* dz, int dtype, const int64_t* labels,
                      int64_t rows, int64_t n_cols, int64_t ld, int64_t ldr, int64_t ldd,
                      int64_t n_real, int64_t vocab_start, int64_t vocab_size, float inv_t,
                      const float* stats, int64_t ks, const float* grads, void* stream);

#ifdef __cplusplus
}
#endif

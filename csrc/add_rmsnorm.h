// Fused residual add + RMSNorm over the last axis, forward and backward.
// Plain pointers, sizes and a stream: no torch headers, so nvcc compiles it anywhere.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace trm {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// The largest row length the register-resident kernels take; longer rows are refused
// (cudaErrorInvalidValue) and the caller uses another backend.
int add_rmsnorm_max_hidden(DType dtype);

// y = round(x + r) * rstd, rstd = 1 / sqrt(mean(round(x + r)^2) + eps) per row, in fp32.
// r may be null (plain RMSNorm). rstd: one float per row.
cudaError_t add_rmsnorm_forward(DType dtype, const void* x, const void* r, void* y, float* rstd, int64_t rows,
                                int n, float eps, cudaStream_t stream);

// dh = rstd * (dy - y * mean(dy * y)) with y recomputed from x and r in fp32.
// dh is the gradient of both x and r.
cudaError_t add_rmsnorm_backward(DType dtype, const void* dy, const void* x, const void* r, const float* rstd,
                                 void* dh, int64_t rows, int n, cudaStream_t stream);

}  // namespace trm

// Fused residual add + RMSNorm over the last axis, forward and backward.
// Plain pointers, sizes and a stream: no torch headers, so nvcc compiles it anywhere.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <cuda_runtime.h>

namespace trm {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// One warp per row; each lane holds up to kMaxItems loads of the row in registers: 16-byte
// vectors where the row is "aligned" (every pointer 16-byte aligned, the row a multiple of 16
// bytes), single elements otherwise.
constexpr int kWarp = 32;
constexpr int kMaxItems = 16;

constexpr int element_bytes(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

// Whether the 16-byte vector path applies to rows of n elements at these pointers.
inline bool add_rmsnorm_aligned(DType dtype, int n, std::initializer_list<const void*> pointers) {
  for (const void* p : pointers)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return (n * element_bytes(dtype)) % 16 == 0;
}

// Whether the kernels take rows of n elements: up to 4096 (bf16, fp16) or 2048 (fp32) aligned,
// 512 otherwise. Anything else is refused (cudaErrorInvalidValue); callers ask first.
constexpr bool add_rmsnorm_takes(DType dtype, int n, bool aligned) {
  const int vec = 16 / element_bytes(dtype);
  return n >= 1 && ((aligned && n % vec == 0) ? n / vec <= kWarp * kMaxItems : n <= kWarp * kMaxItems);
}
static_assert(add_rmsnorm_takes(DType::bf16, 4096, true) && !add_rmsnorm_takes(DType::bf16, 4096, false));
static_assert(add_rmsnorm_takes(DType::f16, 512, false) && !add_rmsnorm_takes(DType::f16, 520, false));
static_assert(add_rmsnorm_takes(DType::f32, 2048, true) && !add_rmsnorm_takes(DType::f32, 2052, true));

// The longest row the kernels take for this dtype (aligned rows; see add_rmsnorm_takes).
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

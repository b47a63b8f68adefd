// Fused residual add + RMSNorm over the last axis (see add_rmsnorm.h).
//
// One warp per row, 4 rows per 128-thread block. Each lane holds ITEMS packs of VEC
// elements in registers (VEC * sizeof(T) = 16 bytes when the row is 16-byte aligned), so
// x, r and y each cross memory once: at hidden 512 in bf16 a lane holds 2 packs.
// Statistics are fp32; x + r is rounded to T first, as an eager PyTorch add rounds it.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "add_rmsnorm.h"

namespace trm {
namespace {

constexpr int kRowsPerBlock = 4;

template <typename T>
__device__ __forceinline__ float to_f32(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f32(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// h = float(round_T(x + r)) for one lane's packs; zero beyond the row.
template <typename T, int VEC, int ITEMS, bool HAS_R>
__device__ __forceinline__ void load_sum(const T* x, const T* r, int64_t row, int n, int lane,
                                         float (&h)[ITEMS][VEC]) {
  using P = Pack<T, VEC>;
  const P* xp = reinterpret_cast<const P*>(x + row * n);
  const P* rp = reinterpret_cast<const P*>(r + row * n);
  const int packs = n / VEC;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = lane + i * kWarp;
    if (idx < packs) {
      P a = xp[idx];
      P b;
      if (HAS_R) b = rp[idx];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        h[i][j] = HAS_R ? to_f32(from_f32<T>(to_f32(a.v[j]) + to_f32(b.v[j]))) : to_f32(a.v[j]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) h[i][j] = 0.f;
    }
  }
}

template <typename T, int VEC, int ITEMS, bool HAS_R>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    fwd_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y, float* __restrict__ rstd,
               int64_t rows, int n, float eps) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) return;
  float h[ITEMS][VEC];
  load_sum<T, VEC, ITEMS, HAS_R>(x, r, row, n, lane, h);
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) ss += h[i][j] * h[i][j];
  const float rs = rsqrtf(warp_sum(ss) / n + eps);
  if (lane == 0) rstd[row] = rs;
  using P = Pack<T, VEC>;
  P* yp = reinterpret_cast<P*>(y + row * n);
  const int packs = n / VEC;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = lane + i * kWarp;
    if (idx < packs) {
      P o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = from_f32<T>(h[i][j] * rs);
      yp[idx] = o;
    }
  }
}

template <typename T, int VEC, int ITEMS, bool HAS_R>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r,
               const float* __restrict__ rstd, T* __restrict__ dh, int64_t rows, int n) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) return;
  float h[ITEMS][VEC];
  load_sum<T, VEC, ITEMS, HAS_R>(x, r, row, n, lane, h);
  using P = Pack<T, VEC>;
  const P* dyp = reinterpret_cast<const P*>(dy + row * n);
  const int packs = n / VEC;
  const float rs = rstd[row];
  float g[ITEMS][VEC];
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = lane + i * kWarp;
    P d;
    if (idx < packs) d = dyp[idx];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      g[i][j] = idx < packs ? to_f32(d.v[j]) : 0.f;
      h[i][j] *= rs;  // now y
      dot += g[i][j] * h[i][j];
    }
  }
  const float mean = warp_sum(dot) / n;
  P* dhp = reinterpret_cast<P*>(dh + row * n);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = lane + i * kWarp;
    if (idx < packs) {
      P o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = from_f32<T>(rs * (g[i][j] - h[i][j] * mean));
      dhp[idx] = o;
    }
  }
}

// Calls f.template operator()<VEC, ITEMS>() with the smallest ITEMS (a power of two) that
// covers the row; VEC is 16 bytes of T where every row starts 16-byte aligned, else 1. What
// it refuses is what add_rmsnorm_takes says it does not take.
template <typename T, typename F>
cudaError_t dispatch(int n, bool aligned, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  if (aligned && n % kVec == 0) {
    const int packs = n / kVec;
    if (packs <= kWarp * 1) return f.template operator()<kVec, 1>();
    if (packs <= kWarp * 2) return f.template operator()<kVec, 2>();
    if (packs <= kWarp * 4) return f.template operator()<kVec, 4>();
    if (packs <= kWarp * 8) return f.template operator()<kVec, 8>();
    if (packs <= kWarp * kMaxItems) return f.template operator()<kVec, kMaxItems>();
    return cudaErrorInvalidValue;
  }
  if (n <= kWarp * 1) return f.template operator()<1, 1>();
  if (n <= kWarp * 4) return f.template operator()<1, 4>();
  if (n <= kWarp * kMaxItems) return f.template operator()<1, kMaxItems>();
  return cudaErrorInvalidValue;
}

template <typename T>
constexpr DType dtype_of() {
  return sizeof(T) == 4 ? DType::f32 : DType::f16;  // (the 16-bit types share their sizes and limits)
}

template <typename T>
cudaError_t forward_t(const void* x, const void* r, void* y, float* rstd, int64_t rows, int n, float eps,
                      cudaStream_t stream) {
  const bool aligned = add_rmsnorm_aligned(dtype_of<T>(), n, {x, r, y});
  const dim3 grid(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock)), block(kWarp * kRowsPerBlock);
  const T* xt = static_cast<const T*>(x);
  const T* rt = static_cast<const T*>(r);
  T* yt = static_cast<T*>(y);
  return dispatch<T>(n, aligned, [&]<int VEC, int ITEMS>() {
    if (r != nullptr)
      fwd_kernel<T, VEC, ITEMS, true><<<grid, block, 0, stream>>>(xt, rt, yt, rstd, rows, n, eps);
    else
      fwd_kernel<T, VEC, ITEMS, false><<<grid, block, 0, stream>>>(xt, rt, yt, rstd, rows, n, eps);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t backward_t(const void* dy, const void* x, const void* r, const float* rstd, void* dh, int64_t rows,
                       int n, cudaStream_t stream) {
  const bool aligned = add_rmsnorm_aligned(dtype_of<T>(), n, {dy, x, r, dh});
  const dim3 grid(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock)), block(kWarp * kRowsPerBlock);
  const T* dyt = static_cast<const T*>(dy);
  const T* xt = static_cast<const T*>(x);
  const T* rt = static_cast<const T*>(r);
  T* dht = static_cast<T*>(dh);
  return dispatch<T>(n, aligned, [&]<int VEC, int ITEMS>() {
    if (r != nullptr)
      bwd_kernel<T, VEC, ITEMS, true><<<grid, block, 0, stream>>>(dyt, xt, rt, rstd, dht, rows, n);
    else
      bwd_kernel<T, VEC, ITEMS, false><<<grid, block, 0, stream>>>(dyt, xt, rt, rstd, dht, rows, n);
    return cudaGetLastError();
  });
}

}  // namespace

int add_rmsnorm_max_hidden(DType dtype) {
  const int vec = dtype == DType::f32 ? 4 : 8;
  return kWarp * kMaxItems * vec;
}

cudaError_t add_rmsnorm_forward(DType dtype, const void* x, const void* r, void* y, float* rstd, int64_t rows,
                                int n, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::f32: return forward_t<float>(x, r, y, rstd, rows, n, eps, stream);
    case DType::f16: return forward_t<__half>(x, r, y, rstd, rows, n, eps, stream);
    case DType::bf16: return forward_t<__nv_bfloat16>(x, r, y, rstd, rows, n, eps, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t add_rmsnorm_backward(DType dtype, const void* dy, const void* x, const void* r, const float* rstd,
                                 void* dh, int64_t rows, int n, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::f32: return backward_t<float>(dy, x, r, rstd, dh, rows, n, stream);
    case DType::f16: return backward_t<__half>(dy, x, r, rstd, dh, rows, n, stream);
    case DType::bf16: return backward_t<__nv_bfloat16>(dy, x, r, rstd, dh, rows, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace trm

// Torch binding of the CUDA kernels: checks, allocation, the current stream, errors.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "add_rmsnorm.h"

namespace {

trm::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return trm::DType::f32;
    case at::kHalf: return trm::DType::f16;
    case at::kBFloat16: return trm::DType::bf16;
    default: TORCH_CHECK(false, "add_rmsnorm (cuda): unsupported dtype ", t.scalar_type());
  }
}

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), "add_rmsnorm (cuda): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "add_rmsnorm (cuda): ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == like.sizes(), "add_rmsnorm (cuda): ", name, " has shape ", t.sizes(), ", expected ",
              like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "add_rmsnorm (cuda): ", name, " has dtype ", t.scalar_type());
}

std::vector<at::Tensor> forward(const at::Tensor& x, const c10::optional<at::Tensor>& residual, double eps) {
  check(x, x, "x");
  if (residual) check(*residual, x, "residual");
  const c10::cuda::CUDAGuard guard(x.device());
  const int n = static_cast<int>(x.size(-1));
  const int64_t rows = x.numel() / n;
  auto y = at::empty_like(x);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const cudaError_t err = trm::add_rmsnorm_forward(dtype_of(x), x.data_ptr(), residual ? residual->data_ptr() : nullptr,
                                                   y.data_ptr(), rstd.data_ptr<float>(), rows, n,
                                                   static_cast<float>(eps), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "add_rmsnorm (cuda) forward: ", cudaGetErrorString(err));
  return {y, rstd};
}

at::Tensor backward(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                    const at::Tensor& rstd) {
  check(x, x, "x");
  check(dy, x, "dy");
  if (residual) check(*residual, x, "residual");
  TORCH_CHECK(rstd.is_contiguous() && rstd.scalar_type() == at::kFloat, "add_rmsnorm (cuda): bad rstd");
  const c10::cuda::CUDAGuard guard(x.device());
  const int n = static_cast<int>(x.size(-1));
  const int64_t rows = x.numel() / n;
  auto dh = at::empty_like(x);
  const cudaError_t err = trm::add_rmsnorm_backward(dtype_of(x), dy.data_ptr(), x.data_ptr(),
                                                    residual ? residual->data_ptr() : nullptr,
                                                    rstd.data_ptr<float>(), dh.data_ptr(), rows, n,
                                                    c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "add_rmsnorm (cuda) backward: ", cudaGetErrorString(err));
  return dh;
}

int64_t max_hidden(const at::Tensor& like) { return trm::add_rmsnorm_max_hidden(dtype_of(like)); }

// Whether the kernels take rows like these tensors' (the last axis; None entries skipped):
// their length and the alignment of every pointer, as the kernels' dispatch decides.
bool takes(const std::vector<c10::optional<at::Tensor>>& tensors) {
  TORCH_CHECK(!tensors.empty() && tensors[0], "add_rmsnorm (cuda): takes() needs a tensor");
  const at::Tensor& first = *tensors[0];
  if (first.dim() == 0 || first.size(-1) > INT32_MAX) return false;
  const int n = static_cast<int>(first.size(-1));
  bool aligned = true;
  for (const auto& t : tensors)
    if (t) aligned = aligned && trm::add_rmsnorm_aligned(dtype_of(first), n, {t->data_ptr()});
  return trm::add_rmsnorm_takes(dtype_of(first), n, aligned);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rmsnorm_forward", &forward, "fused residual add + RMSNorm, last axis");
  m.def("add_rmsnorm_backward", &backward, "its backward");
  m.def("add_rmsnorm_max_hidden", &max_hidden, "the longest row the kernels take for this dtype");
  m.def("add_rmsnorm_takes", &takes, "whether the kernels take rows like these tensors' (length, alignment)");
}

// Tensor glue and Python binding for the CUDA kernel in wkv_cuda.cu.
#include <torch/extension.h>
// Only c10's CUDA headers (they need cuda_runtime_api.h alone); ATen/cuda/CUDAContext.h
// would also require the cuBLAS / cuSPARSE / cuSOLVER headers, which minimal CUDA
// toolkits do not ship.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <vector>

#include "wkv_checks.h"

cudaError_t wkv_cuda_forward(const float* w, const float* u, const float* k,
                             const float* v, float* y, float* m, float* r, int64_t B,
                             int64_t T, int64_t C, cudaStream_t stream);
cudaError_t wkv_cuda_forward(const double* w, const double* u, const double* k,
                             const double* v, double* y, double* m, double* r, int64_t B,
                             int64_t T, int64_t C, cudaStream_t stream);
cudaError_t wkv_cuda_backward(const float* w, const float* u, const float* k,
                              const float* v, const float* y, const float* m,
                              const float* r, const float* gy, float* gk, float* gv,
                              double* gw_part, double* gu_part, float* gw, float* gu,
                              int64_t B, int64_t T, int64_t C, cudaStream_t stream);
cudaError_t wkv_cuda_backward(const double* w, const double* u, const double* k,
                              const double* v, const double* y, const double* m,
                              const double* r, const double* gy, double* gk, double* gv,
                              double* gw_part, double* gu_part, double* gw, double* gu,
                              int64_t B, int64_t T, int64_t C, cudaStream_t stream);

namespace {

std::vector<at::Tensor> wkv_forward(at::Tensor w, at::Tensor u, at::Tensor k,
                                    at::Tensor v) {
  wkv::check_inputs("wkv_cuda", c10::DeviceType::CUDA, w, u, k, v);
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto y = at::empty_like(k), m = at::empty_like(k), r = at::empty_like(k);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err;
  if (k.scalar_type() == at::kFloat) {
    err = wkv_cuda_forward(w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<float>(),
                           v.data_ptr<float>(), y.data_ptr<float>(), m.data_ptr<float>(),
                           r.data_ptr<float>(), B, T, C, stream);
  } else {
    err = wkv_cuda_forward(w.data_ptr<double>(), u.data_ptr<double>(),
                           k.data_ptr<double>(), v.data_ptr<double>(),
                           y.data_ptr<double>(), m.data_ptr<double>(),
                           r.data_ptr<double>(), B, T, C, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "wkv_cuda forward launch failed: ",
              cudaGetErrorString(err));
  return {y, m, r};
}

std::vector<at::Tensor> wkv_backward(at::Tensor w, at::Tensor u, at::Tensor k,
                                     at::Tensor v, at::Tensor y, at::Tensor m,
                                     at::Tensor r, at::Tensor gy) {
  wkv::check_inputs("wkv_cuda", c10::DeviceType::CUDA, w, u, k, v);
  wkv::check_saved("wkv_cuda", k, {&y, &m, &r, &gy});
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto gk = at::empty_like(k), gv = at::empty_like(k);
  auto gw = at::empty_like(w), gu = at::empty_like(u);
  auto gw_part = at::zeros({B, C}, k.options().dtype(at::kDouble));
  auto gu_part = at::zeros({B, C}, k.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err;
  if (k.scalar_type() == at::kFloat) {
    err = wkv_cuda_backward(w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<float>(),
                            v.data_ptr<float>(), y.data_ptr<float>(), m.data_ptr<float>(),
                            r.data_ptr<float>(), gy.data_ptr<float>(), gk.data_ptr<float>(),
                            gv.data_ptr<float>(), gw_part.data_ptr<double>(),
                            gu_part.data_ptr<double>(), gw.data_ptr<float>(),
                            gu.data_ptr<float>(), B, T, C, stream);
  } else {
    err = wkv_cuda_backward(
        w.data_ptr<double>(), u.data_ptr<double>(), k.data_ptr<double>(),
        v.data_ptr<double>(), y.data_ptr<double>(), m.data_ptr<double>(),
        r.data_ptr<double>(), gy.data_ptr<double>(), gk.data_ptr<double>(),
        gv.data_ptr<double>(), gw_part.data_ptr<double>(), gu_part.data_ptr<double>(),
        gw.data_ptr<double>(), gu.data_ptr<double>(), B, T, C, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "wkv_cuda backward launch failed: ",
              cudaGetErrorString(err));
  return {gw, gu, gk, gv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "cuda_wkv: exact bidirectional WKV, CUDA kernel";
  mod.def("forward", &wkv_forward, "forward(w, u, k, v) -> [y, m, r]");
  mod.def("backward", &wkv_backward,
          "backward(w, u, k, v, y, m, r, gy) -> [gw, gu, gk, gv]");
}

// Tensor glue and Python binding for the CUDA kernel in wkv_cuda.cu: argument checks,
// the chunk length (CUDA_WKV_CHUNK or automatic) and the scratch buffers of the scan.
#include <torch/extension.h>
// Only c10's CUDA headers (they need cuda_runtime_api.h alone); ATen/cuda/CUDAContext.h
// would also require the cuBLAS / cuSPARSE / cuSOLVER headers, which minimal CUDA
// toolkits do not ship.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <vector>

#include "wkv_checks.h"

#define WKV_CUDA_DECLARE(F)                                                               \
  cudaError_t wkv_cuda_forward(const F* w, const F* u, const F* k, const F* v, F* y, F* m, \
                               F* r, F* summ, F* carry, F* ckpt, F* groups, int64_t B,     \
                               int64_t T, int64_t C, int64_t len, cudaStream_t stream);    \
  cudaError_t wkv_cuda_backward(const F* w, const F* u, const F* k, const F* v,            \
                                const F* y, const F* m, const F* r, const F* gy, F* gk,    \
                                F* gv, F* summ, F* carry, F* ckpt, F* groups,              \
                                double* gw_part, double* gu_part, F* gw, F* gu, int64_t B, \
                                int64_t T, int64_t C, int64_t len, cudaStream_t stream);
WKV_CUDA_DECLARE(float)
WKV_CUDA_DECLARE(double)
cudaError_t wkv_cuda_resident_threads(bool dbl, int* per_sm);

namespace {

// Threads the current device keeps resident for the chunk kernels of k's dtype (SMs x
// resident threads per SM): the automatic chunk length aims to give each a (batch, channel,
// chunk) task, in one wave.  Queried once per (device, dtype) and process -- five driver
// queries that cannot change their answer, otherwise paid on the host by every call.
cudaError_t thread_slots(const at::Tensor& k, int64_t* slots) {
  constexpr int kCachedDevices = 64;
  static std::array<std::array<std::atomic<int64_t>, 2>, kCachedDevices> cache{};
  const int dtype = k.scalar_type() == at::kDouble ? 1 : 0;
  const int dev = k.get_device();  // current: the callers hold a CUDAGuard for it
  if (dev >= 0 && dev < kCachedDevices) {
    *slots = cache[dev][dtype].load(std::memory_order_relaxed);
    if (*slots > 0) return cudaSuccess;
  }
  int sms = 0, per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = wkv_cuda_resident_threads(dtype == 1, &per_sm);
  *slots = static_cast<int64_t>(sms) * per_sm;
  if (err == cudaSuccess && *slots > 0 && dev >= 0 && dev < kCachedDevices) {
    cache[dev][dtype].store(*slots, std::memory_order_relaxed);
  }
  return err;
}

// Chunk length for k's shape on the current device: CUDA_WKV_CHUNK or automatic.
int64_t chunk_len(const at::Tensor& k) {
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  const int64_t forced = wkv::forced_chunk("wkv_cuda");
  if (forced > 0) return wkv::cuda_forced_chunk(T, C, forced);
  int64_t slots = 0;
  const cudaError_t err = thread_slots(k, &slots);
  TORCH_CHECK(err == cudaSuccess, "wkv_cuda: cannot query the device: ",
              cudaGetErrorString(err));
  return wkv::cuda_auto_chunk(B, T, C, slots, k.element_size());
}

// (B, chunks, 2, fields, C) scratch for the chunk summaries or carries.
at::Tensor state_buffer(const at::Tensor& k, int64_t len, int64_t fields) {
  const int64_t nch = (k.size(1) + len - 1) / len;
  return at::empty({k.size(0), nch, 2, fields, k.size(2)}, k.options());
}

// (B, chunks, checkpoints, fields, C) scratch for the checkpoints phase 1 stores for phase 3
// (wkv_recurrence.h, "Checkpoints"): about fields / kCheckpointRows (B, T, C) tensors.
template <bool Bwd>
at::Tensor checkpoint_buffer(const at::Tensor& k, int64_t len, int64_t fields) {
  const int64_t nch = (k.size(1) + len - 1) / len;
  return at::empty({k.size(0), nch, wkv::checkpoints_per_chunk<Bwd>(len), fields, k.size(2)},
                   k.options());
}

// Scratch of phase 2's grouped carries (wkv_recurrence.h): the group summaries, a
// (B, groups, 2, fields, C) buffer (groups = 1: unused).
at::Tensor group_buffer(const at::Tensor& k, int64_t len, int64_t fields) {
  const int64_t groups = wkv::carry_groups((k.size(1) + len - 1) / len);
  return at::empty({k.size(0), groups > 1 ? groups : 0, 2, fields, k.size(2)}, k.options());
}

std::vector<at::Tensor> wkv_forward(at::Tensor w, at::Tensor u, at::Tensor k,
                                    at::Tensor v) {
  wkv::check_inputs("wkv_cuda", c10::DeviceType::CUDA, w, u, k, v);
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto y = at::empty_like(k), m = at::empty_like(k), r = at::empty_like(k);
  if (k.numel() == 0) return {y, m, r};
  const int64_t len = chunk_len(k);
  auto summ = state_buffer(k, len, wkv::kFwdFields);
  auto carry = state_buffer(k, len, wkv::kFwdFields);
  auto ckpt = checkpoint_buffer<false>(k, len, wkv::kFwdFields);
  auto groups = group_buffer(k, len, wkv::kFwdFields);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err;
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_forward_cuda", [&] {
    using F = scalar_t;
    err = wkv_cuda_forward(w.data_ptr<F>(), u.data_ptr<F>(), k.data_ptr<F>(),
                           v.data_ptr<F>(), y.data_ptr<F>(), m.data_ptr<F>(),
                           r.data_ptr<F>(), summ.data_ptr<F>(), carry.data_ptr<F>(),
                           ckpt.data_ptr<F>(), groups.data_ptr<F>(), B, T, C, len, stream);
  });
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
  const int64_t len = k.numel() > 0 ? chunk_len(k) : 1;
  auto summ = state_buffer(k, len, wkv::kBwdFields);
  auto carry = state_buffer(k, len, wkv::kBwdFields);
  auto ckpt = checkpoint_buffer<true>(k, len, wkv::kBwdFields);
  auto groups = group_buffer(k, len, wkv::kBwdFields);
  const int64_t nch = (T + len - 1) / len;
  auto gw_part = at::empty({B, nch, C}, k.options().dtype(at::kDouble));
  auto gu_part = at::empty_like(gw_part);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err;
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_backward_cuda", [&] {
    using F = scalar_t;
    err = wkv_cuda_backward(w.data_ptr<F>(), u.data_ptr<F>(), k.data_ptr<F>(),
                            v.data_ptr<F>(), y.data_ptr<F>(), m.data_ptr<F>(),
                            r.data_ptr<F>(), gy.data_ptr<F>(), gk.data_ptr<F>(),
                            gv.data_ptr<F>(), summ.data_ptr<F>(), carry.data_ptr<F>(),
                            ckpt.data_ptr<F>(), groups.data_ptr<F>(),
                            gw_part.data_ptr<double>(), gu_part.data_ptr<double>(),
                            gw.data_ptr<F>(), gu.data_ptr<F>(), B, T, C, len, stream);
  });
  TORCH_CHECK(err == cudaSuccess, "wkv_cuda backward launch failed: ",
              cudaGetErrorString(err));
  return {gw, gu, gk, gv};
}

int resident_threads_per_sm(bool dbl) {
  int per_sm = 0;
  const cudaError_t err = wkv_cuda_resident_threads(dbl, &per_sm);
  TORCH_CHECK(err == cudaSuccess, "wkv_cuda: cannot query the occupancy: ", cudaGetErrorString(err));
  return per_sm;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "cuda_wkv: exact bidirectional WKV, CUDA kernel";
  mod.def("forward", &wkv_forward, "forward(w, u, k, v) -> [y, m, r]");
  mod.def("resident_threads_per_sm", &resident_threads_per_sm,
          "resident_threads_per_sm(double) -> threads of the chunk kernels one SM keeps resident");
  mod.def("backward", &wkv_backward,
          "backward(w, u, k, v, y, m, r, gy) -> [gw, gu, gk, gv]");
}

// CUDA kernel for the exact bidirectional WKV (see wkv_recurrence.h).
//
// One thread per (batch, channel) lane runs the two sequential scans over t; threads
// of a warp handle consecutive channels, so every load/store of the (B, T, C)
// channel-contiguous tensors is coalesced.  gw / gu are written as per-(b, c)
// partial sums (double) and reduced over the batch by a second kernel in a fixed
// order -- no atomicAdd, bitwise deterministic.  Any B, T, C >= 1: no T_MAX, no
// block-size requirement.
//
// This translation unit only needs the CUDA runtime (no ATen / pybind11), which keeps
// the nvcc part of the JIT build short; the tensor glue is in wkv_cuda_binding.cpp.
#include <cuda_runtime.h>

#include <cstdint>

#include "wkv_recurrence.h"

namespace {

constexpr int kThreads = 128;

template <typename F>
__global__ void __launch_bounds__(kThreads)
    wkv_forward_kernel(const F* __restrict__ w, const F* __restrict__ u,
                       const F* __restrict__ k, const F* __restrict__ v,
                       F* __restrict__ y, F* __restrict__ m, F* __restrict__ r,
                       int64_t B, int64_t T, int64_t C) {
  const int64_t lane = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (lane >= B * C) return;
  const int64_t b = lane / C, c = lane % C;
  const int64_t base = b * T * C + c;
  const F ww = w[c], uu = u[c];
  F a = F(0), bb = F(0), cc = wkv::neg_big<F>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = base + t * C;
    const F tf = static_cast<F>(t);
    wkv::fwd_pass1_step<F>(a, bb, cc, tf * ww, ww, k[o], v[o], y[o], r[o], m[o]);
  }
  a = F(0);
  bb = F(0);
  cc = wkv::neg_big<F>();
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t o = base + t * C;
    const F tf = static_cast<F>(t);
    wkv::fwd_pass2_step<F>(a, bb, cc, -tf * ww, ww, uu, k[o], v[o], y[o], m[o], r[o]);
  }
}

template <typename F>
__global__ void __launch_bounds__(kThreads)
    wkv_backward_kernel(const F* __restrict__ w, const F* __restrict__ u,
                        const F* __restrict__ k, const F* __restrict__ v,
                        const F* __restrict__ y, const F* __restrict__ m,
                        const F* __restrict__ r, const F* __restrict__ gy,
                        F* __restrict__ gk, F* __restrict__ gv,
                        double* __restrict__ gw_part, double* __restrict__ gu_part,
                        int64_t B, int64_t T, int64_t C) {
  const int64_t lane = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (lane >= B * C) return;
  const int64_t b = lane / C, c = lane % C;
  const int64_t base = b * T * C + c;
  const F ww = w[c], uu = u[c];
  F fa, fb, fdv, fdb, cf, r1, r2, cr;
  double gw = 0.0, gu = 0.0;
  wkv::bwd_init(fa, fb, fdv, fdb, cf, r1, r2, cr);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = base + t * C;
    const F tf = static_cast<F>(t);
    F s1, s2;
    wkv::bwd_step<F, double>(fa, fb, fdv, fdb, cf, r1, r2, cr, tf * ww, ww, k[o], v[o],
                             y[o], m[o], r[o], gy[o], gw, s1, s2);
    gv[o] = s1;
    gk[o] = s2;
  }
  wkv::bwd_init(fa, fb, fdv, fdb, cf, r1, r2, cr);
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t o = base + t * C;
    const F tf = static_cast<F>(t);
    const F kk = k[o], vv = v[o], yy = y[o], mm = m[o], rr = r[o], gg = gy[o];
    F s1, s2, g_v, g_k;
    wkv::bwd_step<F, double>(fa, fb, fdv, fdb, cf, r1, r2, cr, -tf * ww, ww, kk, vv, yy,
                             mm, rr, gg, gw, s1, s2);
    wkv::bwd_finish<F, double>(uu, kk, vv, yy, mm, rr, gg, gv[o] + s1, gk[o] + s2, gu,
                               g_v, g_k);
    gv[o] = g_v;
    gk[o] = g_k;
  }
  gw_part[lane] = -gw;
  gu_part[lane] = gu;
}

// Fixed-order sum over the batch: one thread per channel.
template <typename F>
__global__ void wkv_reduce_kernel(const double* __restrict__ gw_part,
                                  const double* __restrict__ gu_part,
                                  F* __restrict__ gw, F* __restrict__ gu, int64_t B,
                                  int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sw = 0.0, su = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    sw += gw_part[b * C + c];
    su += gu_part[b * C + c];
  }
  gw[c] = static_cast<F>(sw);
  gu[c] = static_cast<F>(su);
}

inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>((n + kThreads - 1) / kThreads);
}

template <typename F>
cudaError_t forward_impl(const F* w, const F* u, const F* k, const F* v, F* y, F* m,
                         F* r, int64_t B, int64_t T, int64_t C, cudaStream_t stream) {
  if (B * T * C == 0) return cudaSuccess;
  wkv_forward_kernel<F><<<blocks_for(B * C), kThreads, 0, stream>>>(w, u, k, v, y, m, r,
                                                                    B, T, C);
  return cudaGetLastError();
}

template <typename F>
cudaError_t backward_impl(const F* w, const F* u, const F* k, const F* v, const F* y,
                          const F* m, const F* r, const F* gy, F* gk, F* gv,
                          double* gw_part, double* gu_part, F* gw, F* gu, int64_t B,
                          int64_t T, int64_t C, cudaStream_t stream) {
  if (B * T * C > 0) {
    wkv_backward_kernel<F><<<blocks_for(B * C), kThreads, 0, stream>>>(
        w, u, k, v, y, m, r, gy, gk, gv, gw_part, gu_part, B, T, C);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (C == 0) return cudaSuccess;
  wkv_reduce_kernel<F><<<blocks_for(C), kThreads, 0, stream>>>(gw_part, gu_part, gw, gu,
                                                               B, C);
  return cudaGetLastError();
}

}  // namespace

// Entry points used by wkv_cuda_binding.cpp (plain overloads, no templates across TUs).
cudaError_t wkv_cuda_forward(const float* w, const float* u, const float* k,
                             const float* v, float* y, float* m, float* r, int64_t B,
                             int64_t T, int64_t C, cudaStream_t stream) {
  return forward_impl<float>(w, u, k, v, y, m, r, B, T, C, stream);
}
cudaError_t wkv_cuda_forward(const double* w, const double* u, const double* k,
                             const double* v, double* y, double* m, double* r, int64_t B,
                             int64_t T, int64_t C, cudaStream_t stream) {
  return forward_impl<double>(w, u, k, v, y, m, r, B, T, C, stream);
}
cudaError_t wkv_cuda_backward(const float* w, const float* u, const float* k,
                              const float* v, const float* y, const float* m,
                              const float* r, const float* gy, float* gk, float* gv,
                              double* gw_part, double* gu_part, float* gw, float* gu,
                              int64_t B, int64_t T, int64_t C, cudaStream_t stream) {
  return backward_impl<float>(w, u, k, v, y, m, r, gy, gk, gv, gw_part, gu_part, gw, gu, B,
                              T, C, stream);
}
cudaError_t wkv_cuda_backward(const double* w, const double* u, const double* k,
                              const double* v, const double* y, const double* m,
                              const double* r, const double* gy, double* gk, double* gv,
                              double* gw_part, double* gu_part, double* gw, double* gu,
                              int64_t B, int64_t T, int64_t C, cudaStream_t stream) {
  return backward_impl<double>(w, u, k, v, y, m, r, gy, gk, gv, gw_part, gu_part, gw, gu,
                               B, T, C, stream);
}

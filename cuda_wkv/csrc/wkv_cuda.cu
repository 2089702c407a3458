// CUDA kernel for the exact bidirectional WKV: the chunked three-phase scan of
// wkv_recurrence.h.
//
// Phases 1 and 3 run one thread per (batch, channel, chunk); a block is 32 consecutive
// channels (one warp, so every load/store of the (B, T, C) channel-contiguous tensors is
// coalesced) x kRows chunks.  Phase 2 runs one thread per (batch, channel, direction)
// over the chunk summaries.  gw / gu are per-(batch, chunk, channel) partial sums
// (double) reduced by a last kernel in a fixed order: no atomics, bitwise reproducible
// for a given chunk length.  Any B, T, C >= 1: no T_MAX, no block-size requirement.
//
// This translation unit only needs the CUDA runtime (no ATen / pybind11), which keeps
// the nvcc part of the JIT build short; the tensor glue, the chunk length and the
// scratch buffers are in wkv_cuda_binding.cpp.
#include <cuda_runtime.h>

#include <cstdint>

#include "wkv_recurrence.h"

namespace {

constexpr int kLanes = 32;  // channels per block: one warp
constexpr int kRows = 4;    // chunks per block
using wkv::kBwdFields;
using wkv::kFwdFields;

struct Shape {
  int64_t B, T, C, len, nch, nchb;  // nchb: blocks along the chunks, ceil(nch / kRows)
  // offset of (b, chunk, dir, field 0, c) in a (B, nch, 2, fields, C) buffer
  __device__ int64_t state(int fields, int64_t b, int64_t ch, int dir, int64_t c) const {
    return (((b * nch + ch) * 2 + dir) * fields) * C + c;
  }
};

// This thread's (batch, channel, chunk) in phases 1 and 3; false outside the problem.
__device__ bool chunk_task(const Shape& s, int64_t& b, int64_t& c, int64_t& ch) {
  b = blockIdx.x / s.nchb;
  ch = (blockIdx.x % s.nchb) * kRows + threadIdx.y;
  c = static_cast<int64_t>(blockIdx.y) * kLanes + threadIdx.x;
  return c < s.C && ch < s.nch;
}

// This thread's (batch, channel, direction) in phase 2.
__device__ bool lane_task(const Shape& s, int64_t& b, int64_t& c, int& dir) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= s.B * s.C * 2) return false;
  c = i % s.C;
  dir = static_cast<int>((i / s.C) % 2);
  b = i / (2 * s.C);
  return true;
}

// ------------------------------------------------------------------------------ forward
template <typename F>
__global__ void fwd_summary_kernel(const F* __restrict__ w, const F* __restrict__ k,
                                   const F* __restrict__ v, F* __restrict__ summ, Shape s) {
  int64_t b, c, ch;
  if (!chunk_task(s, b, c, ch)) return;
  const int64_t t0 = ch * s.len, t1 = t0 + s.len < s.T ? t0 + s.len : s.T;
  const int64_t base = b * s.T * s.C + c;
  const F ww = w[c];
  for (int dir = 0; dir < 2; ++dir) {
    if ((dir == 0 && ch + 1 == s.nch) || (dir == 1 && ch == 0)) continue;  // never used
    F a, n, s0, mean;
    wkv::fwd_empty(a, n, s0, mean);
    for (int64_t i = 0; i < t1 - t0; ++i) {
      const int64_t t = dir == 0 ? t0 + i : t1 - 1 - i;
      const int64_t o = base + t * s.C;
      const F nt = dir == 0 ? static_cast<F>(t) : -static_cast<F>(t);
      wkv::fwd_fold(a, n, s0, mean, nt, k[o], v[o], ww);
    }
    F* out = summ + s.state(kFwdFields, b, ch, dir, c);
    out[0] = a;
    out[s.C] = n;
    out[2 * s.C] = s0;
    out[3 * s.C] = mean;
  }
}

// Phase 2 of the forward (Fields = kFwdFields) or the backward (kBwdFields).
template <typename F, int Fields>
__global__ void carry_kernel(const F* __restrict__ w, const F* __restrict__ summ,
                             F* __restrict__ carry, Shape s) {
  int64_t b, c;
  int dir;
  if (!lane_task(s, b, c, dir)) return;
  const int64_t o = s.state(Fields, b, 0, dir, c);
  if (Fields == kFwdFields) {
    wkv::fwd_carry_lane(summ + o, carry + o, s.nch, 2 * Fields * s.C, s.C, dir, w[c]);
  } else {
    wkv::bwd_carry_lane(summ + o, carry + o, s.nch, 2 * Fields * s.C, s.C, dir, w[c]);
  }
}

template <typename F>
__global__ void fwd_rescan_kernel(const F* __restrict__ w, const F* __restrict__ u,
                                  const F* __restrict__ k, const F* __restrict__ v,
                                  const F* __restrict__ carry, F* __restrict__ y,
                                  F* __restrict__ m, F* __restrict__ r, Shape s) {
  int64_t b, c, ch;
  if (!chunk_task(s, b, c, ch)) return;
  const int64_t t0 = ch * s.len, t1 = t0 + s.len < s.T ? t0 + s.len : s.T;
  const int64_t base = b * s.T * s.C + c;
  const F ww = w[c], uu = u[c];
  const F* cl = carry + s.state(kFwdFields, b, ch, 0, c);
  F a = cl[0], n = cl[s.C], s0 = cl[2 * s.C], mean = cl[3 * s.C];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t o = base + t * s.C;
    wkv::fwd_store_step(a, n, s0, mean, static_cast<F>(t), k[o], v[o], ww, y[o], m[o], r[o]);
  }
  const F* cr = carry + s.state(kFwdFields, b, ch, 1, c);
  a = cr[0];
  n = cr[s.C];
  s0 = cr[2 * s.C];
  mean = cr[3 * s.C];
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const int64_t o = base + t * s.C;
    wkv::fwd_finish_step(a, n, s0, mean, F(-1), static_cast<F>(t), k[o], v[o], ww, uu, y[o],
                         m[o], r[o]);
  }
}

// ----------------------------------------------------------------------------- backward
template <typename F> struct BwdArgs {
  const F *w, *u, *k, *v, *y, *m, *r, *gy;
  F *gk, *gv;
};

template <typename F>
__device__ void bwd_fold_at(wkv::BwdState<F>& st, const BwdArgs<F>& a, F dir, int64_t t,
                            int64_t o, F ww) {
  wkv::bwd_fold(st, dir, static_cast<F>(t), a.k[o], a.v[o], a.y[o], a.m[o], a.r[o], a.gy[o],
                ww);
}

template <typename F>
__global__ void bwd_summary_kernel(BwdArgs<F> a, F* __restrict__ summ, Shape s) {
  int64_t b, c, ch;
  if (!chunk_task(s, b, c, ch)) return;
  const int64_t t0 = ch * s.len, t1 = t0 + s.len < s.T ? t0 + s.len : s.T;
  const int64_t base = b * s.T * s.C + c;
  const F ww = a.w[c];
  for (int dir = 0; dir < 2; ++dir) {
    if ((dir == 0 && ch + 1 == s.nch) || (dir == 1 && ch == 0)) continue;  // never used
    wkv::BwdState<F> st;
    wkv::bwd_empty(st);
    for (int64_t i = 0; i < t1 - t0; ++i) {
      const int64_t t = dir == 0 ? t0 + i : t1 - 1 - i;
      bwd_fold_at(st, a, dir == 0 ? F(1) : F(-1), t, base + t * s.C, ww);
    }
    wkv::bwd_store(st, summ + s.state(kBwdFields, b, ch, dir, c), s.C);
  }
}

template <typename F>
__global__ void bwd_rescan_kernel(BwdArgs<F> a, const F* __restrict__ carry,
                                  double* __restrict__ gw_part, double* __restrict__ gu_part,
                                  Shape s) {
  int64_t b, c, ch;
  if (!chunk_task(s, b, c, ch)) return;
  const int64_t t0 = ch * s.len, t1 = t0 + s.len < s.T ? t0 + s.len : s.T;
  const int64_t base = b * s.T * s.C + c;
  const F ww = a.w[c], uu = a.u[c];
  double gw = 0.0, gu = 0.0;
  wkv::BwdState<F> st;
  wkv::bwd_load(st, carry + s.state(kBwdFields, b, ch, 0, c), s.C);
  for (int64_t t = t0; t < t1; ++t) {  // left sides: partial q0, q1 kept in gv, gk
    const int64_t o = base + t * s.C;
    wkv::bwd_emit(st, F(1), static_cast<F>(t), a.k[o], a.v[o], a.y[o], a.m[o], a.r[o],
                  a.gy[o], ww, gw, a.gv[o], a.gk[o]);
    bwd_fold_at(st, a, F(1), t, o, ww);
  }
  wkv::bwd_load(st, carry + s.state(kBwdFields, b, ch, 1, c), s.C);
  for (int64_t t = t1 - 1; t >= t0; --t) {  // right sides, then the final combination
    const int64_t o = base + t * s.C;
    const F kk = a.k[o], vv = a.v[o], yy = a.y[o], mm = a.m[o], rr = a.r[o], gg = a.gy[o];
    F q0, q1;
    wkv::bwd_emit(st, F(-1), static_cast<F>(t), kk, vv, yy, mm, rr, gg, ww, gw, q0, q1);
    F g_v, g_k;
    wkv::bwd_finish(uu, kk, vv, yy, mm, rr, gg, a.gv[o] + q0, a.gk[o] + q1, ww, gu, gw, g_v,
                    g_k);
    a.gv[o] = g_v;
    a.gk[o] = g_k;
    bwd_fold_at(st, a, F(-1), t, o, ww);
  }
  const int64_t p = (b * s.nch + ch) * s.C + c;
  gw_part[p] = gw;
  gu_part[p] = gu;
}

// Fixed-order sum over (batch, chunk): one thread per channel.
template <typename F>
__global__ void reduce_kernel(const double* __restrict__ gw_part,
                              const double* __restrict__ gu_part, F* __restrict__ gw,
                              F* __restrict__ gu, int64_t parts, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sw = 0.0, su = 0.0;
  for (int64_t i = 0; i < parts; ++i) {
    sw += gw_part[i * C + c];
    su += gu_part[i * C + c];
  }
  gw[c] = static_cast<F>(sw);
  gu[c] = static_cast<F>(su);
}

// --------------------------------------------------------------------------- launching
Shape make_shape(int64_t B, int64_t T, int64_t C, int64_t len) {
  const int64_t nch = (T + len - 1) / len;
  return {B, T, C, len, nch, (nch + kRows - 1) / kRows};
}

dim3 chunk_grid(const Shape& s) {
  return dim3(static_cast<unsigned int>(s.B * s.nchb),
              static_cast<unsigned int>((s.C + kLanes - 1) / kLanes));
}

unsigned int lane_blocks(const Shape& s) {
  return static_cast<unsigned int>((s.B * s.C * 2 + 127) / 128);
}

template <typename F>
cudaError_t forward_impl(const F* w, const F* u, const F* k, const F* v, F* y, F* m, F* r,
                         F* summ, F* carry, int64_t B, int64_t T, int64_t C, int64_t len,
                         cudaStream_t stream) {
  if (B * T * C == 0) return cudaSuccess;
  const Shape s = make_shape(B, T, C, len);
  const dim3 block(kLanes, kRows);
  if (s.nch > 1) {
    fwd_summary_kernel<F><<<chunk_grid(s), block, 0, stream>>>(w, k, v, summ, s);
  }
  carry_kernel<F, kFwdFields><<<lane_blocks(s), 128, 0, stream>>>(w, summ, carry, s);
  fwd_rescan_kernel<F><<<chunk_grid(s), block, 0, stream>>>(w, u, k, v, carry, y, m, r, s);
  return cudaGetLastError();
}

template <typename F>
cudaError_t backward_impl(const BwdArgs<F>& a, F* summ, F* carry, double* gw_part,
                          double* gu_part, F* gw, F* gu, int64_t B, int64_t T, int64_t C,
                          int64_t len, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  const Shape s = make_shape(B, T, C, len);
  if (B * T > 0) {
    const dim3 block(kLanes, kRows);
    if (s.nch > 1) bwd_summary_kernel<F><<<chunk_grid(s), block, 0, stream>>>(a, summ, s);
    carry_kernel<F, kBwdFields><<<lane_blocks(s), 128, 0, stream>>>(a.w, summ, carry, s);
    bwd_rescan_kernel<F><<<chunk_grid(s), block, 0, stream>>>(a, carry, gw_part, gu_part, s);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t parts = B * T > 0 ? B * s.nch : 0;
  reduce_kernel<F><<<static_cast<unsigned int>((C + 127) / 128), 128, 0, stream>>>(
      gw_part, gu_part, gw, gu, parts, C);
  return cudaGetLastError();
}

}  // namespace

// Entry points used by wkv_cuda_binding.cpp (plain overloads, no templates across TUs).
// summ, carry: scratch of 2 * fields * B * ceil(T / len) * C elements (fields: 4 forward,
// 10 backward); gw_part, gu_part: B * ceil(T / len) * C doubles.
#define WKV_CUDA_ENTRY_POINTS(F)                                                          \
  cudaError_t wkv_cuda_forward(const F* w, const F* u, const F* k, const F* v, F* y, F* m, \
                               F* r, F* summ, F* carry, int64_t B, int64_t T, int64_t C,   \
                               int64_t len, cudaStream_t stream) {                         \
    return forward_impl<F>(w, u, k, v, y, m, r, summ, carry, B, T, C, len, stream);        \
  }                                                                                        \
  cudaError_t wkv_cuda_backward(const F* w, const F* u, const F* k, const F* v,            \
                                const F* y, const F* m, const F* r, const F* gy, F* gk,    \
                                F* gv, F* summ, F* carry, double* gw_part,                 \
                                double* gu_part, F* gw, F* gu, int64_t B, int64_t T,       \
                                int64_t C, int64_t len, cudaStream_t stream) {             \
    const BwdArgs<F> a{w, u, k, v, y, m, r, gy, gk, gv};                                   \
    return backward_impl<F>(a, summ, carry, gw_part, gu_part, gw, gu, B, T, C, len,        \
                            stream);                                                       \
  }

WKV_CUDA_ENTRY_POINTS(float)
WKV_CUDA_ENTRY_POINTS(double)

// Resident threads of the current device (SMs x threads per SM): the automatic chunk
// length aims to give every one of them a (batch, channel, chunk) task.
cudaError_t wkv_cuda_thread_slots(int64_t* slots) {
  int dev = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev);
  }
  *slots = static_cast<int64_t>(sms) * per_sm;
  return err;
}

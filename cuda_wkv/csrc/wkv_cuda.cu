// CUDA kernel for the exact bidirectional WKV: the chunked three-phase scan of
// wkv_recurrence.h.
//
// Phases 1 and 3 run one thread per (batch, channel, chunk); a block is 32 consecutive
// channels (one warp, so every load/store of the (B, T, C) channel-contiguous tensors is
// coalesced) x kRows chunks.  Phase 2 runs one thread per (batch, channel, direction)
// over the chunk summaries, or with many chunks one per (batch, group, direction, channel)
// twice (wkv_recurrence.h, "Grouped carries").  Phase 1 also stores checkpoints of the left state every few
// rows, from which phase 3 rescans each chunk in one pass (wkv_recurrence.h,
// "Checkpoints").  gw / gu are per-(batch, chunk, channel) partial sums
// (double) summed by the last kernels in a fixed order: no atomics, bitwise reproducible
// for a given chunk length.  Any B, T, C >= 1: no T_MAX, no block-size requirement.
//
// This translation unit only needs the CUDA runtime (no ATen / pybind11), which keeps
// the nvcc part of the JIT build short; the tensor glue, the chunk length and the
// scratch buffers are in wkv_cuda_binding.cpp.  Every kernel is a thin mapping from its
// thread to a lane of the shared header (no shared memory, no barriers), so a host
// compiler can run this file too: tests/csrc/wkv_cuda_host.cpp supplies the CUDA names
// and a launch that runs every thread in turn (tests/test_wkv_cuda_host.py).
#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>

#include "wkv_recurrence.h"

namespace {

constexpr int kLanes = 32;  // channels per block: one warp
constexpr int kRows = 4;    // chunks per block
// The phase-1/3 kernels: 128-thread blocks, in float32 at least 4 resident per SM (512
// threads), so the compiler keeps their registers (the rows held ahead) within 128 per
// thread; float64 holds half as many rows ahead and asks for 2 (no spills either way).
#define WKV_CHUNK_BOUNDS __launch_bounds__(32 * 4, sizeof(F) > 4 ? 2 : 4)
using wkv::kBwdFields;
using wkv::kFwdFields;

struct Shape {
  int64_t B, T, C, len, nch, nchb;  // nchb: blocks along the chunks, ceil(nch / kRows)
  int64_t nck;                      // checkpoints per chunk (wkv::checkpoints_per_chunk)
  int64_t group, ngroups;           // phase 2's groups of chunks (wkv::carry_group)
  // offset of (b, chunk, dir, field 0, c) in a (B, nch, 2, fields, C) buffer
  __device__ int64_t state(int fields, int64_t b, int64_t ch, int dir, int64_t c) const {
    return (((b * nch + ch) * 2 + dir) * fields) * C + c;
  }
  // offset of group g's (field 0, c) in direction dir of a (B, ngroups, 2, fields, C) buffer:
  // at index chunk_at(g), as the summaries of chunks (wkv_recurrence.h)
  __device__ int64_t group_state(int fields, int64_t b, int64_t g, int dir, int64_t c) const {
    return (((b * ngroups + wkv::chunk_at(g, ngroups, dir)) * 2 + dir) * fields) * C + c;
  }
  // offset of (b, chunk, checkpoint 0, field 0, c) in a (B, nch, nck, fields, C) buffer
  __device__ int64_t checkpoint(int fields, int64_t b, int64_t ch, int64_t c) const {
    return ((b * nch + ch) * nck * fields) * C + c;
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

// This thread's (batch, group, direction, channel) in phase 2's grouped kernels; channels
// vary fastest, so a warp's loads and stores are coalesced.
__device__ bool group_task(const Shape& s, int64_t& b, int64_t& g, int& dir, int64_t& c) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= s.B * s.ngroups * 2 * s.C) return false;
  c = i % s.C;
  dir = static_cast<int>((i / s.C) % 2);
  g = (i / (2 * s.C)) % s.ngroups;
  b = i / (2 * s.C * s.ngroups);
  return true;
}

// This thread's chunk [t0, t1) and lane.
struct Task {
  int64_t b, c, ch, t0, t1;
};

__device__ bool chunk_lane(const Shape& s, Task& tk) {
  if (!chunk_task(s, tk.b, tk.c, tk.ch)) return false;
  tk.t0 = tk.ch * s.len;
  tk.t1 = tk.t0 + s.len < s.T ? tk.t0 + s.len : s.T;
  return true;
}

// ------------------------------------------------------------------------------ forward
template <typename F> struct FwdArgs {
  const F *w, *u, *k, *v;
  F *y, *m, *r;
  F* ckpt;  // (B, nch, nck, kFwdFields, C): written by phase 1, read by phase 3
};

template <typename F> __device__ wkv::Lane<F> fwd_lane(const FwdArgs<F>& a, const Shape& s,
                                                      const Task& tk) {
  const int64_t base = (tk.b * s.T + tk.t0) * s.C + tk.c;
  return {a.k + base, a.v + base, a.y + base, a.m + base, a.r + base, nullptr, nullptr, nullptr,
          tk.t0, static_cast<int>(tk.t1 - tk.t0), static_cast<int>(s.C), a.w[tk.c], a.u[tk.c]};
}

template <typename F>
__global__ void WKV_CHUNK_BOUNDS fwd_summary_kernel(FwdArgs<F> a, F* __restrict__ summ, Shape s) {
  Task tk;
  if (!chunk_lane(s, tk)) return;
  wkv::lane_fwd_summary(fwd_lane(a, s, tk), tk.ch, s.nch,
                        summ + s.state(kFwdFields, tk.b, tk.ch, 0, tk.c), kFwdFields * s.C, s.C,
                        wkv::Checkpoints<F>{a.ckpt + s.checkpoint(kFwdFields, tk.b, tk.ch, tk.c),
                                            kFwdFields * s.C});
}

// Phase 2 of the forward (Fields = kFwdFields) or the backward (kBwdFields) below
// kGroupCarriesFrom chunks: one sequential scan per lane and direction over the s.nch chunk
// summaries.
template <typename F, int Fields>
__global__ void carry_kernel(const F* __restrict__ w, const F* __restrict__ summ,
                             F* __restrict__ carry, Shape s) {
  int64_t b, c;
  int dir;
  if (!lane_task(s, b, c, dir)) return;
  const int64_t o = s.state(Fields, b, 0, dir, c);
  wkv::carry_lane<F, Fields == kBwdFields>(summ + o, carry + o, s.nch, 2 * Fields * s.C, s.C, dir,
                                           w[c]);
}

// Grouped carries (wkv_recurrence.h), (a): group summaries into gsum, (B, groups, 2, Fields, C).
template <typename F, int Fields>
__global__ void group_summary_kernel(const F* __restrict__ w, const F* __restrict__ summ,
                                     F* __restrict__ gsum, Shape s) {
  int64_t b, g, c;
  int dir;
  if (!group_task(s, b, g, dir, c)) return;
  const int64_t o = s.state(Fields, b, 0, dir, c);
  wkv::group_summary<F, Fields == kBwdFields>(summ + o, g, s.group, s.nch, 2 * Fields * s.C, s.C, dir,
                                               w[c], gsum + s.group_state(Fields, b, g, dir, c));
}

// (b) and (c): each group's carry from the group summaries before it in gsum, then its chunk carries.
template <typename F, int Fields>
__global__ void group_carry_kernel(const F* __restrict__ w, const F* __restrict__ summ,
                                   const F* __restrict__ gsum, F* __restrict__ carry, Shape s) {
  int64_t b, g, c;
  int dir;
  if (!group_task(s, b, g, dir, c)) return;
  const int64_t o = s.state(Fields, b, 0, dir, c);
  const int64_t og = ((b * s.ngroups * 2 + dir) * Fields) * s.C + c;  // (b, group 0, dir, field 0, c)
  wkv::group_carries<F, Fields == kBwdFields>(summ + o, carry + o, gsum + og, s.ngroups, g, s.group,
                                               s.nch, 2 * Fields * s.C, s.C, dir, w[c]);
}

template <typename F>
__global__ void WKV_CHUNK_BOUNDS fwd_rescan_kernel(FwdArgs<F> a, const F* __restrict__ carry, Shape s) {
  Task tk;
  if (!chunk_lane(s, tk)) return;
  wkv::lane_fwd_rescan(fwd_lane(a, s, tk),
                       carry + s.state(kFwdFields, tk.b, tk.ch, 0, tk.c), kFwdFields * s.C, s.C,
                       a.ckpt + s.checkpoint(kFwdFields, tk.b, tk.ch, tk.c), kFwdFields * s.C);
}

// ----------------------------------------------------------------------------- backward
template <typename F> struct BwdArgs {
  const F *w, *u, *k, *v, *y, *m, *r, *gy;
  F *gk, *gv;
  F* ckpt;  // (B, nch, nck, kBwdFields, C): written by phase 1, read by phase 3
};

template <typename F> __device__ wkv::BwdLane<F> bwd_lane(const BwdArgs<F>& a, const Shape& s,
                                                         const Task& tk) {
  const int64_t base = (tk.b * s.T + tk.t0) * s.C + tk.c;
  return {a.k + base,  a.v + base,  a.y + base, a.m + base, a.r + base, a.gy + base,
          a.gk + base, a.gv + base, tk.t0,      static_cast<int>(tk.t1 - tk.t0),
          static_cast<int>(s.C), a.w[tk.c], a.u[tk.c]};
}

template <typename F>
__global__ void WKV_CHUNK_BOUNDS bwd_summary_kernel(BwdArgs<F> a, F* __restrict__ summ, Shape s) {
  Task tk;
  if (!chunk_lane(s, tk)) return;
  wkv::lane_bwd_summary(bwd_lane(a, s, tk), tk.ch, s.nch,
                        summ + s.state(kBwdFields, tk.b, tk.ch, 0, tk.c), kBwdFields * s.C, s.C,
                        wkv::Checkpoints<F>{a.ckpt + s.checkpoint(kBwdFields, tk.b, tk.ch, tk.c),
                                            kBwdFields * s.C});
}

template <typename F>
__global__ void WKV_CHUNK_BOUNDS bwd_rescan_kernel(BwdArgs<F> a, const F* __restrict__ carry,
                                  double* __restrict__ gw_part, double* __restrict__ gu_part,
                                  Shape s) {
  Task tk;
  if (!chunk_lane(s, tk)) return;
  const int64_t p = (tk.b * s.nch + tk.ch) * s.C + tk.c;
  wkv::lane_bwd_rescan(bwd_lane(a, s, tk),
                       carry + s.state(kBwdFields, tk.b, tk.ch, 0, tk.c), kBwdFields * s.C, s.C,
                       a.ckpt + s.checkpoint(kBwdFields, tk.b, tk.ch, tk.c), kBwdFields * s.C,
                       gw_part[p], gu_part[p]);
}

// Fixed-order sums of the rows of the (rows, C) double arrays pw, pu: thread (c, s) adds rows
// (s * span + i) * stride for i < min(span, rows - s * span), in that order, and stores the
// sums at row s * span * stride of ow, ou (thread (c, 0) stores zeros for rows = 0).  ow may be
// pw (the row stored is the thread's own first row, read before).  The rows are loaded in blocks
// of WKV_ROWS_AHEAD, one block ahead of the additions (as the scans' rows, "Loads ahead" in
// wkv_recurrence.h): each addition then waits on the previous one, not on a memory round trip.
// Same additions in the same order at any depth.
template <typename Out>
__global__ void sum_rows_kernel(const double* pw, const double* pu, Out* ow, Out* ou,
                                int64_t rows, int64_t span, int64_t stride, int64_t C) {
  constexpr int kAhead = WKV_ROWS_AHEAD;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t s = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t first = s * span;
  if (c >= C || (s > 0 && first >= rows)) return;
  const int64_t n = rows - first < span ? rows - first : span;
  double sw = 0.0, su = 0.0, cw[kAhead], cu[kAhead], nw[kAhead] = {}, nu[kAhead] = {};
  const auto load_block = [&](int64_t i) {
    WKV_UNROLL for (int j = 0; j < kAhead; ++j) {
      if (i + j < n) {
        nw[j] = pw[(first + i + j) * stride * C + c];
        nu[j] = pu[(first + i + j) * stride * C + c];
      }
    }
  };
  load_block(0);
  for (int64_t i = 0; i < n; i += kAhead) {
    WKV_UNROLL for (int j = 0; j < kAhead; ++j) {
      cw[j] = nw[j];
      cu[j] = nu[j];
    }
    load_block(i + kAhead);
    WKV_UNROLL for (int j = 0; j < kAhead; ++j) {
      if (i + j < n) {
        sw += cw[j];
        su += cu[j];
      }
    }
  }
  ow[first * stride * C + c] = static_cast<Out>(sw);
  ou[first * stride * C + c] = static_cast<Out>(su);
}

// --------------------------------------------------------------------------- launching
template <typename T> struct Exactly {  // keeps launch's arguments out of deduction
  using type = T;
};

// Runs `kernel` over grid x block on `stream`; without nvcc, the includer's
// launch_on_host runs the threads one by one.
template <typename... P>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream,
            typename Exactly<P>::type... args) {
#if defined(__CUDACC__)
  kernel<<<grid, block, 0, stream>>>(args...);
#else
  launch_on_host(kernel, grid, block, stream, args...);
#endif
}

template <bool Bwd> Shape make_shape(int64_t B, int64_t T, int64_t C, int64_t len) {
  const int64_t nch = (T + len - 1) / len;
  return {B, T, C, len, nch, (nch + kRows - 1) / kRows, wkv::checkpoints_per_chunk<Bwd>(len),
          wkv::carry_group(nch), wkv::carry_groups(nch)};
}

dim3 chunk_grid(const Shape& s) {
  return dim3(static_cast<unsigned int>(s.B * s.nchb),
              static_cast<unsigned int>((s.C + kLanes - 1) / kLanes));
}

unsigned int lane_blocks(const Shape& s) {
  return static_cast<unsigned int>((s.B * s.C * 2 + 127) / 128);
}

// Phase 2: the carries of every chunk from the summaries, in one sequential scan per lane and
// direction, or grouped (wkv_recurrence.h, "Grouped carries") with `groups` as scratch: a
// (B, groups, 2, Fields, C) buffer of group summaries.
template <typename F, int Fields>
void launch_carries(const F* w, const F* summ, F* carry, F* groups, const Shape& s,
                    cudaStream_t stream) {
  if (s.ngroups == 1) {
    launch(carry_kernel<F, Fields>, dim3(lane_blocks(s)), dim3(128), stream, w, summ, carry, s);
    return;
  }
  const dim3 grid(static_cast<unsigned int>((s.B * s.ngroups * 2 * s.C + 127) / 128));
  launch(group_summary_kernel<F, Fields>, grid, dim3(128), stream, w, summ, groups, s);
  launch(group_carry_kernel<F, Fields>, grid, dim3(128), stream, w, summ,
         static_cast<const F*>(groups), carry, s);
}

// gw, gu: the fixed-order sums over the `parts` rows (batch, chunk) of gw_part, gu_part.  From
// kSplitSumFrom rows on in two launches of about sqrt(parts) additions in a row each, the first
// summing spans of rows in place, the second the spans' sums (526 -> 23 + 23 at GLSP's
// T = 32768: one thread per channel adding all rows took 43 us of a 358 us forward + backward
// on an H200, Nsight Compute, 2026-12-04).
constexpr int64_t kSplitSumFrom = 32;

template <typename F>
void launch_reduce(double* gw_part, double* gu_part, F* gw, F* gu, int64_t parts, int64_t C,
                   cudaStream_t stream) {
  const auto blocks = [](int64_t n, int64_t per) { return static_cast<unsigned int>((n + per - 1) / per); };
  if (parts < kSplitSumFrom) {
    launch(sum_rows_kernel<F>, dim3(blocks(C, 128)), dim3(128), stream, gw_part, gu_part, gw, gu,
           parts, parts, 1, C);
    return;
  }
  int64_t span = static_cast<int64_t>(std::sqrt(static_cast<double>(parts)));
  while (span * span < parts) ++span;
  const int64_t spans = (parts + span - 1) / span;
  launch(sum_rows_kernel<double>, dim3(blocks(C, kLanes), blocks(spans, kRows)), dim3(kLanes, kRows),
         stream, gw_part, gu_part, gw_part, gu_part, parts, span, 1, C);
  launch(sum_rows_kernel<F>, dim3(blocks(C, 128)), dim3(128), stream, gw_part, gu_part, gw, gu,
         spans, spans, span, C);
}

template <typename F>
cudaError_t forward_impl(const F* w, const F* u, const F* k, const F* v, F* y, F* m, F* r,
                         F* summ, F* carry, F* ckpt, F* groups, int64_t B, int64_t T,
                         int64_t C, int64_t len, cudaStream_t stream) {
  if (B * T * C == 0) return cudaSuccess;
  if (len < 1 || len > wkv::cuda_chunk_limit(C)) return cudaErrorInvalidValue;  // 32-bit offsets
  const Shape s = make_shape<false>(B, T, C, len);
  const dim3 block(kLanes, kRows);
  const FwdArgs<F> a{w, u, k, v, y, m, r, ckpt};
  if (s.nch > 1 || s.nck > 0) {
    launch(fwd_summary_kernel<F>, chunk_grid(s), block, stream, a, summ, s);
  }
  launch_carries<F, kFwdFields>(w, summ, carry, groups, s, stream);
  launch(fwd_rescan_kernel<F>, chunk_grid(s), block, stream, a, carry, s);
  return cudaGetLastError();
}

template <typename F>
cudaError_t backward_impl(const BwdArgs<F>& a, F* summ, F* carry, F* groups, double* gw_part,
                          double* gu_part, F* gw, F* gu, int64_t B, int64_t T, int64_t C,
                          int64_t len, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  if (len < 1 || len > wkv::cuda_chunk_limit(C)) return cudaErrorInvalidValue;  // 32-bit offsets
  const Shape s = make_shape<true>(B, T, C, len);
  if (B * T > 0) {
    const dim3 block(kLanes, kRows);
    if (s.nch > 1 || s.nck > 0) launch(bwd_summary_kernel<F>, chunk_grid(s), block, stream, a, summ, s);
    launch_carries<F, kBwdFields>(a.w, summ, carry, groups, s, stream);
    launch(bwd_rescan_kernel<F>, chunk_grid(s), block, stream, a, carry,
           gw_part, gu_part, s);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  launch_reduce(gw_part, gu_part, gw, gu, B * T > 0 ? B * s.nch : 0, C, stream);
  return cudaGetLastError();
}

// Threads per SM the device keeps resident for the phase-1/3 kernels of one dtype: the fewest
// over the four.  Their registers (the rows they hold ahead), not the SM's thread limit,
// bound it: 512 on sm_90 in float32 (docs/wkv.md, "CUDA registers").
template <typename F> cudaError_t resident_threads(int* per_sm) {
  int fewest = 0;
  cudaError_t err = cudaSuccess;
  const auto count = [&](auto kernel) {
    int blocks = 0;
    if (err == cudaSuccess) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kLanes * kRows, 0);
    }
    const int threads = blocks * kLanes * kRows;
    if (err == cudaSuccess && (fewest == 0 || threads < fewest)) fewest = threads;
  };
  count(fwd_summary_kernel<F>);
  count(fwd_rescan_kernel<F>);
  count(bwd_summary_kernel<F>);
  count(bwd_rescan_kernel<F>);
  *per_sm = fewest;
  return err;
}

}  // namespace

// Resident threads per SM of the chunk kernels (float64 if `dbl`), for the automatic chunk length.
cudaError_t wkv_cuda_resident_threads(bool dbl, int* per_sm) {
  return dbl ? resident_threads<double>(per_sm) : resident_threads<float>(per_sm);
}

// Entry points used by wkv_cuda_binding.cpp (plain overloads, no templates across TUs).
// summ, carry: scratch of 2 * fields * B * ceil(T / len) * C elements (fields: kFwdFields,
// kBwdFields); ckpt: fields * B * ceil(T / len) * wkv::checkpoints_per_chunk<backward>(len) * C
// elements; groups: 2 * fields * B * ceil(ceil(T / len) / G) * C elements with
// G = wkv::carry_group(ceil(T / len)); gw_part, gu_part: B * ceil(T / len) * C doubles.
#define WKV_CUDA_ENTRY_POINTS(F)                                                          \
  cudaError_t wkv_cuda_forward(const F* w, const F* u, const F* k, const F* v, F* y, F* m, \
                               F* r, F* summ, F* carry, F* ckpt, F* groups, int64_t B,     \
                               int64_t T, int64_t C, int64_t len, cudaStream_t stream) {   \
    return forward_impl<F>(w, u, k, v, y, m, r, summ, carry, ckpt, groups, B, T, C, len,   \
                           stream);                                                        \
  }                                                                                        \
  cudaError_t wkv_cuda_backward(const F* w, const F* u, const F* k, const F* v,            \
                                const F* y, const F* m, const F* r, const F* gy, F* gk,    \
                                F* gv, F* summ, F* carry, F* ckpt, F* groups,              \
                                double* gw_part, double* gu_part, F* gw, F* gu, int64_t B, \
                                int64_t T, int64_t C, int64_t len, cudaStream_t stream) {  \
    const BwdArgs<F> a{w, u, k, v, y, m, r, gy, gk, gv, ckpt};                             \
    return backward_impl<F>(a, summ, carry, groups, gw_part, gu_part, gw, gu, B, T, C, len,\
                            stream);                                                       \
  }

WKV_CUDA_ENTRY_POINTS(float)
WKV_CUDA_ENTRY_POINTS(double)

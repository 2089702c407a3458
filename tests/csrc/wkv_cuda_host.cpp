// Runs the CUDA kernel's source (cuda_wkv/csrc/wkv_cuda.cu) on the host, for tests on
// machines without a GPU: the CUDA names it uses are defined here and every launch runs
// its threads one after another, in launch order or reversed.  The kernels share no
// memory and never synchronise inside a launch, so any thread order must give the same
// bits; a thread that reads another's output of the same launch, or writes outside its
// own lane, shows up as a difference between the two orders (tests/test_wkv_cuda_host.py
// also surrounds and fills every buffer with NaN to see out-of-range accesses).  A launch
// configuration a GPU would refuse (a zero or too large grid or block dimension, more
// than 1024 threads per block) does not run and is reported by cudaGetLastError, as on a GPU.
//
// Build: c++ -std=c++17 -O1 -shared -fPIC -I cuda_wkv/csrc tests/csrc/wkv_cuda_host.cpp
//        -o wkv_cuda_host.so
#include <cstddef>
#include <cstdint>

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
#define __global__
#define __device__
#define __launch_bounds__(...)

namespace {
dim3 blockIdx, threadIdx, blockDim;
bool reversed_order = false;
cudaError_t last_error = cudaSuccess;
}  // namespace

// The last launch error, then cleared (as the CUDA runtime's).
inline cudaError_t cudaGetLastError() {
  const cudaError_t err = last_error;
  last_error = cudaSuccess;
  return err;
}

// A configuration every CUDA device since compute capability 3.0 launches.
inline bool valid_launch(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  return grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu &&
         grid.y <= 65535 && grid.z <= 65535 && block.x >= 1 && block.y >= 1 && block.z >= 1 &&
         block.x <= 1024 && block.y <= 1024 && block.z <= 64 && threads <= 1024;
}

// Every (block, thread) of grid x block, one at a time.
template <typename... P, typename... A>
void launch_on_host(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t, A... args) {
  if (!valid_launch(grid, block)) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  blockDim = block;
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  for (int64_t i = 0; i < blocks * threads; ++i) {
    const int64_t j = reversed_order ? blocks * threads - 1 - i : i;
    const int64_t bi = j / threads, ti = j % threads;
    blockIdx = dim3(unsigned(bi % grid.x), unsigned(bi / grid.x % grid.y),
                    unsigned(bi / (int64_t(grid.x) * grid.y)));
    threadIdx = dim3(unsigned(ti % block.x), unsigned(ti / block.x % block.y),
                     unsigned(ti / (int64_t(block.x) * block.y)));
    kernel(args...);
  }
}

// Occupancy: the blocks of 128 threads an SM keeps resident, whatever the kernel (an H200
// keeps 4 of these kernels in float32: 108-140 registers per thread).
constexpr int kHostBlocksPerSm = 4;
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K, int, std::size_t) {
  *blocks = kHostBlocksPerSm;
  return cudaSuccess;
}

#include "wkv_cuda.cu"

// Resident threads per SM as the binding computes them for the automatic chunk length.
extern "C" int wkv_host_resident_threads(int dbl) {
  int per_sm = 0;
  return wkv_cuda_resident_threads(dbl != 0, &per_sm) == cudaSuccess ? per_sm : -1;
}

// C entry points for ctypes; `reversed` picks the thread order; each returns the
// cudaError_t of the call (0: success).  Buffer sizes as documented above
// WKV_CUDA_ENTRY_POINTS.
#define WKV_HOST_ENTRY_POINTS(F, SUFFIX)                                                  \
  extern "C" int wkv_host_forward_##SUFFIX(const F* w, const F* u, const F* k, const F* v,\
                                           F* y, F* m, F* r, F* summ, F* carry, F* ckpt,   \
                                           F* groups, int64_t B, int64_t T, int64_t C,     \
                                           int64_t len, int reversed) {                    \
    reversed_order = reversed != 0;                                                       \
    last_error = cudaSuccess;                                                             \
    return wkv_cuda_forward(w, u, k, v, y, m, r, summ, carry, ckpt, groups, B, T, C, len,  \
                            nullptr);                                                     \
  }                                                                                       \
  extern "C" int wkv_host_backward_##SUFFIX(                                              \
      const F* w, const F* u, const F* k, const F* v, const F* y, const F* m, const F* r, \
      const F* gy, F* gk, F* gv, F* summ, F* carry, F* ckpt, F* groups, double* gw_part,  \
      double* gu_part, F* gw, F* gu, int64_t B, int64_t T, int64_t C, int64_t len,        \
      int reversed) {                                                                     \
    reversed_order = reversed != 0;                                                       \
    last_error = cudaSuccess;                                                             \
    return wkv_cuda_backward(w, u, k, v, y, m, r, gy, gk, gv, summ, carry, ckpt, groups,  \
                             gw_part, gu_part, gw, gu, B, T, C, len, nullptr);            \
  }

WKV_HOST_ENTRY_POINTS(float, f32)
WKV_HOST_ENTRY_POINTS(double, f64)

// The device's division (wkv::div_from_rcp) from the given approximate reciprocals r0 of y.
extern "C" void wkv_host_div_from_rcp(const float* x, const float* y, const float* r0, float* q,
                                      int64_t n) {
  for (int64_t i = 0; i < n; ++i) q[i] = wkv::div_from_rcp(x[i], y[i], r0[i]);
}

// The host's exp and log (wkv::wkv_exp, wkv::wkv_log; the device's models under
// WKV_DEVICE_MATH_ON_HOST), elementwise.
#define WKV_HOST_MATH(F, SUFFIX)                                                 \
  extern "C" void wkv_host_exp_##SUFFIX(const F* x, F* y, int64_t n) {          \
    for (int64_t i = 0; i < n; ++i) y[i] = wkv::wkv_exp(x[i]);                  \
  }                                                                              \
  extern "C" void wkv_host_log_##SUFFIX(const F* x, F* y, int64_t n) {          \
    for (int64_t i = 0; i < n; ++i) y[i] = wkv::wkv_log(x[i]);                  \
  }
WKV_HOST_MATH(float, f32)
WKV_HOST_MATH(double, f64)

// Checkpoints per chunk of length len (of the backward if bwd), for the checkpoint buffers.
extern "C" int64_t wkv_host_checkpoints(int64_t len, int bwd) {
  return bwd ? wkv::checkpoints_per_chunk<true>(len) : wkv::checkpoints_per_chunk<false>(len);
}

// Phase 2's groups for nch chunks (1: one sequential scan, no group buffers).
extern "C" int64_t wkv_host_carry_groups(int64_t nch) { return wkv::carry_groups(nch); }

// Fields of a forward (bwd = 0) or backward state in the summary / carry buffers.
extern "C" int64_t wkv_host_state_fields(int bwd) { return bwd ? wkv::kBwdFields : wkv::kFwdFields; }

// The automatic chunk length the CUDA binding would pick on a device with `slots`
// resident threads, for elements of `itemsize` bytes.
extern "C" int64_t wkv_host_auto_chunk(int64_t B, int64_t T, int64_t C, int64_t slots,
                                       int64_t itemsize) {
  return wkv::cuda_auto_chunk(B, T, C, slots, itemsize);
}

// C++ CPU kernel for the exact bidirectional WKV (see wkv_recurrence.h).
//
// Layout (B, T, C) is channel-contiguous, so the inner loops run over a block of
// NB contiguous channels (independent lanes) and vectorise; the sequential scan runs
// over t.  Work is split over (batch, channel block) with at::parallel_for.  The
// partition depends only on (B, C), never on the thread count, and every lane sums
// in a fixed order, so the results are bitwise deterministic.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#include "wkv_checks.h"
#include "wkv_recurrence.h"

namespace {

constexpr int kBlock = 16;  // channels per task (2 AVX2 / 1 AVX-512 float vector)

#if defined(__GNUC__) && !defined(__clang__)
#define WKV_SIMD _Pragma("GCC ivdep")
#else
#define WKV_SIMD _Pragma("omp simd")
#endif

// One (batch, channel-block) task of the forward.  Pointers are offset to (b, 0, c0).
// NB > 0: compile-time block width (fully vectorised); NB == 0: runtime width n.
template <typename F, int NB>
void forward_block(const F* __restrict__ k, const F* __restrict__ v,
                   const F* __restrict__ wp, const F* __restrict__ up,
                   F* __restrict__ y, F* __restrict__ m, F* __restrict__ r,
                   int64_t T, int64_t C, int n_rt) {
  const int n = NB > 0 ? NB : n_rt;
  F w[kBlock], u[kBlock], a[kBlock], b[kBlock], c[kBlock];
  for (int j = 0; j < n; ++j) {
    w[j] = wp[j];
    u[j] = up[j];
    a[j] = b[j] = F(0);
    c[j] = wkv::neg_big<F>();
  }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = t * C;
    const F tf = static_cast<F>(t);
    WKV_SIMD
    for (int j = 0; j < n; ++j) {
      wkv::fwd_pass1_step<F>(a[j], b[j], c[j], tf * w[j], w[j], k[o + j], v[o + j],
                             y[o + j], r[o + j], m[o + j]);
    }
  }
  for (int j = 0; j < n; ++j) {
    a[j] = b[j] = F(0);
    c[j] = wkv::neg_big<F>();
  }
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t o = t * C;
    const F tf = static_cast<F>(t);
    WKV_SIMD
    for (int j = 0; j < n; ++j) {
      wkv::fwd_pass2_step<F>(a[j], b[j], c[j], -tf * w[j], w[j], u[j], k[o + j],
                             v[o + j], y[o + j], m[o + j], r[o + j]);
    }
  }
}

// One (batch, channel-block) task of the backward.  gw_part / gu_part: this task's
// per-channel partial sums (double).
template <typename F, int NB>
void backward_block(const F* __restrict__ k, const F* __restrict__ v,
                    const F* __restrict__ wp, const F* __restrict__ up,
                    const F* __restrict__ y, const F* __restrict__ m,
                    const F* __restrict__ r, const F* __restrict__ gy,
                    F* __restrict__ gk, F* __restrict__ gv,
                    double* __restrict__ gw_part, double* __restrict__ gu_part,
                    int64_t T, int64_t C, int n_rt) {
  const int n = NB > 0 ? NB : n_rt;
  F w[kBlock], u[kBlock];
  F fa[kBlock], fb[kBlock], fdv[kBlock], fdb[kBlock], cf[kBlock];
  F r1[kBlock], r2[kBlock], cr[kBlock];
  double gw[kBlock], gu[kBlock];
  for (int j = 0; j < n; ++j) {
    w[j] = wp[j];
    u[j] = up[j];
    gw[j] = gu[j] = 0.0;
    wkv::bwd_init(fa[j], fb[j], fdv[j], fdb[j], cf[j], r1[j], r2[j], cr[j]);
  }
  // pass 1, left to right: left-side sums; transposed sums stored in gv / gk.
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = t * C;
    const F tf = static_cast<F>(t);
    WKV_SIMD
    for (int j = 0; j < n; ++j) {
      F s1, s2;
      wkv::bwd_step<F, double>(fa[j], fb[j], fdv[j], fdb[j], cf[j], r1[j], r2[j], cr[j],
                               tf * w[j], w[j], k[o + j], v[o + j], y[o + j], m[o + j],
                               r[o + j], gy[o + j], gw[j], s1, s2);
      gv[o + j] = s1;
      gk[o + j] = s2;
    }
  }
  for (int j = 0; j < n; ++j) {
    wkv::bwd_init(fa[j], fb[j], fdv[j], fdb[j], cf[j], r1[j], r2[j], cr[j]);
  }
  // pass 2, right to left: right-side sums, then the final combination.
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t o = t * C;
    const F tf = static_cast<F>(t);
    WKV_SIMD
    for (int j = 0; j < n; ++j) {
      F s1, s2;
      const F kk = k[o + j], vv = v[o + j], yy = y[o + j], mm = m[o + j], rr = r[o + j],
              gg = gy[o + j];
      wkv::bwd_step<F, double>(fa[j], fb[j], fdv[j], fdb[j], cf[j], r1[j], r2[j], cr[j],
                               -tf * w[j], w[j], kk, vv, yy, mm, rr, gg, gw[j], s1, s2);
      F g_v, g_k;
      wkv::bwd_finish<F, double>(u[j], kk, vv, yy, mm, rr, gg, gv[o + j] + s1,
                                 gk[o + j] + s2, gu[j], g_v, g_k);
      gv[o + j] = g_v;
      gk[o + j] = g_k;
    }
  }
  for (int j = 0; j < n; ++j) {
    gw_part[j] = -gw[j];
    gu_part[j] = gu[j];
  }
}

std::vector<at::Tensor> wkv_forward(at::Tensor w, at::Tensor u, at::Tensor k,
                                    at::Tensor v) {
  wkv::check_inputs("wkv_cpu", c10::DeviceType::CPU, w, u, k, v);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto y = at::empty_like(k), m = at::empty_like(k), r = at::empty_like(k);
  if (k.numel() == 0) return {y, m, r};
  const int64_t nblk = (C + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_forward_cpu", [&] {
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* mp = m.data_ptr<scalar_t>();
    scalar_t* rp = r.data_ptr<scalar_t>();
    at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bi = task / nblk, c0 = (task % nblk) * kBlock;
        const int n = static_cast<int>(std::min<int64_t>(kBlock, C - c0));
        const int64_t off = bi * T * C + c0;
        if (n == kBlock) {
          forward_block<scalar_t, kBlock>(kp + off, vp + off, wp + c0, up + c0, yp + off,
                                          mp + off, rp + off, T, C, n);
        } else {
          forward_block<scalar_t, 0>(kp + off, vp + off, wp + c0, up + c0, yp + off,
                                     mp + off, rp + off, T, C, n);
        }
      }
    });
  });
  return {y, m, r};
}

std::vector<at::Tensor> wkv_backward(at::Tensor w, at::Tensor u, at::Tensor k,
                                     at::Tensor v, at::Tensor y, at::Tensor m,
                                     at::Tensor r, at::Tensor gy) {
  wkv::check_inputs("wkv_cpu", c10::DeviceType::CPU, w, u, k, v);
  wkv::check_saved("wkv_cpu", k, {&y, &m, &r, &gy});
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto gk = at::empty_like(k), gv = at::empty_like(k);
  auto gw_part = at::zeros({B, C}, k.options().dtype(at::kDouble));
  auto gu_part = at::zeros({B, C}, k.options().dtype(at::kDouble));
  const int64_t nblk = (C + kBlock - 1) / kBlock;
  if (k.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_backward_cpu", [&] {
      const scalar_t* kp = k.data_ptr<scalar_t>();
      const scalar_t* vp = v.data_ptr<scalar_t>();
      const scalar_t* wp = w.data_ptr<scalar_t>();
      const scalar_t* up = u.data_ptr<scalar_t>();
      const scalar_t* yp = y.data_ptr<scalar_t>();
      const scalar_t* mp = m.data_ptr<scalar_t>();
      const scalar_t* rp = r.data_ptr<scalar_t>();
      const scalar_t* gp = gy.data_ptr<scalar_t>();
      scalar_t* gkp = gk.data_ptr<scalar_t>();
      scalar_t* gvp = gv.data_ptr<scalar_t>();
      double* gwp = gw_part.data_ptr<double>();
      double* gup = gu_part.data_ptr<double>();
      at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t bi = task / nblk, c0 = (task % nblk) * kBlock;
          const int n = static_cast<int>(std::min<int64_t>(kBlock, C - c0));
          const int64_t off = bi * T * C + c0;
          if (n == kBlock) {
            backward_block<scalar_t, kBlock>(kp + off, vp + off, wp + c0, up + c0,
                                             yp + off, mp + off, rp + off, gp + off,
                                             gkp + off, gvp + off, gwp + bi * C + c0,
                                             gup + bi * C + c0, T, C, n);
          } else {
            backward_block<scalar_t, 0>(kp + off, vp + off, wp + c0, up + c0, yp + off,
                                        mp + off, rp + off, gp + off, gkp + off,
                                        gvp + off, gwp + bi * C + c0, gup + bi * C + c0,
                                        T, C, n);
          }
        }
      });
    });
  }
  // Fixed-order reduction over the batch (deterministic, independent of threads).
  auto gw = at::zeros({C}, k.options().dtype(at::kDouble));
  auto gu = at::zeros({C}, k.options().dtype(at::kDouble));
  {
    const double* gwp = gw_part.data_ptr<double>();
    const double* gup = gu_part.data_ptr<double>();
    double* ow = gw.data_ptr<double>();
    double* ou = gu.data_ptr<double>();
    for (int64_t bi = 0; bi < B; ++bi) {
      for (int64_t c = 0; c < C; ++c) {
        ow[c] += gwp[bi * C + c];
        ou[c] += gup[bi * C + c];
      }
    }
  }
  return {gw.to(k.scalar_type()), gu.to(k.scalar_type()), gk, gv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "cuda_wkv: exact bidirectional WKV, C++ CPU kernel";
  mod.def("forward", &wkv_forward, "forward(w, u, k, v) -> [y, m, r]");
  mod.def("backward", &wkv_backward,
          "backward(w, u, k, v, y, m, r, gy) -> [gw, gu, gk, gv]");
}

// Exact bidirectional WKV: the per-lane recurrence shared by the C++ CPU kernel
// (wkv_cpu.cpp, vectorised across channels) and the CUDA kernel (wkv_cuda.cu, one
// thread per (batch, channel) lane).
//
// Problem (per batch b and channel c, sequence index t = 0..T-1):
//
//   L_ti = k_i - (|t-i| - 1) * w   (i != t),     L_tt = u + k_t
//   D_t  = sum_i exp(L_ti),   y_t = sum_i exp(L_ti) v_i / D_t
//
// Algorithm.  Two directional scans.  A scan in direction `dir` (+1: left to right,
// -1: right to left) keeps, at position t, the sums over the indices i already
// passed (i < t for dir=+1, i > t for dir=-1) in a *scaled* form:
//
//   true_sum_t = scaled_sum * exp(p_t),     p_t = max_i L_ti over those i.
//
// Moving one step further multiplies every old term by exp(-w), i.e. p decreases by
// w while the scaled sums stay unchanged -- no multiplication at all.  To avoid the
// rounding drift of repeatedly subtracting w, p is not stored: we store an anchor
// `c` with p_t = c - dir*t*w (one fused multiply-add per step, error independent of
// the number of steps).  A new term (exponent `key` at distance 0) is folded in with
// a single exp: if it does not exceed the running maximum it is scaled by
// exp(key - p), otherwise the old sums are scaled by exp(p - key) and the anchor
// moves.  The running maximum is exactly the largest term, so the scaled
// denominators are >= 1 and nothing overflows for any w (positive or negative),
// any k and any T.
//
// Forward (2 passes): pass 1 (dir=+1) stores the left state (a, b, p) of every t in
// the output buffers; pass 2 (dir=-1) combines it with the right state and the
// diagonal term, writing y_t, m_t (the log-scale of D_t) and r_t = exp(m_t)/D_t.
//
// Backward (2 passes, closed form, see docs/wkv.md):
//   P_tj = exp(L_tj - m_t) * r_t                 (softmax weights, <= 1)
//   gv_j = sum_t gy_t P_tj
//   gk_j = v_j gv_j - sum_t gy_t y_t P_tj
//   gu   = sum_t gy_t P_tt (v_t - y_t)
//   gw   = -sum_t gy_t r_t e^{-m_t} sum_{i!=t} (|t-i|-1) e^{L_ti} (v_i - y_t)
// The transposed sums over t are scans with key -m_t; the distance-weighted sums for
// gw are carried by two extra channels d with d' = e^{-w} (d + a).  gw and gu are
// accumulated per lane in a fixed order (no atomics): results are bitwise
// deterministic.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define WKV_HD __host__ __device__ __forceinline__
#elif defined(_MSC_VER)
#define WKV_HD __forceinline
#else
#define WKV_HD inline __attribute__((always_inline))
#endif

namespace wkv {

// "Minus infinity" used for empty scan states.  Finite on purpose: it keeps every
// expression free of inf - inf, and exp() of anything that large and negative is 0
// (or the smallest normal number, which multiplies a zero sum).
template <typename F> WKV_HD F neg_big();
template <> WKV_HD float neg_big<float>() { return -1.0e30f; }
template <> WKV_HD double neg_big<double>() { return -1.0e300; }

// exp() for the recurrence.  On the host, float uses a branch-free polynomial that
// gcc/clang vectorise (Cody-Waite range reduction + degree-6 minimax polynomial,
// ~1-2 ulp); double uses the library exp (double is only used for float64 inputs,
// e.g. gradcheck, where accuracy matters more than speed).
WKV_HD float wkv_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // round(x / ln2) with the 1.5*2^23 trick (exact for |x/ln2| < 2^22, no libm call)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;  // ln2 split in a high part exact in float ...
  r = r - n * -2.12194440e-4f;     // ... and a low correction
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return q * scale;
#endif
}

WKV_HD double wkv_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

template <typename F> WKV_HD F wkv_max(F a, F b) { return a > b ? a : b; }

// Fold a new term (log-weight `key`, values xa, xb) into a scaled two-channel sum.
// p_next: exponent of the *old* sums at the position that receives the new term.
// c_new:  anchor to use if the new term becomes the running maximum.
template <typename F>
WKV_HD void fold2(F& a, F& b, F& c, F p_next, F key, F xa, F xb, F c_new) {
  const F d = p_next - key;
  const bool keep = d >= F(0);
  const F e = wkv_exp(keep ? -d : d);
  const F so = keep ? F(1) : e;
  const F sn = keep ? e : F(1);
  a = a * so + xa * sn;
  b = b * so + xb * sn;
  c = keep ? c : c_new;
}

// ---------------------------------------------------------------------------------
// Forward pass 1 at position t.  tdw = dir * t * w.  Emits the state for position t
// (scaled numerator, scaled denominator, exponent), then folds term t in.
template <typename F>
WKV_HD void fwd_pass1_step(F& a, F& b, F& c, F tdw, F w, F k, F v,
                           F& out_a, F& out_b, F& out_p) {
  const F p = c - tdw;
  out_a = a;
  out_b = b;
  out_p = p;
  fold2(a, b, c, p - w, k, v, F(1), k + tdw + w);
}

// Forward pass 2 at position t (direction opposite to pass 1).  io_* hold pass 1's
// (a, p, b) on entry and (y, m, r) on exit.
template <typename F>
WKV_HD void fwd_pass2_step(F& a, F& b, F& c, F tdw, F w, F u, F k, F v,
                           F& io_y, F& io_m, F& io_r) {
  const F p2 = c - tdw;
  const F a1 = io_y, p1 = io_m, b1 = io_r;
  const F pd = u + k;
  const F mx = wkv_max(wkv_max(p1, p2), pd);
  const F e1 = wkv_exp(p1 - mx);
  const F e2 = wkv_exp(p2 - mx);
  const F e3 = wkv_exp(pd - mx);
  const F num = a1 * e1 + a * e2 + v * e3;
  const F den = b1 * e1 + b * e2 + e3;  // >= 1: one of the exponents equals mx
  const F r = F(1) / den;
  io_y = num * r;
  io_m = mx;
  io_r = r;
  fold2(a, b, c, p2 - w, k, v, F(1), k + tdw + w);
}

// ---------------------------------------------------------------------------------
// Backward scan state of one lane and one direction: forward sums
// (fa, fb, fdv, fdb; anchor cf) of e^{L} v, e^{L}, dist*e^{L} v, dist*e^{L}, and the
// transposed sums (r1, r2; anchor cr) of e^{-m} r gy and e^{-m} r gy y.
template <typename F>
WKV_HD void bwd_init(F& fa, F& fb, F& fdv, F& fdb, F& cf, F& r1, F& r2, F& cr) {
  fa = fb = fdv = fdb = r1 = r2 = F(0);
  cf = cr = neg_big<F>();
}

// One backward step at position t.  Adds this direction's gw contribution to gw_acc
// and returns in (s1, s2) this direction's parts of sum_t gy_t P_tj and
// sum_t gy_t y_t P_tj for j = current position.
template <typename F, typename A>
WKV_HD void bwd_step(F& fa, F& fb, F& fdv, F& fdb, F& cf, F& r1, F& r2, F& cr,
                     F tdw, F w, F k, F v, F y, F m, F r, F gy,
                     A& gw_acc, F& s1, F& s2) {
  const F gr = gy * r;
  const F pf = cf - tdw;
  const F ef = wkv_exp(pf - m);  // <= 1
  gw_acc += static_cast<A>(gr * ef * (fdv - y * fdb));
  const F pr = cr - tdw;
  const F er = wkv_exp(k + pr);  // <= 1
  s1 = er * r1;
  s2 = er * r2;
  {  // fold term t into the forward sums (new term has distance 0: no d contribution)
    const F d = pf - w - k;
    const bool keep = d >= F(0);
    const F e = wkv_exp(keep ? -d : d);
    const F so = keep ? F(1) : e;
    const F sn = keep ? e : F(1);
    fdv = so * (fdv + fa);
    fdb = so * (fdb + fb);
    fa = so * fa + sn * v;
    fb = so * fb + sn;
    cf = keep ? cf : k + tdw + w;
  }
  fold2(r1, r2, cr, pr - w, -m, gr, gr * y, tdw + w - m);
}

// Final combination at position t in the second backward pass.  s1, s2: sums of
// both directions.  Returns gv_t, gk_t and adds the gu contribution.
template <typename F, typename A>
WKV_HD void bwd_finish(F u, F k, F v, F y, F m, F r, F gy, F s1, F s2,
                       A& gu_acc, F& gv, F& gk) {
  const F pdg = wkv_exp(u + k - m) * (gy * r);  // gy_t * P_tt
  const F g = s1 + pdg;
  gv = g;
  gk = v * g - (s2 + pdg * y);
  gu_acc += static_cast<A>(pdg * (v - y));
}

}  // namespace wkv

// Exact bidirectional WKV: the scan algebra shared by the C++ CPU kernel (wkv_cpu.cpp,
// vectorised across channels) and the CUDA kernel (wkv_cuda.cu, one thread per
// (batch, channel, chunk)).  Everything here is host + device code; the two kernels
// only differ in how they loop over lanes and chunks.
//
// Problem (per batch b and channel c, sequence index t = 0..T-1):
//
//   L_ti = k_i - (|t-i| - 1) * w   (i != t),     L_tt = u + k_t
//   D_t  = sum_i exp(L_ti),   y_t = sum_i exp(L_ti) v_i / D_t
//
// Log-weights with exact integer distances.  Every log-weight handled here has the
// form  a + n*w + (a part that depends only on the position it is seen from), where a is
// a float (an input such as k_i, or -lse_t) and n an integer stored exactly as a float
// (|n| < 2^24 in float32, 2^53 in float64).  Seen from a position t, a term i < t has
// a = k_i, n = i and position part -(t-1)w ("left" type); a term i > t has a = k_i,
// n = -i and position part (t+1)w ("right" type).  Two terms of one type compare by
//   rel = (a1 - a2) + (n1 - n2) * w,
// where n1 - n2 is exact, so the only rounding is that of a difference that matters:
// a weight e^{-|rel|} is inaccurate only in proportion to |rel|, never to |w| * T.
// (Anchoring exponents at t = 0, as in  k_i + i*w, costs eps * |w| * T instead.)
//
// A *sum* is a set of terms stored relative to one of them, its reference (a, n): its
// largest term, or for the backward's transposed sums a term that may be smaller (lazy
// rescaling, merge_scales: by up to a factor e after folds of single terms, e^2 to e^3 after
// merges of partial sums): s0 = sum_i e^{rel_i} >= 1, plus value channels.  Sums merge
// exactly -- the log-sum-exp merge -- with one exp: one sum is scaled by e^{rel} to the
// other's reference.
// Because a sum does not depend on the position it is seen from (only its distances
// do), a chunk of the sequence can be summarised once and merged into any later state:
// that is the chunked three-phase scan the kernels run (the CPU kernel runs "two halves"
// instead when there are exactly two chunks, see wkv_cpu.cpp):
//   1. chunk summaries, all chunks in parallel;
//   2. a short sequential scan over the chunk summaries of one lane (the carries);
//   3. each chunk rescanned from its carried-in state, all chunks in parallel.
// Merges happen in a fixed order: results are bitwise reproducible for a given chunk
// length, and equal up to rounding across chunk lengths.
//
// Forward.  The forward sums carry the numerator as a weighted *mean* of v (a convex
// combination), so v up to ~3e38 does not overflow.  A rescan is two passes:
// the first (usually left to right) stores each position's sum of one side
// (mean, a + log s0, n) in the output buffers (y, m, r); the second, in the opposite
// direction, merges the other side's sum, the stored one and the diagonal u + k_t, and
// position t writes
//   y_t,   m_t, r_t  with  lse_t = log D_t = m_t + r_t * w,  r_t an integer.
// Either side can come first; the CPU kernel uses this when a lane is split in exactly two
// chunks (see "Two halves" in wkv_cpu.cpp; the CUDA kernel always runs three phases).
// The CUDA kernel keeps the stored side off the output buffers: it rescans in one pass,
// re-deriving the stored side block by block from checkpoints phase 1 stores
// ("Checkpoints" below).
// A row whose weights are all e^{-inf} = 0 gives y_t = NaN (0/0, as the definition).
//
// Backward (closed form).  P_tj = e^{L_tj - lse_t} (softmax weights, <= 1):
//   gv_j = sum_t gy_t P_tj
//   gk_j = sum_t gy_t P_tj (v_j - y_t)   (= v_j gv_j - sum_t gy_t y_t P_tj)
//   gu   = sum_t gy_t P_tt (v_t - y_t)
//   gw   = -sum_t gy_t sum_{i!=t} P_ti (|t-i|-1) (v_i - y_t)
// The sums over t for a fixed j are "transposed" sums whose terms t have a = -m_t and
// an integer n built from t and r_t; the distance-weighted sums for gw are carried by
// two extra channels d, distances measured from each sum's reference term.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define WKV_HD __host__ __device__ __forceinline__
#elif defined(_MSC_VER)
#define WKV_HD __forceinline
#else
#define WKV_HD inline __attribute__((always_inline))
#endif

// A loop over a compile-time count, unrolled so that arrays indexed by it stay in registers.
#if defined(__CUDACC__) || defined(__clang__)  // nvcc (both passes), clang
#define WKV_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define WKV_UNROLL _Pragma("GCC unroll 16")
#else
#define WKV_UNROLL
#endif

// Rows (positions) and chunk summaries a lane loads ahead of the step that uses them (see
// "Loads ahead" below); a compile-time depth, overridable for the tests that check the
// results do not depend on it.
#ifndef WKV_ROWS_AHEAD
#define WKV_ROWS_AHEAD 8
#endif

namespace wkv {

// Positions (or chunk summaries) a pass loads ahead: WKV_ROWS_AHEAD for the forward in
// float, half as many for the backward (its 7-field state in phase 2, its six inputs in phase
// 3) and for double (registers).
template <typename F, bool Bwd>
constexpr int kAheadOf = WKV_ROWS_AHEAD / ((Bwd ? 2 : 1) * (sizeof(F) > 4 ? 2 : 1)) > 0
                             ? WKV_ROWS_AHEAD / ((Bwd ? 2 : 1) * (sizeof(F) > 4 ? 2 : 1))
                             : 1;

template <typename F> WKV_HD F neg_inf() { return static_cast<F>(-INFINITY); }
template <typename F> WKV_HD F quiet_nan() { return static_cast<F>(NAN); }

// e^x for the scans.  Every exp the kernels take is a weight relative to a reference term
// of weight 1, the largest or within a factor e of it (merge_scales): x <= 1 (up to
// rounding).
// * CUDA: 2^(x log2 e) from the hardware's ex2.approx.ftz (MUFU.EX2, within 2 ulp of 2^y; y
//   rounded to float first): two instructions where expf takes eight (5 exps a position in
//   the backward's rescan; the instructions, as wkv_sass.py counts them).  Rounding y costs a relative error up to |x| 2^-24 on top of the
//   2 ulp, so up to ~1.2 |x| ulp (CUDA's __expf bound); the absolute error that adds to a
//   weight e^x, |x| e^x 2^-24 <= e 2^-24 (x <= 1), is below an ulp of the reference's weight 1.
//   Where the weight scales a sum of n terms, the sum's share loses at most ~1.2 ln(n) ulp
//   (x ~ -ln n for a sum that matters), ~12 ulp at n = 32768.  Results below 2^-126 are
//   flushed to 0, as the host's polynomial does (the kernels' totals are then exactly 0).
// * Host, float: a branch-free polynomial that gcc/clang vectorise (Cody-Waite range
//   reduction + degree-6 minimax polynomial, within ~1 ulp), 0 below e^-87.3, just above the
//   smallest normal number (e^{-inf} = 0); double: likewise, below.  Both assume x <= ~88
//   (float) or ~709 (double): larger x give e^88 or e^709, not infinity; the kernels' x are <= 1.
// * WKV_DEVICE_MATH_ON_HOST (the tests' stand-in for the GPU): the same rounded y, 2^y
//   correctly rounded, then moved 2 ulps in the direction WKV_DEVICE_MUFU_BIAS (-1, 0 = none,
//   +1; the tests bias every result to the hardware's bound), flushed below 2^-126; with
//   WKV_DEVICE_EXP_KEEPS_SUBNORMALS as well, the library's accurate exp, which keeps
//   subnormal results as CUDA's expf does (the tests of the totals such results make).
constexpr float kLog2e = 1.44269504088896341f;
// ln 2 in two parts for the host exp's and log's Cody-Waite reductions: a high part whose
// trailing zero bits make n * hi exact for their exponents n, and the rest.
constexpr float kLn2HiF = 0.693359375f, kLn2LoF = -2.12194440e-4f;
constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
#ifndef WKV_DEVICE_MUFU_BIAS
#define WKV_DEVICE_MUFU_BIAS 0
#endif
#if defined(WKV_DEVICE_MATH_ON_HOST)
// v moved 2 ulps in the direction WKV_DEVICE_MUFU_BIAS (the host models' documented bounds).
inline float mufu_bias_ulps(float v) {
  for (int i = 0; i < 2 && WKV_DEVICE_MUFU_BIAS != 0; ++i)
    v = std::nextafter(v, WKV_DEVICE_MUFU_BIAS > 0 ? INFINITY : -INFINITY);
  return v;
}
#endif
WKV_HD float wkv_exp(float x) {
#if defined(__CUDA_ARCH__)
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x * kLog2e));
  return e;
#elif defined(WKV_DEVICE_MATH_ON_HOST) && defined(WKV_DEVICE_EXP_KEEPS_SUBNORMALS)
  return std::exp(x);  // an accurate exp that keeps subnormal results (CUDA's expf): tests
#elif defined(WKV_DEVICE_MATH_ON_HOST)
  const float y = x * kLog2e;
  if (!(y >= -126.0f)) return y != y ? y : 0.0f;  // NaN stays NaN; 2^y < 2^-126 is flushed
  const float e = mufu_bias_ulps(static_cast<float>(std::exp2(static_cast<double>(y))));
  return e < FLT_MIN ? 0.0f : e;
#else
  const bool under = x < -87.3f;  // e^x < 2^-126 (and e^-87.3 > 2^-126, so n >= -126 below)
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.0f ? 88.0f : x;
  // round(x / ln2) with the 1.5*2^23 trick (exact for |x/ln2| < 2^22, no libm call)
  const float n = (x * kLog2e + 12582912.0f) - 12582912.0f;
  float r = x - n * kLn2HiF;
  r = r - n * kLn2LoF;
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
  return under ? 0.0f : q * scale;
#endif
}

// e^x in double.  CUDA: the library's exp.  Host: as the float version -- Cody-Waite range
// reduction (ln 2 split in a high part with 11 trailing zero bits, so n * ln2_hi is exact, and
// a low correction) to |r| <= ln(2)/2, then the degree-13 Taylor polynomial of e^r (truncation
// r^14/14! < 5e-18, 0.02 ulp), ~1 ulp; 0 below e^-708.39, just above the smallest normal
// number; x above 709 gives e^709 (see the float version).  Branch-free, so the channel
// loops vectorise (std::exp is a scalar call: the float64 kernel took 13x the float32 one's
// time at B = 2, T = 32768, C = 64; docs/wkv.md, "Longer still").
WKV_HD double wkv_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  const bool under = x < -708.39;  // e^x < 2^-1022 (and e^-708.39 > 2^-1022, so n >= -1022 below)
  x = x < -708.39 ? -708.39 : x;
  x = x > 709.0 ? 709.0 : x;
  // round(x / ln2) with the 1.5*2^52 trick (exact for |x/ln2| < 2^51)
  const double n = (x * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;
  double r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  double q = 1.0 / 6227020800.0;  // 1/13!
  q = q * r + 1.0 / 479001600.0;
  q = q * r + 1.0 / 39916800.0;
  q = q * r + 1.0 / 3628800.0;
  q = q * r + 1.0 / 362880.0;
  q = q * r + 1.0 / 40320.0;
  q = q * r + 1.0 / 5040.0;
  q = q * r + 1.0 / 720.0;
  q = q * r + 1.0 / 120.0;
  q = q * r + 1.0 / 24.0;
  q = q * r + 1.0 / 6.0;
  q = q * r + 0.5;
  q = q * r * r + r + 1.0;
  // 2^n, n in [-1022, 1023]; through int32, as conversions between double and int64 need
  // AVX-512DQ to vectorise (with AVX2 alone gcc 12 left every loop of the float64 kernel scalar)
  const int64_t bits = static_cast<int64_t>(static_cast<int32_t>(n) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof(double));
  return under ? 0.0 : q * scale;
#endif
}

// log x of a positive normal number (the kernels take it of totals of weights, x >= 1).
// * CUDA: log2 x from the hardware's lg2.approx.ftz (MUFU.LG2), times ln 2: two instructions
//   where logf's polynomial takes about 26 (one log a position in the forward's rescan; the
//   caller's addition may fuse with the product).  CUDA documents __log2f, this instruction,
//   as within 2^-22 absolute for x in [0.5, 2] and 2 ulp elsewhere: with the product's
//   rounding up to ~3 ulp of log x (logf: 1 ulp), a relative error of that size in every
//   weight of the backward's row whose normaliser it is (~1.3e-6 at x = 32768, independent
//   of |w| T).
// * Host, float: exponent from the bits, mantissa m in [sqrt(1/2), sqrt(2)), log m = x - x^2/2
//   + x^3 P(x) with x = m - 1 and a degree-8 minimax polynomial P (the Cephes logf
//   coefficients, < 1 ulp); no division, vectorisable.
// * WKV_DEVICE_MATH_ON_HOST: log2 x correctly rounded, moved to the bound above in the
//   direction WKV_DEVICE_MUFU_BIAS, times ln 2 rounded to float.
WKV_HD float wkv_log(float x) {
#if defined(__CUDA_ARCH__)
  float l2;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(l2) : "f"(x));
  return l2 * 0.693147180559945309f;
#elif defined(WKV_DEVICE_MATH_ON_HOST)
  float l2 = static_cast<float>(std::log2(static_cast<double>(x)));
  if (x >= 0.5f && x <= 2.0f) {
    l2 = static_cast<float>(l2 + WKV_DEVICE_MUFU_BIAS * 0x1p-22);
  } else if (std::isfinite(l2)) {
    l2 = mufu_bias_ulps(l2);
  }
  return l2 * 0.693147180559945309f;
#else
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(float));
  int32_t e = ((bits >> 23) & 0xff) - 127;
  bits = (bits & 0x007fffff) | 0x3f800000;  // mantissa in [1, 2)
  float m;
  std::memcpy(&m, &bits, sizeof(float));
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f, z = f * f, ef = static_cast<float>(e);
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float y = f * z * p + ef * kLn2LoF - 0.5f * z;
  return (f + y) + ef * kLn2HiF;
#endif
}

// log x in double of a positive normal finite number (the host version returns garbage for
// anything else: 0, subnormals, infinities, NaN).  CUDA: the library's log.  Host: exponent e
// from the bits, mantissa m in [sqrt(1/2), sqrt(2)), f = m - 1, s = f / (2 + f) (|s| <= 0.172):
// log m = 2 atanh s = f - (f^2/2 - s (f^2/2 + R)), R = sum_{j=1..11} 2 s^{2j} / (2j + 1)
// (truncation < 1e-18 relative), plus e ln 2 in the two parts of the exp; ~1 ulp, one
// division, vectorisable (std::log is a scalar call).
WKV_HD double wkv_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  int64_t bits;
  std::memcpy(&bits, &x, sizeof(double));
  int32_t e = static_cast<int32_t>((bits >> 52) & 0x7ff) - 1023;  // int32: see wkv_exp
  bits = (bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL;  // mantissa in [1, 2)
  double m;
  std::memcpy(&m, &bits, sizeof(double));
  const bool big = m > 1.4142135623730951;
  m = big ? 0.5 * m : m;
  e = big ? e + 1 : e;
  const double f = m - 1.0, s = f / (2.0 + f), z = s * s, hfsq = 0.5 * f * f;
  const double ed = static_cast<double>(e);
  double p = 2.0 / 23.0;
  p = p * z + 2.0 / 21.0;
  p = p * z + 2.0 / 19.0;
  p = p * z + 2.0 / 17.0;
  p = p * z + 2.0 / 15.0;
  p = p * z + 2.0 / 13.0;
  p = p * z + 2.0 / 11.0;
  p = p * z + 2.0 / 9.0;
  p = p * z + 2.0 / 7.0;
  p = p * z + 2.0 / 5.0;
  p = p * z + 2.0 / 3.0;
  const double R = z * p;
  return ed * kLn2Hi - ((hfsq - (s * (hfsq + R) + ed * kLn2Lo)) - f);
#endif
}

// x / y from r0, an approximation of 1 / y within 1 ulp: one Newton step refines r, q = x r
// is then within an ulp of x / y, and the residual x - y q (exact in an FMA) corrects it
// (Markstein) -- IEEE's correctly rounded x / y wherever x >= 2^-100 and no intermediate
// leaves the normal range, except where y's significand is all ones and r0 is 1 ulp low
// (Markstein's exception: then within 1 ulp).  The kernels divide 0 <= x <= y by totals of
// weights y in [1, T + 2] (fwd_merge skips totals below the normal range, which only
// weightless terms make).  CUDA's own division is this sequence plus a range check (FCHK)
// that branches to an out-of-line slow path: about ten instructions a division, and the
// call's register shuffles, in the forward's innermost loops.
WKV_HD float div_from_rcp(float x, float y, float r0) {
  const float r = fmaf(fmaf(-y, r0, 1.0f), r0, r0);
  const float q = x * r;
  return fmaf(fmaf(-y, q, x), r, q);
}

// x / y for the kernels' divisions (a total of weights y in [1, T + 2], 0 <= x <= y; see
// div_from_rcp).  On a GPU from the hardware reciprocal (rcp.approx, within 1 ulp); on the
// host the compiler's division, which vectorises.
WKV_HD float wkv_div(float x, float y) {
#if defined(__CUDA_ARCH__)
  float r0;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r0) : "f"(y));
  return div_from_rcp(x, y, r0);
#elif defined(WKV_DEVICE_MATH_ON_HOST)  // rcp.approx.ftz: a subnormal y is flushed to 0
  const bool flushed = y != 0.0f && std::fabs(y) < FLT_MIN;
  return div_from_rcp(x, y, flushed ? std::copysign(INFINITY, y) : 1.0f / y);
#else
  return x / y;
#endif
}

WKV_HD double wkv_div(double x, double y) { return x / y; }

// The smallest normal number of F.
template <typename F> WKV_HD F min_normal() {
  return sizeof(F) > 4 ? static_cast<F>(DBL_MIN) : static_cast<F>(FLT_MIN);
}

// (a1 + n1 w) - (a2 + n2 w).  Equal a (also two equal infinities, e.g. two empty sums)
// contribute 0, so the difference of two weightless terms is finite, not NaN.
template <typename F> WKV_HD F rel(F a1, F n1, F a2, F n2, F w) {
  const F da = a1 == a2 ? F(0) : a1 - a2;
  return da + (n1 - n2) * w;
}

// Scales of an old sum (s_old) and a new one (s_new) whose references differ by d = new - old
// (log-weights).  The new reference replaces the old one (up) where it is larger by more
// than `margin`, else the new sum is scaled to the old reference, by e^d <= e^margin.
// margin = 0: the reference is the sum's largest term.  The transposed sums of the backward
// use kRescaleMargin (lazy rescaling): there the terms' log-weights drift upwards by a
// nearly constant step wherever one token dominates many rows (-m_t' varies slowly, the
// position part by w), so with margin 0 the reference moved at almost every step and the
// whole sum was rescaled by the same rounded factor each time; over one float32 scan of
// T = 32768 that rounding added up to ~1e-4 of gv (docs/wkv.md, "Accuracy").  With the
// margin a reference moves once per factor e of growth.  The reference stays one of the
// sum's terms, so the softmax weight emitted for it (bwd_emit's et) stays <= 1; the other
// terms weigh up to e relative to it after folds of single terms, up to e^2 to e^3 after
// merges of partial sums (carries, grouped carries).  With margin 0 the exponent, -d where
// up and d otherwise, is -|d|: on a GPU an operand modifier of the multiply by log2 e
// instead of a select (one instruction a merge; the same weight, bit for bit, but for a NaN's sign).
constexpr float kRescaleMargin = 1.0f;
template <typename F> WKV_HD void merge_scales(F d, F margin, F& s_old, F& s_new, bool& up) {
  up = d > margin;
  const F e = wkv_exp(margin == F(0) ? -std::fabs(d) : (up ? -d : d));
  s_old = up ? e : F(1);
  s_new = up ? F(1) : e;
}

// ------------------------------------------------------------------------------ forward
// Forward sum: reference (a, n), s0 = sum of relative weights, mean = weighted mean of v.
// An empty sum is (-inf, 0, 0, 0).
template <typename F> WKV_HD void fwd_empty(F& a, F& n, F& s0, F& mean) {
  a = neg_inf<F>();
  n = F(0);
  s0 = F(0);
  mean = F(0);
}

// Merge the sum (a2, n2, s2, mean2) into (a, n, s0, mean): exact log-sum-exp merge; the
// mean is a convex combination, so it cannot overflow.  It is written as
// (major - major * f) + minor * f with the minor part's fraction f <= 1/2: a negligible term
// leaves the mean bitwise unchanged (x1 / (x1 + x2) in rounded arithmetic would not, and
// would drift over thousands of folds), and no factor 1 - f is rounded: over a long scan f
// changes slowly, 1 - f rounds the same way fold after fold, and that rounding added up
// (2e-5 of y after 32768 folds at |w| T = 1, 6e-6 without it; docs/wkv.md, "Accuracy").  An
// infinite major mean stays infinite, as with the factor.
template <typename F>
WKV_HD void fwd_merge(F& a, F& n, F& s0, F& mean, F a2, F n2, F s2, F mean2, F w) {
  F so, sn;
  bool up;
  merge_scales(rel(a2, n2, a, n, w), F(0), so, sn, up);
  const F x1 = s0 * so, x2 = s2 * sn;
  const F tot = x1 + x2;
  const bool first = x1 >= x2;
  // a total below the normal range sums weightless terms only (e^{-d} of empty sums: 0 where
  // the exp flushes, as both kernels' float exps do, subnormal from an exp that keeps such
  // results): no fraction to take, and the device's reciprocal would flush it to 0
  const F f = tot >= min_normal<F>() ? wkv_div(first ? x2 : x1, tot) : F(0);
  const F major = first ? mean : mean2, minor = first ? mean2 : mean;
  const F keep = major - major * f;  // NaN only from an infinite major (inf - inf, inf * 0)
  mean = (keep == keep ? keep : major) + minor * f;
  s0 = tot;
  a = up ? a2 : a;
  n = up ? n2 : n;
}

// Fold term t into a left (n = t) or right (n = -t) forward sum.
template <typename F> WKV_HD void fwd_fold(F& a, F& n, F& s0, F& mean, F nt, F k, F v, F w) {
  fwd_merge(a, n, s0, mean, k, nt, F(1), v, w);
}

// Position part of a sum's n seen from position t: a left sum (dir = +1, terms i < t,
// n = i) is seen with -(t - 1), a right sum (dir = -1, terms i > t, n = -i) with t + 1.
template <typename F> WKV_HD F seen_from(F dir, F t) { return F(1) - dir * t; }

// First pass of a rescan, at position t in direction dir: store this side's sum (the
// terms already passed) as (mean, a + log s0, n) in y, m, r, then fold term t in
// (nt = dir * t).  Left to right this stores the left sums, right to left the right sums.
template <typename F>
WKV_HD void fwd_store_step(F& a, F& n, F& s0, F& mean, F nt, F k, F v, F w, F& out_y,
                           F& out_m, F& out_r) {
  out_y = mean;
  out_m = s0 > F(0) ? a + wkv_log(s0) : (s0 == F(0) ? neg_inf<F>() : s0);  // NaN stays NaN
  out_r = n;
  fwd_fold(a, n, s0, mean, nt, k, v, w);
}

// Second pass, at position t in direction dir (the opposite of the first pass): (a, n,
// s0, mean) is this side's sum; io_* hold the other side's stored sum on entry and
// (y_t, m_t, r_t) on exit.  The stored sum is (mean, a, n) = (io_y, io_m, io_r) with weight
// s0_s: the CPU's store pass folds its s0 into io_m (a + log s0) and passes s0_s = 1, the
// CUDA rescan keeps the sum whole in registers (no log).  The three parts seen from t --
// stored sum, this side's sum with weight s0, diagonal (u + k_t, 0) -- are scaled to the
// one with the largest maximum.
template <typename F>
WKV_HD void fwd_finish_step(F& a, F& n, F& s0, F& mean, F dir, F t, F k, F v, F w, F u, F s0_s,
                            F& io_y, F& io_m, F& io_r) {
  const F ad = u + k, ns = io_r + seen_from(-dir, t), nc = n + seen_from(dir, t);
  const F xs = rel(io_m, ns, ad, F(0), w);   // stored - diagonal
  const F xc = rel(a, nc, ad, F(0), w);      // this side - diagonal
  const F xsc = rel(io_m, ns, a, nc, w);     // stored - this side
  const bool ref_s = xs >= F(0) && xsc >= F(0);
  const bool ref_c = !ref_s && xc > F(0);
  const F e1 = wkv_exp(ref_s ? -xs : (ref_c ? -xc : xs));    // diagonal, or stored if ref d
  const F e2 = wkv_exp(ref_s ? -xsc : (ref_c ? xsc : xc));   // this side, or stored if ref c
  const F ws = (ref_s ? F(1) : (ref_c ? e2 : e1)) * s0_s;
  const F wd = ref_s || ref_c ? e1 : F(1);
  const F wc = (ref_c ? F(1) : e2) * s0;
  const F tot = ws + wc + wd;
  const F aref = ref_s ? io_m : (ref_c ? a : ad);
  const bool none = aref == neg_inf<F>() || !(tot > F(0));  // every weight is 0: 0/0
  // a total of 1 where there is no weight, so that the division and the log run on every row
  // and only their results are selected (with them feeding the selects alone, nvcc branched
  // around them: a basic block per step)
  const F tsafe = none ? F(1) : tot;
  const F inv = wkv_div(F(1), tsafe);
  const F yv = (ws * inv) * io_y + (wc * inv) * mean + (wd * inv) * v, lv = aref + wkv_log(tsafe);
  io_y = none ? quiet_nan<F>() : yv;
  io_m = none ? neg_inf<F>() : lv;
  io_r = ref_s ? ns : (ref_c ? nc : F(0));
  fwd_fold(a, n, s0, mean, dir * t, k, v, w);
}

// ----------------------------------------------------------------------------- backward
// Backward state of one direction: the transposed sum of this side's rows t' (reference
// (a, n) = (-m, dir t' - r) of its reference row, g0 = sum gy e, g1 = sum gy e (y - ty))
// whose y-channel is relative to ty, the y of its reference row: gk_j sums gy P (y_t' - v_j),
// which cancels where one token dominates many rows (y_t' ~ v_j); relative to ty the channel
// stays small exactly there.  Distance channels relative to the reference row (d0 = sum
// (n - n_t') gy e, d1 = sum (n - n_t') gy e (y - ty): integer distances, position
// independent) give gw column by column (bwd_emit).  Only the rows' y, m, r, gy enter the
// state; k_j, v_j enter where it is emitted.  Numerators are plain sums here (see
// docs/wkv.md for the range this implies).
template <typename F> struct BwdState {
  F a, n, g0, g1, ty, d0, d1;
};
constexpr int kFwdFields = 4;  // a forward sum in the summary / carry buffers: a, n, s0, mean
constexpr int kBwdFields = 7;  // a BwdState there, field by field (bwd_load / bwd_store)

template <typename F> WKV_HD void bwd_empty(BwdState<F>& s) {
  s.a = neg_inf<F>();
  s.n = s.g0 = s.g1 = s.ty = s.d0 = s.d1 = F(0);
}

// Merge `o` into `s`; both of one direction.  The merged reference keeps lazy rescaling
// (merge_scales with kRescaleMargin); each side's channels first move to it: distances grow by
// the exact integer n - n_side, y differences by ty_side - ty (plain expressions, not a helper
// updating by reference: with one, gcc 12 -O3 did not if-convert a lane loop of two folds, a
// reduced copy of the CPU kernel's phase 1, and left it scalar).
template <typename F> WKV_HD void bwd_merge(BwdState<F>& s, const BwdState<F>& o, F w) {
  F so, sn;
  bool up;
  merge_scales(rel(o.a, o.n, s.a, s.n, w), F(kRescaleMargin), so, sn, up);
  const F n = up ? o.n : s.n, ty = up ? o.ty : s.ty;
  const F ds = n - s.n, dn = n - o.n, es = s.ty - ty, eo = o.ty - ty;
  const F sg1 = s.g1 + es * s.g0, og1 = o.g1 + eo * o.g0;
  s.d1 = (s.d1 + es * s.d0 + ds * sg1) * so + (o.d1 + eo * o.d0 + dn * og1) * sn;
  s.d0 = (s.d0 + ds * s.g0) * so + (o.d0 + dn * o.g0) * sn;
  s.g1 = sg1 * so + og1 * sn;
  s.g0 = s.g0 * so + o.g0 * sn;
  s.a = up ? o.a : s.a;
  s.n = n;
  s.ty = ty;
}

// Fold row t into a state of direction dir (+1: left sums, scanned left to right; -1: right
// sums): its transposed term (-m_t, dir*t - r_t) with g0 = gy_t and reference ty = y_t
// (so g1 = d0 = d1 = 0).
template <typename F> WKV_HD void bwd_fold(BwdState<F>& s, F dir, F t, F y, F m, F r, F gy, F w) {
  const BwdState<F> o{-m, dir * t - r, gy, F(0), y, F(0), F(0)};
  bwd_merge(s, o, w);
}

// This side's contributions at column j = t (before folding row t): the transposed sums
// q0 = sum_t' gy P_t'j, q1 = sum_t' gy P_t'j (y_t' - v_j) over the side's rows t', and their
// part of gw, -sum_t' gy P_t'j (c_t'j + r_t') (v_j - y_t'), summed into gw_acc.  With
// x = n + seen_from(dir, t), row t' has c_t'j + r_t' = -(x - (n - n_t')): x for the reference
// row, whose P_t'j <= 1, and the exact integer distance channels for the others, so the float
// sums are free of cancellation between large distances (the row-wise shift by r_t of
// docs/wkv.md, "Backward").
template <typename F, typename A>
WKV_HD void bwd_emit(const BwdState<F>& s, F dir, F t, F k, F v, F w, A& gw_acc, F& q0, F& q1) {
  const F x = s.n + seen_from(dir, t);
  const F et = wkv_exp((k + s.a) + x * w);  // <= 1: a softmax weight
  const F dy = s.ty - v;
  q0 = et * s.g0;
  q1 = et * (s.g1 + dy * s.g0);
  gw_acc += static_cast<A>(et * ((s.d1 + dy * s.d0) - x * (s.g1 + dy * s.g0)));
}

// Final combination at position t (second backward pass): q0, q1 summed over both sides.
// Adds the diagonal's parts of gu and gw (its distance is 0, i.e. r_t after the shift).
template <typename F, typename A>
WKV_HD void bwd_finish(F u, F k, F v, F y, F m, F r, F gy, F q0, F q1, F w, A& gu_acc,
                       A& gw_acc, F& gv, F& gk) {
  const F pdg = wkv_exp((u + k - m) - r * w) * gy;  // gy_t * P_tt
  const F pd = pdg * (v - y);
  gv = q0 + pdg;
  gk = -(q1 - pd);  // sum_t gy_t P_tj (v_j - y_t), diagonal included
  gu_acc += static_cast<A>(pd);
  gw_acc -= static_cast<A>(pd * r);
}

// A forward sum in a buffer, field by field at stride fs (summaries, carries).
template <typename F>
WKV_HD void fwd_load(F& a, F& n, F& s0, F& mean, const F* p, int64_t fs) {
  a = p[0];
  n = p[fs];
  s0 = p[2 * fs];
  mean = p[3 * fs];
}

template <typename F> WKV_HD void fwd_store(F a, F n, F s0, F mean, F* p, int64_t fs) {
  p[0] = a;
  p[fs] = n;
  p[2 * fs] = s0;
  p[3 * fs] = mean;
}

template <typename F> WKV_HD void bwd_load(BwdState<F>& s, const F* p, int64_t fs) {
  s.a = p[0];
  s.n = p[fs];
  s.g0 = p[2 * fs];
  s.g1 = p[3 * fs];
  s.ty = p[4 * fs];
  s.d0 = p[5 * fs];
  s.d1 = p[6 * fs];
}

template <typename F> WKV_HD void bwd_store(const BwdState<F>& s, F* p, int64_t fs) {
  p[0] = s.a;
  p[fs] = s.n;
  p[2 * fs] = s.g0;
  p[3 * fs] = s.g1;
  p[4 * fs] = s.ty;
  p[5 * fs] = s.d0;
  p[6 * fs] = s.d1;
}

// A forward sum as one value, so that phase 2 handles forward sums and backward states alike.
template <typename F> struct FwdSum {
  F a, n, s0, mean;
};

template <typename F> WKV_HD void state_empty(FwdSum<F>& s) { fwd_empty(s.a, s.n, s.s0, s.mean); }
template <typename F> WKV_HD void state_empty(BwdState<F>& s) { bwd_empty(s); }
template <typename F> WKV_HD void state_load(FwdSum<F>& s, const F* p, int64_t fs) {
  fwd_load(s.a, s.n, s.s0, s.mean, p, fs);
}
template <typename F> WKV_HD void state_load(BwdState<F>& s, const F* p, int64_t fs) {
  bwd_load(s, p, fs);
}
template <typename F> WKV_HD void state_store(const FwdSum<F>& s, F* p, int64_t fs) {
  fwd_store(s.a, s.n, s.s0, s.mean, p, fs);
}
template <typename F> WKV_HD void state_store(const BwdState<F>& s, F* p, int64_t fs) {
  bwd_store(s, p, fs);
}
template <typename F> WKV_HD void state_merge(FwdSum<F>& s, const FwdSum<F>& o, F w) {
  fwd_merge(s.a, s.n, s.s0, s.mean, o.a, o.n, o.s0, o.mean, w);
}
template <typename F> WKV_HD void state_merge(BwdState<F>& s, const BwdState<F>& o, F w) {
  bwd_merge(s, o, w);
}

// ---------------------------------------------------------------------- phase 2 (carries)
// Summaries and carries live in (B, chunks, 2 directions, fields, C) buffers.  For one
// lane and direction (pointers at chunk 0, field 0; `cs` = stride between chunks, `fs` =
// between fields): carry[ch] = merge of the sums of the chunks before ch (dir 0, left
// sums) or after ch (dir 1), merged in chunk order.  The summaries are loaded in blocks of
// Ahead, one block ahead of the merges that use them (see "Loads ahead" below): on a GPU
// their global-memory latency overlaps a block of merges instead of adding to every step
// of this sequential loop.
//
// Chunks are visited in scan order i = 0 .. nch - 1 (chunk_at(i): left to right for dir 0,
// right to left for dir 1).  scan_carries covers the scan indices [i0, i1) from the state s
// (the merge of the summaries before i0): it stores s as each chunk's carry (unless `carry`
// is null) and then merges the chunk's summary, except the last chunk's in scan order,
// which nobody needs (phase 1 does not write it).  s ends as the merge up to i1 -- up to
// i1 - 1 when it stores carries, since the merge after the last store would serve nobody.
WKV_HD int64_t chunk_at(int64_t i, int64_t nch, int dir) { return dir == 0 ? i : nch - 1 - i; }

template <int Ahead, typename F, typename State>
WKV_HD void scan_carries(const F* summ, F* carry, int64_t i0, int64_t i1, int64_t nch, int64_t cs,
                         int64_t fs, int dir, F w, State& s) {
  const int64_t end = carry != nullptr ? i1 - 1 : i1;
  const int64_t merges = end < nch - 1 ? end : nch - 1;
  State cur[Ahead], next[Ahead];
  WKV_UNROLL for (int j = 0; j < Ahead; ++j) state_empty(next[j]);
  const auto load_block = [&](int64_t i) {
    WKV_UNROLL for (int j = 0; j < Ahead; ++j) {
      if (i + j < merges) state_load(next[j], summ + chunk_at(i + j, nch, dir) * cs, fs);
    }
  };
  load_block(i0);
  for (int64_t i = i0; i < i1; i += Ahead) {
    WKV_UNROLL for (int j = 0; j < Ahead; ++j) cur[j] = next[j];
    load_block(i + Ahead);
    WKV_UNROLL for (int j = 0; j < Ahead; ++j) {
      if (carry != nullptr && i + j < i1) state_store(s, carry + chunk_at(i + j, nch, dir) * cs, fs);
      if (i + j < merges) state_merge(s, cur[j], w);
    }
  }
}

template <typename F, bool Bwd> using StateOf = typename std::conditional<Bwd, BwdState<F>, FwdSum<F>>::type;

// Every carry of one lane and direction, in one sequential scan (the CUDA kernel below
// kGroupCarriesFrom chunks; the CPU kernel runs the same scan over a block of lanes,
// scan_block in wkv_cpu.cpp).
template <typename F, bool Bwd>
WKV_HD void carry_lane(const F* summ, F* carry, int64_t nch, int64_t cs, int64_t fs, int dir, F w) {
  StateOf<F, Bwd> s;
  state_empty(s);
  scan_carries<kAheadOf<F, Bwd>>(summ, carry, 0, nch, nch, cs, fs, dir, w, s);
}

// Grouped carries (both kernels; the CPU's over blocks of lanes).  One sequential scan over n
// chunks is n dependent merges, run by one thread per (batch, channel, direction) -- at GLSP's
// T = 32768 about 260 merges on a few SMs, while the rest of the device waits -- and each merge
// rounds the running mean by about an ulp (on the CPU, float32 y, gu, gk, gv up to 1.6e-5 off
// after the 8191 merges of T = 2^21 in chunks of 256; grouped, at most 7.8e-6: docs/wkv.md,
// "Longer still").  With many chunks both kernels scan in groups of G = ceil(sqrt(n))
// consecutive scan indices instead: (a) each group's summaries merged into a group summary, all
// groups in parallel; (b) each group's carry, the merge of
// the group summaries before it, and from it (c) the group's chunk carries, all groups in
// parallel, each thread merging up to 2 G - 1 summaries in a row: about 3 sqrt(n) dependent
// merges instead of n, for one more launch.  (b) repeats, in every group's thread, the scan
// over the group summaries before it that a launch of its own would do once for all groups:
// the same merges in the same order, so the same bits, without that launch's fixed cost (5-6 us
// of the ~320 us forward + backward at GLSP's largest call on an H200, 2026-12-04); the CPU kernel
// repeats it too (about n / 2 merges more per lane, no measurable time at its targets' shapes),
// so that both kernels merge alike.  Exact, in
// a fixed order (another order of the same merges than the sequential scan: equal up to
// rounding).  Group g's summary sits at index chunk_at(g, groups, dir) of a (B, groups, 2,
// fields, C) buffer, so that (b) scans the group summaries as scan_carries scans chunk
// summaries.
constexpr int64_t kGroupCarriesFrom = 96;  // chunks; below, two launches cost more than they save

// Group length for nch chunks: nch itself (one group: the sequential scan) below
// kGroupCarriesFrom.
inline int64_t carry_group(int64_t nch) {
  if (nch < kGroupCarriesFrom) return nch > 0 ? nch : 1;
  int64_t g = static_cast<int64_t>(std::sqrt(static_cast<double>(nch)));
  while (g * g < nch) ++g;
  return g;
}

// Number of groups for nch >= 1 chunks (1: the sequential scan).
inline int64_t carry_groups(int64_t nch) {
  const int64_t g = carry_group(nch);
  return (nch + g - 1) / g;
}

// (a): the merge of the summaries of group g (scan indices [g G, (g + 1) G)) into `out`.
template <typename F, bool Bwd>
WKV_HD void group_summary(const F* summ, int64_t g, int64_t G, int64_t nch, int64_t cs, int64_t fs,
                          int dir, F w, F* out) {
  StateOf<F, Bwd> s;
  state_empty(s);
  const int64_t i1 = (g + 1) * G < nch ? (g + 1) * G : nch;
  scan_carries<kAheadOf<F, Bwd>>(summ, static_cast<F*>(nullptr), g * G, i1, nch, cs, fs, dir, w, s);
  state_store(s, out, fs);
}

// (b) and (c): the carries of group g's chunks, from its group carry -- the merge of the
// summaries of groups [0, g) of gsum, the lane's `groups` group summaries at stride cs.
template <typename F, bool Bwd>
WKV_HD void group_carries(const F* summ, F* carry, const F* gsum, int64_t groups, int64_t g, int64_t G,
                          int64_t nch, int64_t cs, int64_t fs, int dir, F w) {
  StateOf<F, Bwd> s;
  state_empty(s);
  scan_carries<kAheadOf<F, Bwd>>(gsum, static_cast<F*>(nullptr), 0, g, groups, cs, fs, dir, w, s);
  const int64_t i1 = (g + 1) * G < nch ? (g + 1) * G : nch;
  scan_carries<kAheadOf<F, Bwd>>(summ, carry, g * G, i1, nch, cs, fs, dir, w, s);
}

// ------------------------------------------------------------------ one lane's passes
// One lane (batch b, channel c) of one chunk [t0, t0 + len) in the (B, T, C) layout:
// pointers at (b, t0, c), the chunk's positions addressed by their index i in it (32-bit:
// offset i * C, kept below 2^31 by the chunk length, cuda_chunk_limit); w, u of channel c.
// Backward-only members are null in the forward.  Saved: the type of the saved y, m, r --
// written by the forward (F), read by the backward (const F: BwdLane).
template <typename F, typename Saved = F> struct Lane {
  const F *k, *v;
  Saved *y, *m, *r;
  const F* gy;
  F *gk, *gv;
  int64_t t0;  // the chunk's first position
  int len;     // its positions
  int C;       // elements between positions
  F w, u;
  WKV_HD int offset(int i) const { return i * C; }
  WKV_HD F position(int i) const { return static_cast<F>(t0 + i); }  // t of index i, as F
};

// The position of the step j places after a block's first step, at tb (as F), in direction
// dir: one addition of a constant where converting the 64-bit t0 + i took three instructions
// (an add with carry and the conversion).  Exact, hence equal to Lane::position, where
// positions are exact (|t| < 2^24 in float32, 2^53 in float64).
template <typename F> WKV_HD F position_after(F tb, int dir, int j) { return tb + static_cast<F>(dir * j); }
template <typename F> using BwdLane = Lane<F, const F>;

// Loads ahead.  The CUDA kernel runs one thread per (batch, channel, chunk): a thread's
// only parallelism is across the steps of its pass, and each step depends on the previous
// one through the running sums.  The rows a step reads do not depend on those sums, so a
// pass loads them in blocks of kAheadOf positions, one block ahead of the steps that use
// them (RowBlocks): the loads of the next block are in flight while the current block is
// computed, and a step waits on the arithmetic of the previous one rather than on a
// global-memory round trip (the first GPU run, which loaded each row in its own step,
// took ~0.6-0.9 us per sequential step, docs/wkv.md).  Phase 3 loads its rows the same way,
// in blocks of kCheckpointRows (checkpointed_rescan).  Same operations in the same order: on
// the host the results do not depend on the depth (tested); nvcc may contract multiply-adds
// differently per depth.
//
// One position's inputs.
template <typename F> struct Row {
  F k, v, y, m, r, gy;
};

// A value the kernel never writes (a call's inputs): on a GPU through the read-only data
// cache.  y, m, r are inputs of the backward only: the forward writes them.
template <typename F> WKV_HD F load_input(const F* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// KV: also k, v (all but the backward's folds, which read only y, m, r, gy: bwd_fold).
template <typename F, bool Bwd, bool KV = true, typename S>
WKV_HD void load_row(Row<F>& row, const Lane<F, S>& l, int i) {
  const int o = l.offset(i);
  if (KV) {
    row.k = load_input(l.k + o);
    row.v = load_input(l.v + o);
  }
  if (Bwd) {
    row.y = load_input<F>(l.y + o);
    row.m = load_input<F>(l.m + o);
    row.r = load_input<F>(l.r + o);
    row.gy = load_input(l.gy + o);
  }
}

// The rows of one phase-1 pass over a lane's chunk in direction dir, in blocks of kAhead:
// advance(i) makes the block of steps i .. i + kAhead - 1 current (cur) and issues the
// loads of the next one (next).  Phase 1 folds: the backward's rows without k, v.
template <typename F, bool Bwd, typename S> struct RowBlocks {
  static constexpr int kAhead = kAheadOf<F, Bwd>;
  const Lane<F, S>& l;
  int first, dir;
  Row<F> cur[kAhead], next[kAhead];

  WKV_HD RowBlocks(const Lane<F, S>& lane, int d)
      : l(lane), first(d > 0 ? 0 : lane.len - 1), dir(d), cur{}, next{} {
    load(0);
  }
  WKV_HD int pos(int i) const { return first + dir * i; }  // index in the chunk of step i
  // Whole: the caller knows the block at i lies in the chunk (no guards)
  template <bool Whole = false> WKV_HD void load(int i) {
    WKV_UNROLL for (int j = 0; j < kAhead; ++j) {
      if (Whole || i + j < l.len) load_row<F, Bwd, !Bwd>(next[j], l, pos(i + j));
    }
  }
  template <bool NextWhole> WKV_HD void advance(int i) {
    WKV_UNROLL for (int j = 0; j < kAhead; ++j) cur[j] = next[j];
    load<NextWhole>(i + kAhead);
  }
};

// body(j) for the steps i + j < len of the block at i, unrolled.  Full: the caller knows the
// whole block lies in the chunk (i + Ahead <= len), and the steps run unguarded: a guard is
// uniform across a warp, whose threads share a chunk, but nvcc still compiles each guarded
// step as a branch of its own with its reconvergence (BSSY / BSYNC), which also keeps it from
// scheduling one step's instructions among the next one's.  Only a chunk's last block can be
// partial, so the guarded copy runs at most once per pass.
template <int Ahead, bool Full, typename Body> WKV_HD void block_steps(int i, int len, Body&& body) {
  WKV_UNROLL for (int j = 0; j < Ahead; ++j) {
    if (Full || i + j < len) body(j);
  }
}

// Calls step(i, t, j, row) for the positions of a lane's chunk in direction dir: i the index
// in the chunk, t its position (as F), j the step's place in its block of kAheadOf<F, Bwd> (a
// constant once unrolled).
template <typename F, bool Bwd, typename S, typename Step>
WKV_HD void pipelined_steps(const Lane<F, S>& l, int dir, Step&& step) {
  RowBlocks<F, Bwd, S> rows(l, dir);
  constexpr int kAhead = RowBlocks<F, Bwd, S>::kAhead;
  // Full: the block at i is whole; NextWhole: so is the one after it (its loads unguarded)
  const auto run_block = [&](int i, auto full, auto next_whole) {
    rows.template advance<decltype(next_whole)::value>(i);
    const F tb = l.position(rows.pos(i));
    block_steps<kAhead, decltype(full)::value>(i, l.len, [&](int j) {
      step(rows.pos(i + j), position_after(tb, dir, j), j, rows.cur[j]);
    });
  };
  int i = 0;
  for (; i + 2 * kAhead <= l.len; i += kAhead) run_block(i, std::true_type{}, std::true_type{});
  if (i + kAhead <= l.len) {  // the last whole block
    run_block(i, std::true_type{}, std::false_type{});
    i += kAhead;
  }
  if (i < l.len) run_block(i, std::false_type{}, std::false_type{});  // a partial last block
}

// One (batch, channel, chunk) task of phase 1 and of phase 3, as a CUDA thread runs it.
// `st` points at this task's (direction 0, field 0) entry of the (B, chunks, 2, fields, C)
// summary or carry buffer; ds: the stride to direction 1 (fields * C), fs: between fields
// (C).  Phase 1 skips the sums nobody uses: the first chunk's right sum, and the last
// chunk's left sum unless the chunk is long enough for checkpoints.
// A chunk that needs both folds them in one pass, left to right: each row is read once and
// the two chains of folds are independent, so each hides the other's latency (a sum does not
// depend on the order its terms are folded in, up to rounding).
template <typename F>
WKV_HD void state_fold(FwdSum<F>& s, F dir, F t, const Row<F>& row, F w) {
  fwd_fold(s.a, s.n, s.s0, s.mean, dir * t, row.k, row.v, w);
}
template <typename F>
WKV_HD void state_fold(BwdState<F>& s, F dir, F t, const Row<F>& row, F w) {
  bwd_fold(s, dir, t, row.y, row.m, row.r, row.gy, w);
}

// Checkpoints.  The CUDA kernel rescans a chunk in one pass, right to left, in blocks of
// kCheckpointRows positions aligned at the chunk's start; each block needs the left state
// at its first position, which phase 1 (folding the left state anyway) stores as a
// checkpoint: the chunk's own terms before the block, merged with the carried-in left
// state in phase 3.  The block's stored side -- the left sums of the forward, the left
// transposed sums q0, q1 of the backward -- is then re-derived in registers (store steps
// from the checkpoint) and combined with the right state position by position, right to
// left.  Instead of writing the stored side to the output buffers and reading it back
// (forward: y, m, r; backward: gv, gk) and reading the inputs a third time, phase 3 reads
// each input once, plus the checkpoints.  Passes over a (B, T, C) tensor: the forward
// reads k, v twice, writes y, m, r once and moves its checkpoints (4 fields every 8 rows)
// once each way: 2 + 3 + 2 + 2 * 0.5 = 8 (15 with a store pass; the minimal 5); the
// backward reads y, m, r, gy in phase 1 and all six inputs in phase 3, writes gk, gv and moves
// 7 fields every 4 rows each way: 4 + 6 + 2 + 2 * 7 / 4 = 15.5 (22 with a store pass; the
// minimal 8).  The sequential steps per chunk stay about 3 L: phase 3's store and finish
// steps are two dependent chains per block; what the checkpoints save is memory traffic.  A fixed spacing, not the depth of
// the loads ahead, so the results do not depend on that depth; chosen so that a block's
// rows, the next block's and the re-derived values stay in registers (docs/wkv.md, "CUDA registers").  WKV_CHECKPOINT_ROWS overrides it for
// both directions: the tests move the block boundaries with it.
#ifdef WKV_CHECKPOINT_ROWS
template <bool Bwd> constexpr int kCheckpointRows = WKV_CHECKPOINT_ROWS;
#else
template <bool Bwd> constexpr int kCheckpointRows = Bwd ? 4 : 8;
#endif

// Checkpoints of one chunk of length len: one per block but the first (whose left state is
// the carry itself).
template <bool Bwd> WKV_HD int64_t checkpoints_per_chunk(int64_t len) {
  return (len + kCheckpointRows<Bwd> - 1) / kCheckpointRows<Bwd> - 1;
}

// One lane's checkpoints in the (B, chunks, checkpoints, fields, C) buffer: p at this
// chunk's first (field 0), `stride` between checkpoints (fields * C); fields at the
// stride of the summaries.
template <typename F> struct Checkpoints {
  F* p;
  int64_t stride;
};

// Whether step i of a left-to-right pass, the j-th of its block of Ahead steps, starts a
// checkpoint block (every Every positions from the chunk's start, the first excepted).
// Where one block size divides the other (the defaults: equal), j alone decides for most
// steps -- a constant once unrolled -- and the other steps carry no store at all.
template <int Ahead, int Every> WKV_HD bool checkpoint_at(int i, int j) {
  if (Ahead % Every == 0) return i > 0 && j % Every == 0;
  if (Every % Ahead == 0 && j != 0) return false;
  return i > 0 && i % Every == 0;
}

// Phase 1 of the forward (Bwd = false: FwdSum states) or the backward (true: BwdState):
// the chunk's summaries and checkpoints.
template <bool Bwd, typename F, typename S>
WKV_HD void lane_summary(const Lane<F, S>& l, int64_t ch, int64_t nch, F* st, int64_t ds,
                         int64_t fs, Checkpoints<F> ck) {
  using State = StateOf<F, Bwd>;
  constexpr int kEvery = kCheckpointRows<Bwd>;
  const bool checkpoints = l.len > kEvery;
  const bool left = ch + 1 < nch || checkpoints, right = ch > 0;
  State sl, sr;
  state_empty(sl);
  state_empty(sr);
  const auto fold_left = [&](int i, F t, int j, const Row<F>& row) {
    if (checkpoint_at<kAheadOf<F, Bwd>, kEvery>(i, j)) {  // the chunk's terms before i
      state_store(sl, ck.p, fs);
      ck.p += ck.stride;
    }
    state_fold(sl, F(1), t, row, l.w);
  };
  if (left && right) {
    pipelined_steps<F, Bwd>(l, 1, [&](int i, F t, int j, const Row<F>& row) {
      fold_left(i, t, j, row);
      state_fold(sr, F(-1), t, row, l.w);
    });
  } else if (left) {
    pipelined_steps<F, Bwd>(l, 1, fold_left);
  } else if (right) {
    pipelined_steps<F, Bwd>(l, -1, [&](int, F t, int, const Row<F>& row) {
      state_fold(sr, F(-1), t, row, l.w);
    });
  }
  if (ch + 1 < nch) state_store(sl, st, fs);
  if (right) state_store(sr, st + ds, fs);
}

// Phase 3 over the lane's chunk (see "Checkpoints"), in blocks of K positions from the right: a
// block's rows and its checkpoint are loaded a block ahead, as in the other passes.  For each
// block, `left` = the carried-in left state (at `carry`) merged with the block's checkpoint;
// store(left, t, row, side) at each position (t: its position as F), left to right, keeps
// that position's stored side in registers and folds it into `left`; finish(right, i, row,
// side) at each position (i: its index in the chunk), right to left, combines it with the
// right state (from `carry + ds`), writes the outputs and folds it into `right`.  The
// source reads the carried-in left state again for each block (nvcc 13 for sm_90 keeps it in
// registers instead, without spilling: tests/test_wkv_build.py fails on any spill) and
// issues the next block's loads after the block's first finish step, when `left` and that
// row are done with: held through the whole block, the backward's rows, states and stored
// side would not fit in its registers (spills).
template <typename Side, bool Bwd, typename F, typename S, typename Store, typename Finish>
WKV_HD void checkpointed_rescan(const Lane<F, S>& l, const F* carry, int64_t ds, int64_t fs,
                                const F* checkpoints, int64_t ck_stride, Store&& store,
                                Finish&& finish) {
  using State = StateOf<F, Bwd>;
  constexpr int K = kCheckpointRows<Bwd>;
  State right, left, ck;  // ck: the checkpoint of the next block, loaded with its rows
  state_load(right, carry + ds, fs);
  state_empty(ck);
  Row<F> cur[K], next[K];
  // float64 keeps every block guarded, and so needs no separate partial block (a second, guarded
  // copy of the block's steps: 1.9x the rescans' code, 12 more registers in the forward's):
  // unguarded, nvcc 13 schedules the backward's double state beyond sm_90's registers (a 68-byte
  // spill, which tests/test_wkv_build.py refuses)
  using Unguarded = std::integral_constant<bool, sizeof(F) <= 4>;
  // The block before another is whole, so its loads need no guards either; the float32 forward
  // drops them (12 instructions per position fewer), the backward keeps them (without, a 16-byte
  // spill at the 128 registers its occupancy needs)
  using WholeLoads = std::integral_constant<bool, !Bwd && Unguarded::value>;
  const auto load_block = [&](int bi, auto full) {
    const int ib = bi * K;
    WKV_UNROLL for (int j = 0; j < K; ++j) {
      if (decltype(full)::value || ib + j < l.len) load_row<F, Bwd>(next[j], l, ib + j);
    }
    if (bi > 0) state_load(ck, checkpoints + (bi - 1) * ck_stride, fs);
  };
  // block bi; Full: all its K positions lie in the chunk (every block but a partial last one),
  // so its steps run unguarded (see block_steps)
  const auto run_block = [&](int bi, auto full) {
    constexpr bool kFull = decltype(full)::value;
    WKV_UNROLL for (int j = 0; j < K; ++j) cur[j] = next[j];
    state_load(left, carry, fs);
    if (bi > 0) state_merge(left, ck, l.w);
    const int ib = bi * K;
    Side side[K];
    WKV_UNROLL for (int j = 0; j < K; ++j) {
      if (kFull || ib + j < l.len) store(left, l.position(ib + j), cur[j], side[j]);
    }
    WKV_UNROLL for (int i = 0; i < K; ++i) {
      const int j = K - 1 - i;
      if (kFull || ib + j < l.len) finish(right, ib + j, cur[j], side[j]);
      if (i == 0 && bi > 0) load_block(bi - 1, WholeLoads{});
    }
  };
  const int blocks = (l.len + K - 1) / K;
  load_block(blocks - 1, std::false_type{});
  int bi = blocks - 1;
  if (Unguarded::value && l.len % K != 0) run_block(bi--, std::false_type{});  // partial last block
  for (; bi >= 0; --bi) run_block(bi, Unguarded{});
}

// ck: this chunk's checkpoints (see Checkpoints), stored for the rescan.
template <typename F>
WKV_HD void lane_fwd_summary(const Lane<F>& l, int64_t ch, int64_t nch, F* st, int64_t ds,
                             int64_t fs, Checkpoints<F> ck) {
  lane_summary<false>(l, ch, nch, st, ds, fs, ck);
}

// Phase 3 of the forward over the lane's chunk: `carry` as in phase 1, `ck` this chunk's
// first checkpoint (checkpoints at ck_stride).  A position's stored side is its left sum, whole.
template <typename F>
WKV_HD void lane_fwd_rescan(const Lane<F>& l, const F* carry, int64_t ds, int64_t fs, const F* ck,
                            int64_t ck_stride) {
  checkpointed_rescan<FwdSum<F>, false>(
      l, carry, ds, fs, ck, ck_stride,
      [&](FwdSum<F>& left, F t, const Row<F>& row, FwdSum<F>& side) {
        side = left;
        fwd_fold(left.a, left.n, left.s0, left.mean, t, row.k, row.v, l.w);
      },
      [&](FwdSum<F>& right, int i, const Row<F>& row, FwdSum<F>& side) {
        const int o = l.offset(i);
        F y = side.mean, m = side.a, r = side.n;
        fwd_finish_step(right.a, right.n, right.s0, right.mean, F(-1), l.position(i), row.k,
                        row.v, l.w, l.u, side.s0, y, m, r);
        l.y[o] = y;
        l.m[o] = m;
        l.r[o] = r;
      });
}

template <typename F>
WKV_HD void lane_bwd_summary(const BwdLane<F>& l, int64_t ch, int64_t nch, F* st, int64_t ds,
                             int64_t fs, Checkpoints<F> ck) {
  lane_summary<true>(l, ch, nch, st, ds, fs, ck);
}

// The backward's stored side at a position: the left transposed sums q0, q1 (bwd_emit).
template <typename F> struct BwdSide {
  F q0, q1;
};

// Phase 3 of the backward, as lane_fwd_rescan; the left state's part of gw is summed in the
// store steps.  gw, gu: this task's partial sums (set, not accumulated).
template <typename F>
WKV_HD void lane_bwd_rescan(const BwdLane<F>& l, const F* carry, int64_t ds, int64_t fs,
                            const F* ck, int64_t ck_stride, double& gw, double& gu) {
  double sw = 0.0, su = 0.0;
  checkpointed_rescan<BwdSide<F>, true>(
      l, carry, ds, fs, ck, ck_stride,
      [&](BwdState<F>& left, F t, const Row<F>& c, BwdSide<F>& side) {
        bwd_emit(left, F(1), t, c.k, c.v, l.w, sw, side.q0, side.q1);
        bwd_fold(left, F(1), t, c.y, c.m, c.r, c.gy, l.w);
      },
      [&](BwdState<F>& right, int i, const Row<F>& c, BwdSide<F>& side) {
        const int o = l.offset(i);
        const F tf = l.position(i);
        F p0, p1, g_v, g_k;
        bwd_emit(right, F(-1), tf, c.k, c.v, l.w, sw, p0, p1);
        bwd_finish(l.u, c.k, c.v, c.y, c.m, c.r, c.gy, side.q0 + p0, side.q1 + p1, l.w, su, sw,
                   g_v, g_k);
        l.gv[o] = g_v;
        l.gk[o] = g_k;
        bwd_fold(right, F(-1), tf, c.y, c.m, c.r, c.gy, l.w);
      });
  gw = sw;
  gu = su;
}

// ------------------------------------------------------------------------ chunk length
// Automatic chunk length.  CPU: split the sequence only when the (batch, channel block)
// tasks cannot occupy every thread.  CUDA: enough (batch, channel, chunk) threads to
// fill the device (`slots` resident threads), but no more than ~sqrt(3T) chunks, which
// balances a sequential phase 2 (one step per chunk) against phases 1 and 3 (three
// steps per element of a chunk).  With the grouped carries (from kGroupCarriesFrom chunks
// on) phase 2 takes ~3 sqrt(n) steps, so where the cap binds (few lanes) more chunks may
// pay; where the slots bind (GLSP's largest call, B = 2, T = 32768, C = 128) the rule's 125
// measured best against forced 32 ... 2048 on an H200 (docs/wkv.md, 2026-12-04).
//
// Both choices are then capped for accuracy at kFloatChunkMax in float32 (capped_chunk: as few
// chunks as the cap allows, of even length).  A rescan folds its chunk's terms one by one into
// one running sum, whose rounding adds up over the chunk: terms below half an ulp of the total
// are lost whole (with k ~ N(0, 2^2) most terms weigh e^-8 of the largest or less), and the
// forward's running mean drifts by about an ulp a step.  One float32
// chunk of 131072 (two halves of T = 262144, B = 1, C = 8) put y off by 1.1e-4 of its largest
// value and gw by 3e-4 (the target is 1e-5).  Chunks summed on their own and merged (a two-level
// sum) bound the error by the chunk length rather than T.  gw is the most sensitive: where w T is
// small (long memory) it is a covariance of distance and v over thousands of terms, and the
// forward's y error enters it ~sqrt(terms) times amplified (a float64 backward on the float32
// forward's y, m, r is as far off).  Worst gw over 192 draws at T = 32768, C = 64 (bench_wkv.py
// --chunk-sweep, docs/wkv.md "The float32 cap"): 3.9e-6 with chunks of 128, 5.9e-6 with 256,
// 6.7e-6 with 512, 1.3e-5 with 1024 (which the cap was until 2026-12-05).  256 cost the CPU
// ~5 % of fwd+bwd time at B = 2, T = 32768, C = 64 against 1024 (bench_wkv.py --targets);
// GLSP's CUDA calls use shorter chunks anyway.  float64 needs no cap.  CUDA_WKV_CHUNK overrides the
// cap too (the tests force one long chunk).
constexpr int64_t kFloatChunkMax = 256;

// len for elements of `itemsize` bytes, or where it exceeds the float32 cap the even length of
// ceil(T / cap) chunks (T = 257: two of 129, not 256 + 1).
inline int64_t capped_chunk(int64_t T, int64_t len, int64_t itemsize) {
  const int64_t cap = itemsize > 4 ? INT64_MAX : kFloatChunkMax;
  if (len <= cap) return len;
  const int64_t nch = (T + cap - 1) / cap;
  return (T + nch - 1) / nch;
}

inline int64_t cpu_auto_chunk(int64_t B, int64_t T, int64_t C, int64_t block, int64_t threads,
                              int64_t itemsize) {
  const int64_t tasks = B * ((C + block - 1) / block);
  int64_t len = T > 0 ? T : 1;
  if (tasks < threads && T >= 2048) {
    const int64_t nch = (threads + tasks - 1) / tasks;
    len = (T + nch - 1) / nch;
  }
  return capped_chunk(T, len, itemsize);
}

// The longest CUDA chunk for C channels: a chunk's rows are addressed by 32-bit offsets
// (Lane), so len * C stays below 2^31, less a margin for the block loops, whose indices run
// up to two blocks (of at most 32 rows) past the chunk's end (a chunk of over 2^31 elements
// per lane slab: longer chunks, automatic or forced, are shortened to this).
constexpr int64_t kIndexMargin = 64;
static_assert(kCheckpointRows<false> <= 32 && kCheckpointRows<true> <= 32 && WKV_ROWS_AHEAD <= 32,
              "block loops may run kIndexMargin / 2 rows past a chunk's end");
static_assert(kCheckpointRows<false> >= 1 && kCheckpointRows<true> >= 1 && WKV_ROWS_AHEAD >= 1,
              "WKV_CHECKPOINT_ROWS and WKV_ROWS_AHEAD must be at least 1 (0 divides by zero in "
              "checkpoints_per_chunk, and sum_rows_kernel's loop would not advance)");
inline int64_t cuda_chunk_limit(int64_t C) {
  const int64_t limit = (INT32_MAX - kIndexMargin) / (C > 0 ? C : 1);
  return limit > 0 ? limit : 1;
}

// CUDA_WKV_CHUNK's length (forced > 0) for T positions: at most T (one chunk).
inline int64_t forced_chunk_len(int64_t T, int64_t forced) {
  return forced < (T > 1 ? T : 1) ? forced : (T > 1 ? T : 1);
}

// CUDA_WKV_CHUNK's length as the CUDA kernel takes it: also at most its 32-bit row offsets' limit.
inline int64_t cuda_forced_chunk(int64_t T, int64_t C, int64_t forced) {
  const int64_t len = forced_chunk_len(T, forced);
  return len < cuda_chunk_limit(C) ? len : cuda_chunk_limit(C);
}

inline int64_t cuda_auto_chunk(int64_t B, int64_t T, int64_t C, int64_t slots, int64_t itemsize) {
  const int64_t lanes = B * ((C + 31) / 32) * 32;
  int64_t nch = (slots + lanes - 1) / lanes;
  const int64_t cap = static_cast<int64_t>(std::sqrt(3.0 * static_cast<double>(T))) + 1;
  nch = nch < cap ? nch : cap;
  nch = nch < 1 ? 1 : nch;
  const int64_t len = (T + nch - 1) / nch;
  const int64_t chosen = capped_chunk(T, len < 32 ? (T < 32 ? (T > 0 ? T : 1) : 32) : len, itemsize);
  return chosen < cuda_chunk_limit(C) ? chosen : cuda_chunk_limit(C);
}

// CUDA_WKV_CHUNK: a positive integer forces the chunk length.  Returns 0 when unset;
// sets *bad to the offending text for an invalid value.
inline int64_t chunk_from_env(const char** bad) {
  *bad = nullptr;
  const char* s = std::getenv("CUDA_WKV_CHUNK");
  if (s == nullptr || *s == '\0') return 0;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  while (end != nullptr && (*end == ' ' || *end == '\t')) ++end;
  if (end == s || *end != '\0' || v < 1) {
    *bad = s;
    return 0;
  }
  return static_cast<int64_t>(v);
}

}  // namespace wkv

// C++ CPU kernel for the exact bidirectional WKV: the chunked three-phase scan of
// wkv_recurrence.h.
//
// Layout (B, T, C) is channel-contiguous, so the inner loops run over a block of NB
// contiguous channels (independent lanes) and vectorise; the sequential scans run over
// t.  Phases 1 and 3 are spread over (batch, channel block, chunk) tasks with
// at::parallel_for; phase 2 over (batch, channel block, group of chunks).  With exactly
// two chunks the halves need no phase 1 or 2 (see "Two halves" below).  The partition
// depends only on the shape and the chunk length, and every lane sums in a fixed order:
// for a given chunk length the results are bitwise independent of the thread count.
// The automatic chunk length is at most 256 in float32 (for accuracy, wkv_recurrence.h) and
// splits the sequence further only when there are fewer (batch, channel block) tasks than
// threads; CUDA_WKV_CHUNK forces it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "wkv_checks.h"
#include "wkv_recurrence.h"

namespace {

constexpr int kBlock = 16;  // channels per task (2 AVX2 / 1 AVX-512 float vector)
using wkv::kBwdFields;
using wkv::kFwdFields;

#if defined(__GNUC__) && !defined(__clang__)
#define WKV_SIMD _Pragma("GCC ivdep")
#else
#define WKV_SIMD _Pragma("omp simd")
#endif

// A pass kept out of its caller.  Inlined into the parallel task loop, gcc 12 (-O3
// -march=native) did not if-convert the backward's phase-1 lane loop ("control flow in loop",
// -fopt-info-vec-missed) and ran it scalar: a float32 backward 2.3x slower at B=2, T=32768,
// C=64 (docs/wkv.md, "Benchmark (CPU)").  One call per (task, chunk): no measurable cost.
#if defined(__GNUC__)
#define WKV_NOINLINE __attribute__((noinline))
#else
#define WKV_NOINLINE
#endif

// Software prefetch.  A task walks its block of kBlock channels along t at a stride of C
// elements, touching one 64-byte line per tensor and step (two in float64): the hardware
// prefetchers follow that poorly (a 4 KiB page holds few steps), and a forward step cost
// 3x more at T = 32768 than at T = 1024 where the data stay in cache (B=2, C=64, 1 thread).
// Each time loop therefore asks for the rows it will read kAhead steps later.
constexpr int64_t kAhead = 32;

template <typename F>
inline void prefetch_line(const F* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p);
  if (sizeof(F) * kBlock > 64) __builtin_prefetch(p + 64 / sizeof(F));
#else
  (void)p;
#endif
}

// Prefetches element offset o of every row pointer (a block's first channel).
template <typename F, typename... Rows>
inline void prefetch_rows(int64_t o, const F* first, const Rows*... rest) {
  prefetch_line(first + o);
  (prefetch_line(rest + o), ...);
}

// The chunking of one call: nch chunks of length len (the last one may be shorter).
struct Plan {
  int64_t B, T, C, nblk, len, nch;
  int64_t chunk_begin(int64_t ch) const { return ch * len; }
  int64_t chunk_end(int64_t ch) const { return std::min(T, (ch + 1) * len); }
};

Plan make_plan(const at::Tensor& k) {
  Plan p;
  p.B = k.size(0);
  p.T = k.size(1);
  p.C = k.size(2);
  p.nblk = (p.C + kBlock - 1) / kBlock;
  const int64_t forced = wkv::forced_chunk("wkv_cpu");
  p.len = forced > 0 ? wkv::forced_chunk_len(p.T, forced)
                     : wkv::cpu_auto_chunk(p.B, p.T, p.C, kBlock, at::get_num_threads(),
                                             k.element_size());
  p.nch = (p.T + p.len - 1) / p.len;
  return p;
}

// Runs fn(b, c0, n, ch) for every (batch, channel block, chunk) task in parallel.
template <typename Fn> void for_tasks(const Plan& p, Fn&& fn) {
  at::parallel_for(0, p.B * p.nblk * p.nch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ch = task % p.nch, rest = task / p.nch;
      const int64_t b = rest / p.nblk, c0 = (rest % p.nblk) * kBlock;
      fn(b, c0, static_cast<int>(std::min<int64_t>(kBlock, p.C - c0)), ch);
    }
  });
}

// Calls body.template operator()<NB>() with NB = kBlock for full blocks (compile-time
// width, fully vectorised) and NB = 0 (runtime width) for the last partial block.
#define WKV_BLOCK_DISPATCH(n, ...)    \
  do {                                \
    if ((n) == kBlock) {              \
      constexpr int NB = kBlock;      \
      __VA_ARGS__                     \
    } else {                          \
      constexpr int NB = 0;           \
      __VA_ARGS__                     \
    }                                 \
  } while (0)

// ------------------------------------------------------------------------------ forward
// Forward sums of a channel block, structure of arrays.
template <typename F> struct FwdLanes {
  static constexpr int kFields = kFwdFields;
  F a[kBlock], n[kBlock], s0[kBlock], mean[kBlock];
  void empty(int cnt) {
    for (int j = 0; j < cnt; ++j) wkv::fwd_empty(a[j], n[j], s0[j], mean[j]);
  }
  // field f of lane j at p[f * stride + j]
  void load(const F* p, int64_t stride, int cnt) {
    for (int j = 0; j < cnt; ++j) {
      a[j] = p[j];
      n[j] = p[stride + j];
      s0[j] = p[2 * stride + j];
      mean[j] = p[3 * stride + j];
    }
  }
  void store(F* p, int64_t stride, int cnt) const {
    for (int j = 0; j < cnt; ++j) {
      p[j] = a[j];
      p[stride + j] = n[j];
      p[2 * stride + j] = s0[j];
      p[3 * stride + j] = mean[j];
    }
  }
  // merge o's sums into these, lane j with its w[j] (phase 2)
  void merge(const FwdLanes& o, const F* w, int cnt) {
    WKV_SIMD
    for (int j = 0; j < cnt; ++j) {
      wkv::fwd_merge(a[j], n[j], s0[j], mean[j], o.a[j], o.n[j], o.s0[j], o.mean[j], w[j]);
    }
  }
};

// Offset of (b, chunk, dir, field 0, channel c) in a (B, nch, 2, fields, C) buffer.
inline int64_t state_off(const Plan& p, int fields, int64_t b, int64_t ch, int dir,
                         int64_t c) {
  return (((b * p.nch + ch) * 2 + dir) * fields) * p.C + c;
}

// What a pass over one chunk does at each position.
enum class Pass {
  kFold,      // phase 1: fold only (the chunk's summary of one direction)
  kFoldBoth,  // phase 1: both directions' summaries in one pass, left to right (see block_phases)
  kStore,     // first pass of a rescan: store this side's sums, fold
  kFinish,    // second pass: combine with the stored side, write the results, fold
};

// Position of step i of a pass over [t0, t1) in direction dir (+1: left to right).
inline int64_t step_at(int dir, int64_t t0, int64_t t1, int64_t i) {
  return dir > 0 ? t0 + i : t1 - 1 - i;
}

// A pass's lanes start from the states at `from` (field by field at `stride`), or empty.
template <typename F, typename Lanes>
void start_lanes(Lanes& s, const F* from, int64_t stride, int n) {
  if (from != nullptr) {
    s.load(from, stride, n);
  } else {
    s.empty(n);
  }
}

// Tags selecting a pass kind in the drivers' generic lambdas.
constexpr std::integral_constant<Pass, Pass::kFold> kFold{};
constexpr std::integral_constant<Pass, Pass::kFoldBoth> kFoldBoth{};
constexpr std::integral_constant<Pass, Pass::kStore> kStore{};
constexpr std::integral_constant<Pass, Pass::kFinish> kFinish{};

// Two halves.  With exactly two chunks (one lane split once: few lanes and more threads
// than (batch, channel block) tasks, or a float32 sequence of 1025 to 2048 positions) phase 1
// would add a fold pass over the whole sequence.  Instead the first pass of each half runs from the outer end inwards --
// chunk 0 left to right, chunk 1 right to left -- and ends with exactly the sum the other
// half needs as its carry; then each half finishes in the opposite direction.  Two
// passes per element as with one chunk, each thread doing half of each: no extra work.
inline int half_dir(int64_t ch) { return ch == 0 ? 1 : -1; }

// One forward pass over [t0, t1) of a block in direction dir, starting from the sums at
// `from` (nullptr: empty); the final sums go to `to` unless it is nullptr.  States are
// laid out field by field at `stride` (the (.., fields, C) buffers).  kFoldBoth (dir = 1,
// from = nullptr) also folds the right sum and stores it at direction 1 of `to`.
template <typename F, int NB, Pass P>
void fwd_pass(const F* k, const F* v, const F* wp, const F* up, F* y, F* m, F* r, int dir,
              int64_t t0, int64_t t1, int64_t C, int n_rt, const F* from, F* to,
              int64_t stride) {
  const int n = NB > 0 ? NB : n_rt;
  F w[kBlock], u[kBlock];
  for (int j = 0; j < n; ++j) {
    w[j] = wp[j];
    u[j] = P == Pass::kFinish ? up[j] : F(0);
  }
  FwdLanes<F> s, right;  // right: kFoldBoth's right sums
  start_lanes(s, from, stride, n);
  if constexpr (P == Pass::kFoldBoth) right.empty(n);
  const F fdir = static_cast<F>(dir);
  for (int64_t i = 0; i < t1 - t0; ++i) {
    const int64_t t = step_at(dir, t0, t1, i);
    if (i + kAhead < t1 - t0) {
      const int64_t ahead = (t + dir * kAhead) * C;
      if (P == Pass::kFold || P == Pass::kFoldBoth) {
        prefetch_rows(ahead, k, v);
      } else {
        prefetch_rows<F>(ahead, k, v, y, m, r);
      }
    }
    const int64_t o = t * C;
    const F tf = static_cast<F>(t), nt = fdir * tf;
    WKV_SIMD
    for (int j = 0; j < n; ++j) {
      if constexpr (P == Pass::kFold) {
        wkv::fwd_fold(s.a[j], s.n[j], s.s0[j], s.mean[j], nt, k[o + j], v[o + j], w[j]);
      } else if constexpr (P == Pass::kFoldBoth) {
        wkv::fwd_fold(s.a[j], s.n[j], s.s0[j], s.mean[j], nt, k[o + j], v[o + j], w[j]);
        wkv::fwd_fold(right.a[j], right.n[j], right.s0[j], right.mean[j], -tf, k[o + j], v[o + j],
                      w[j]);
      } else if constexpr (P == Pass::kStore) {
        wkv::fwd_store_step(s.a[j], s.n[j], s.s0[j], s.mean[j], nt, k[o + j], v[o + j], w[j],
                            y[o + j], m[o + j], r[o + j]);
      } else {
        wkv::fwd_finish_step(s.a[j], s.n[j], s.s0[j], s.mean[j], fdir, tf, k[o + j],
                             v[o + j], w[j], u[j], F(1), y[o + j], m[o + j], r[o + j]);
      }
    }
  }
  if (to != nullptr) s.store(to, stride, n);
  if constexpr (P == Pass::kFoldBoth) right.store(to + kFwdFields * stride, stride, n);
}

// Phase 2 over one block of n lanes (channels) in direction dir: the CPU's vectorised form of
// wkv::scan_carries, the same merges in the same order.  Covers the scan indices [i0, i1) of the
// summaries at summ (chunk ch's block at summ + ch * cs, field by field at stride C) from the
// lanes' states s, storing each chunk's carry first unless carry is null; the summary of the last
// chunk in scan order is never merged (phase 1 does not write it), nor the one after the last
// stored carry.
template <typename F, typename Lanes>
void scan_block(const F* summ, F* carry, int64_t i0, int64_t i1, int64_t nch, int64_t cs, int64_t C,
                int dir, const F* w, int n, Lanes& s) {
  const int64_t merges = std::min(carry != nullptr ? i1 - 1 : i1, nch - 1);
  Lanes o;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t at = wkv::chunk_at(i, nch, dir) * cs;
    if (carry != nullptr) s.store(carry + at, C, n);
    if (i < merges) {
      o.load(summ + at, C, n);
      s.merge(o, w, n);
    }
  }
}

// Phase 2: the carries of every (batch, channel, direction) lane, as the CUDA kernel computes
// them -- one sequential scan per lane below wkv::kGroupCarriesFrom chunks, grouped from there on
// (wkv_recurrence.h, "Grouped carries"), its merges in its order.  Grouped, a carry is about
// 3 sqrt(n) merges deep instead of n: each merge rounds the running mean by about an ulp, and
// over the 8192 chunks of T = 2^21 one sequential scan put float32 gk up to 1.6e-5 off, grouped
// 5.3e-6 (docs/wkv.md, "Longer still").  Tasks: (batch, channel block, group), both directions
// each; the merges run over the block's lanes, vectorised.
template <typename F, typename Lanes>
void carries(const Plan& p, const F* wp, const F* summ, F* carry) {
  constexpr int fields = Lanes::kFields;
  const int64_t cs = 2 * fields * p.C;
  const int64_t G = wkv::carry_group(p.nch), groups = wkv::carry_groups(p.nch);
  // fn(s, n, g, dir, w, o, og) for every task and direction, s empty; o, og: offsets of the
  // lanes' chunk 0 in the summary / carry buffers and of their group 0 in gsum
  const auto for_groups = [&](auto&& fn) {
    at::parallel_for(0, p.B * p.nblk * groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t g = task % groups, rest = task / groups;
        const int64_t b = rest / p.nblk, c0 = (rest % p.nblk) * kBlock;
        const int n = static_cast<int>(std::min<int64_t>(kBlock, p.C - c0));
        for (int dir = 0; dir < 2; ++dir) {
          Lanes s;
          s.empty(n);
          fn(s, n, g, dir, wp + c0, state_off(p, fields, b, 0, dir, c0),
             (b * groups * 2 + dir) * fields * p.C + c0);
        }
      }
    });
  };
  if (groups == 1) {
    for_groups([&](Lanes& s, int n, int64_t, int dir, const F* w, int64_t o, int64_t) {
      scan_block(summ + o, carry + o, 0, p.nch, p.nch, cs, p.C, dir, w, n, s);
    });
    return;
  }
  // group summaries, (B, groups, 2, fields, C): group g of direction dir at index chunk_at(g),
  // as the chunk summaries are laid out
  const at::Tensor gbuf =
      at::empty({p.B * groups * cs}, at::TensorOptions().dtype(c10::CppTypeToScalarType<F>::value));
  F* gsum = gbuf.data_ptr<F>();
  for_groups([&](Lanes& s, int n, int64_t g, int dir, const F* w, int64_t o, int64_t og) {
    scan_block(summ + o, static_cast<F*>(nullptr), g * G, std::min((g + 1) * G, p.nch), p.nch, cs,
               p.C, dir, w, n, s);
    s.store(gsum + og + wkv::chunk_at(g, groups, dir) * cs, p.C, n);
  });
  for_groups([&](Lanes& s, int n, int64_t g, int dir, const F* w, int64_t o, int64_t og) {
    scan_block(gsum + og, static_cast<F*>(nullptr), 0, g, groups, cs, p.C, dir, w, n, s);
    scan_block(summ + o, carry + o, g * G, std::min((g + 1) * G, p.nch), p.nch, cs, p.C, dir, w,
               n, s);
  });
}

// The vectorised kernel's schedule over (batch, channel block, chunk) tasks, for the forward
// or the backward (Lanes: FwdLanes or BwdLanes, whose states of Lanes::kFields fields fill the
// summary buffer sp and the carry buffer cp): pass(kind, b, c0, n, ch, dir, from, to) runs one
// pass of that kind over chunk ch of block (b, c0) in direction dir.  Two halves for exactly two
// chunks, else phases 1-3.
template <typename F, typename Lanes, typename PassFn>
void block_phases(const Plan& p, const F* wp, F* sp, F* cp, PassFn&& pass) {
  constexpr int fields = Lanes::kFields;
  auto state = [&](F* buf, int64_t b, int64_t ch, int dir, int64_t c0) {
    return buf + state_off(p, fields, b, ch, dir, c0);
  };
  if (p.nch == 2) {  // two halves: first passes outwards-in, then each half finishes
    for_tasks(p, [&](int64_t b, int64_t c0, int n, int64_t ch) {
      pass(kStore, b, c0, n, ch, half_dir(ch), nullptr, state(sp, b, ch, ch, c0));
    });
    for_tasks(p, [&](int64_t b, int64_t c0, int n, int64_t ch) {
      pass(kFinish, b, c0, n, ch, -half_dir(ch), state(sp, b, 1 - ch, 1 - ch, c0), nullptr);
    });
    return;
  }
  if (p.nch > 1) {  // phase 1: an inner chunk folds both directions' sums in one pass (each row
                    // read once, two independent chains of folds); the outer ones need only one
    for_tasks(p, [&](int64_t b, int64_t c0, int n, int64_t ch) {
      if (ch > 0 && ch + 1 < p.nch) {
        pass(kFoldBoth, b, c0, n, ch, 1, nullptr, state(sp, b, ch, 0, c0));
      } else if (ch == 0) {
        pass(kFold, b, c0, n, ch, 1, nullptr, state(sp, b, ch, 0, c0));
      } else {
        pass(kFold, b, c0, n, ch, -1, nullptr, state(sp, b, ch, 1, c0));
      }
    });
  }
  carries<F, Lanes>(p, wp, sp, cp);
  for_tasks(p, [&](int64_t b, int64_t c0, int n, int64_t ch) {
    pass(kStore, b, c0, n, ch, 1, state(cp, b, ch, 0, c0), nullptr);
    pass(kFinish, b, c0, n, ch, -1, state(cp, b, ch, 1, c0), nullptr);
  });
}

std::vector<at::Tensor> wkv_forward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v) {
  wkv::check_inputs("wkv_cpu", c10::DeviceType::CPU, w, u, k, v);
  auto y = at::empty_like(k), m = at::empty_like(k), r = at::empty_like(k);
  if (k.numel() == 0) return {y, m, r};
  const Plan p = make_plan(k);
  auto summ = at::empty({p.B, p.nch, 2, kFwdFields, p.C}, k.options());
  auto carry = at::empty_like(summ);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_forward_cpu", [&] {
    using F = scalar_t;
    const F* kp = k.data_ptr<F>();
    const F* vp = v.data_ptr<F>();
    const F* wp = w.data_ptr<F>();
    const F* up = u.data_ptr<F>();
    F* yp = y.data_ptr<F>();
    F* mp = m.data_ptr<F>();
    F* rp = r.data_ptr<F>();
    F* sp = summ.data_ptr<F>();
    F* cp = carry.data_ptr<F>();
    const int64_t TC = p.T * p.C;
    // One pass of kind P over chunk ch of block (b, c0) in direction dir.
    auto pass = [&](auto kind, int64_t b, int64_t c0, int n, int64_t ch, int dir,
                    const F* from, F* to) {
      constexpr Pass P = decltype(kind)::value;
      const int64_t off = b * TC + c0;
      WKV_BLOCK_DISPATCH(n, fwd_pass<F, NB, P>(kp + off, vp + off, wp + c0, up + c0, yp + off,
                                               mp + off, rp + off, dir, p.chunk_begin(ch),
                                               p.chunk_end(ch), p.C, n, from, to, p.C););
    };
    block_phases<F, FwdLanes<F>>(p, wp, sp, cp, pass);
  });
  return {y, m, r};
}

// ----------------------------------------------------------------------------- backward
// Backward states of a channel block, structure of arrays (BwdState field by field).
template <typename F> struct BwdLanes {
  static constexpr int kFields = kBwdFields;
  F f[kBwdFields][kBlock];
  wkv::BwdState<F> get(int j) const {
    return {f[0][j], f[1][j], f[2][j], f[3][j], f[4][j], f[5][j], f[6][j]};
  }
  void put(int j, const wkv::BwdState<F>& s) {
    f[0][j] = s.a;
    f[1][j] = s.n;
    f[2][j] = s.g0;
    f[3][j] = s.g1;
    f[4][j] = s.ty;
    f[5][j] = s.d0;
    f[6][j] = s.d1;
  }
  void empty(int cnt) {
    wkv::BwdState<F> e;
    wkv::bwd_empty(e);
    for (int j = 0; j < cnt; ++j) put(j, e);
  }
  void load(const F* p, int64_t stride, int cnt) {
    for (int i = 0; i < kBwdFields; ++i)
      for (int j = 0; j < cnt; ++j) f[i][j] = p[i * stride + j];
  }
  void store(F* p, int64_t stride, int cnt) const {
    for (int i = 0; i < kBwdFields; ++i)
      for (int j = 0; j < cnt; ++j) p[i * stride + j] = f[i][j];
  }
  void merge(const BwdLanes& o, const F* w, int cnt) {  // as FwdLanes::merge
    WKV_SIMD
    for (int j = 0; j < cnt; ++j) {
      wkv::BwdState<F> st = get(j);
      wkv::bwd_merge(st, o.get(j), w[j]);
      put(j, st);
    }
  }
};

// Pointers of one block at (b, 0, c0) and the per-lane parameters.
template <typename F> struct BwdIO {
  const F *k, *v, *y, *m, *r, *gy;
  F *gk, *gv;
  const F *w, *u;
  int64_t C;
};

// One backward pass over [t0, t1) of a block in direction dir, from the states at `from`
// (nullptr: empty) to `to` (nullptr: not needed; kFoldBoth as in fwd_pass).  kStore keeps
// this side's transposed sums q0, q1 in gv, gk; kFinish adds them to its own and writes
// the gradients.
// gw_io / gu_io: the task's partial sums of gw and gu, accumulated in place.
template <typename F, int NB, Pass P>
WKV_NOINLINE void bwd_pass(const BwdIO<F>& io, int dir, int64_t t0, int64_t t1, int n_rt, const F* from,
              F* to, int64_t stride, double* gw_io, double* gu_io) {
  const int n = NB > 0 ? NB : n_rt;
  constexpr bool kRescan = P == Pass::kStore || P == Pass::kFinish;  // sums gw, gu
  double gw[kBlock], gu[kBlock];
  for (int j = 0; j < n; ++j) {
    gw[j] = kRescan ? gw_io[j] : 0.0;
    gu[j] = kRescan ? gu_io[j] : 0.0;
  }
  BwdLanes<F> s, right;  // right: kFoldBoth's right states
  start_lanes(s, from, stride, n);
  if constexpr (P == Pass::kFoldBoth) right.empty(n);
  const F fdir = static_cast<F>(dir);
  for (int64_t i = 0; i < t1 - t0; ++i) {
    const int64_t t = step_at(dir, t0, t1, i);
    if (i + kAhead < t1 - t0) {
      const int64_t ahead = (t + dir * kAhead) * io.C;
      if (P == Pass::kFold || P == Pass::kFoldBoth) {  // folds read no k, v (bwd_fold)
        prefetch_rows(ahead, io.y, io.m, io.r, io.gy);
      } else {
        prefetch_rows(ahead, io.k, io.v, io.y, io.m, io.r, io.gy, io.gv, io.gk);
      }
    }
    const int64_t o = t * io.C;
    const F tf = static_cast<F>(t);
    WKV_SIMD
    for (int j = 0; j < n; ++j) {
      wkv::BwdState<F> st = s.get(j);
      const F yy = io.y[o + j], mm = io.m[o + j], rr = io.r[o + j], gg = io.gy[o + j];
      if constexpr (P == Pass::kStore) {
        wkv::bwd_emit(st, fdir, tf, io.k[o + j], io.v[o + j], io.w[j], gw[j], io.gv[o + j],
                      io.gk[o + j]);
      } else if constexpr (P == Pass::kFinish) {
        const F kk = io.k[o + j], vv = io.v[o + j];
        F q0, q1;
        wkv::bwd_emit(st, fdir, tf, kk, vv, io.w[j], gw[j], q0, q1);
        wkv::bwd_finish(io.u[j], kk, vv, yy, mm, rr, gg, io.gv[o + j] + q0,
                        io.gk[o + j] + q1, io.w[j], gu[j], gw[j], io.gv[o + j],
                        io.gk[o + j]);
      }
      wkv::bwd_fold(st, fdir, tf, yy, mm, rr, gg, io.w[j]);
      s.put(j, st);
      if constexpr (P == Pass::kFoldBoth) {
        wkv::BwdState<F> sr = right.get(j);
        wkv::bwd_fold(sr, F(-1), tf, yy, mm, rr, gg, io.w[j]);
        right.put(j, sr);
      }
    }
  }
  if (to != nullptr) s.store(to, stride, n);
  if constexpr (P == Pass::kFoldBoth) right.store(to + kBwdFields * stride, stride, n);
  if constexpr (kRescan) {
    for (int j = 0; j < n; ++j) {
      gw_io[j] = gw[j];
      gu_io[j] = gu[j];
    }
  }
}

// gw, gu from their (B, chunks, C) double partial sums: a fixed-order reduction over
// (batch, chunk), deterministic and independent of the thread count.
std::vector<at::Tensor> reduce_parts(const at::Tensor& gw_part, const at::Tensor& gu_part,
                                     at::ScalarType dtype) {
  const int64_t parts = gw_part.size(0) * gw_part.size(1), C = gw_part.size(2);
  auto ow = at::zeros({C}, gw_part.options());
  auto ou = at::zeros({C}, gw_part.options());
  const double* gwp = gw_part.data_ptr<double>();
  const double* gup = gu_part.data_ptr<double>();
  double* pw = ow.data_ptr<double>();
  double* pu = ou.data_ptr<double>();
  for (int64_t i = 0; i < parts; ++i) {
    for (int64_t c = 0; c < C; ++c) {
      pw[c] += gwp[i * C + c];
      pu[c] += gup[i * C + c];
    }
  }
  return {ow.to(dtype), ou.to(dtype)};
}

std::vector<at::Tensor> wkv_backward(at::Tensor w, at::Tensor u, at::Tensor k,
                                     at::Tensor v, at::Tensor y, at::Tensor m,
                                     at::Tensor r, at::Tensor gy) {
  wkv::check_inputs("wkv_cpu", c10::DeviceType::CPU, w, u, k, v);
  wkv::check_saved("wkv_cpu", k, {&y, &m, &r, &gy});
  auto gk = at::empty_like(k), gv = at::empty_like(k);
  if (k.numel() == 0) return {at::zeros_like(w), at::zeros_like(u), gk, gv};
  const Plan p = make_plan(k);
  auto summ = at::empty({p.B, p.nch, 2, kBwdFields, p.C}, k.options());
  auto carry = at::empty_like(summ);
  auto gw_part = at::zeros({p.B, p.nch, p.C}, k.options().dtype(at::kDouble));
  auto gu_part = at::zeros_like(gw_part);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_backward_cpu", [&] {
    using F = scalar_t;
    const int64_t TC = p.T * p.C;
    auto io_at = [&](int64_t b, int64_t c0) {
      const int64_t off = b * TC + c0;
      return BwdIO<F>{k.data_ptr<F>() + off,  v.data_ptr<F>() + off,  y.data_ptr<F>() + off,
                      m.data_ptr<F>() + off,  r.data_ptr<F>() + off,  gy.data_ptr<F>() + off,
                      gk.data_ptr<F>() + off, gv.data_ptr<F>() + off, w.data_ptr<F>() + c0,
                      u.data_ptr<F>() + c0,   p.C};
    };
    F* sp = summ.data_ptr<F>();
    F* cp = carry.data_ptr<F>();
    double* gwp = gw_part.data_ptr<double>();
    double* gup = gu_part.data_ptr<double>();
    // One pass of kind P over chunk ch of block (b, c0) in direction dir; partial sums of
    // gw and gu per (batch, chunk, channel).
    auto pass = [&](auto kind, int64_t b, int64_t c0, int n, int64_t ch, int dir,
                    const F* from, F* to) {
      constexpr Pass P = decltype(kind)::value;
      const int64_t part = (b * p.nch + ch) * p.C + c0;
      WKV_BLOCK_DISPATCH(n, bwd_pass<F, NB, P>(io_at(b, c0), dir, p.chunk_begin(ch),
                                               p.chunk_end(ch), n, from, to, p.C, gwp + part,
                                               gup + part););
    };
    block_phases<F, BwdLanes<F>>(p, w.data_ptr<F>(), sp, cp, pass);
  });
  auto g = reduce_parts(gw_part, gu_part, k.scalar_type());
  return {g[0], g[1], gk, gv};
}

// The chunk length the kernels would use for a (B, T, C) problem of `itemsize`-byte elements:
// CPU with `threads` threads, CUDA with `slots` resident threads (honours CUDA_WKV_CHUNK).
int64_t chunk_length(const std::string& device, int64_t B, int64_t T, int64_t C,
                     int64_t parallel, int64_t itemsize) {
  const int64_t forced = wkv::forced_chunk("chunk_length");
  TORCH_CHECK(device == "cpu" || device == "cuda", "chunk_length: device must be 'cpu' or "
              "'cuda', got '", device, "'");
  TORCH_CHECK(itemsize == 4 || itemsize == 8, "chunk_length: itemsize must be 4 (float32) or 8 "
              "(float64), got ", itemsize);
  if (forced > 0) {
    return device == "cpu" ? wkv::forced_chunk_len(T, forced) : wkv::cuda_forced_chunk(T, C, forced);
  }
  return device == "cpu" ? wkv::cpu_auto_chunk(B, T, C, kBlock, parallel, itemsize)
                         : wkv::cuda_auto_chunk(B, T, C, parallel, itemsize);
}

// Groups of phase 2 for nch chunks, both kernels (1: one sequential scan; see "Grouped carries"
// in wkv_recurrence.h), for the benchmarks' work-items table and the tests.
int64_t carry_groups(int64_t nch) {
  TORCH_CHECK(nch >= 1, "carry_groups: nch must be >= 1, got ", nch);
  return wkv::carry_groups(nch);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "cuda_wkv: exact bidirectional WKV, C++ CPU kernel";
  mod.def("forward", &wkv_forward, "forward(w, u, k, v) -> [y, m, r]");
  mod.def("backward", &wkv_backward,
          "backward(w, u, k, v, y, m, r, gy) -> [gw, gu, gk, gv]");
  mod.def("chunk_length", &chunk_length,
          "chunk_length(device, B, T, C, parallel, itemsize) -> chunk length of the three-phase "
          "scan (parallel: CPU threads or CUDA resident threads; itemsize: 4 for float32, 8 for "
          "float64)");
  mod.def("carry_groups", &carry_groups,
          "carry_groups(nch) -> groups of phase 2 (both kernels) for nch chunks");
}

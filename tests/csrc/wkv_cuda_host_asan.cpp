// The host-run CUDA kernel (wkv_cuda_host.cpp) on buffers of exactly the sizes the CUDA binding
// allocates, for AddressSanitizer: any read or write outside a call's buffers -- e.g. a block of
// rows loaded ahead without its guard past the end of (B, T, C), or before its start in a right
// to left pass -- aborts the program.  (tests/test_wkv_cuda_host.py's NaN-filled guards catch
// such reads only where the value read changes a result; a load ahead whose rows are never
// used changes none, but on a GPU it reads outside the tensor.)
//
// Build and run (tests/test_wkv_cuda_host.py does):
//   c++ -std=c++17 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all
//       -I cuda_wkv/csrc tests/csrc/wkv_cuda_host_asan.cpp -o wkv_asan && ./wkv_asan
// Prints "ok <calls>" and exits 0 when every call ran without an error.
#include "wkv_cuda_host.cpp"

#include <cstdio>
#include <vector>

namespace {

// Deterministic inputs in [-2, 2) (no library RNG: the same values on every platform).
template <typename F> std::vector<F> inputs(int64_t n, uint64_t seed) {
  std::vector<F> out(static_cast<size_t>(n));
  for (auto& x : out) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    x = static_cast<F>(static_cast<double>(seed >> 11) / 9007199254740992.0 * 4.0 - 2.0);
  }
  return out;
}

// Exactly n elements (at least one, as the binding's empty tensors still have an address).
template <typename F> std::vector<F> buffer(int64_t n) { return std::vector<F>(static_cast<size_t>(n > 0 ? n : 1)); }

// One forward and backward at (B, T, C) with chunks of len; false on a CUDA error.
template <typename F, typename Fwd, typename Bwd>
bool run(Fwd fwd, Bwd bwd, int64_t B, int64_t T, int64_t C, int64_t len) {
  const int64_t n = B * T * C, nch = (T + len - 1) / len, groups = wkv::carry_groups(nch);
  const int64_t ng = groups > 1 ? groups : 0;
  const int64_t ff = wkv::kFwdFields, bf = wkv::kBwdFields;
  std::vector<F> w = inputs<F>(C, 1), u = inputs<F>(C, 2), k = inputs<F>(n, 3), v = inputs<F>(n, 4);
  std::vector<F> gy = inputs<F>(n, 5);
  for (auto& x : w) x = x * F(0.01);
  std::vector<F> y = buffer<F>(n), m = buffer<F>(n), r = buffer<F>(n);
  std::vector<F> summ = buffer<F>(B * nch * 2 * ff * C), carry = buffer<F>(B * nch * 2 * ff * C);
  std::vector<F> ckpt = buffer<F>(B * nch * wkv::checkpoints_per_chunk<false>(len) * ff * C);
  std::vector<F> grp = buffer<F>(B * ng * 2 * ff * C);
  if (fwd(w.data(), u.data(), k.data(), v.data(), y.data(), m.data(), r.data(), summ.data(),
          carry.data(), ckpt.data(), grp.data(), B, T, C, len, 0) != 0)
    return false;
  std::vector<F> gk = buffer<F>(n), gv = buffer<F>(n), gw = buffer<F>(C), gu = buffer<F>(C);
  std::vector<F> bsumm = buffer<F>(B * nch * 2 * bf * C), bcarry = buffer<F>(B * nch * 2 * bf * C);
  std::vector<F> bckpt = buffer<F>(B * nch * wkv::checkpoints_per_chunk<true>(len) * bf * C);
  std::vector<F> bgrp = buffer<F>(B * ng * 2 * bf * C);
  std::vector<double> gw_part = buffer<double>(B * nch * C), gu_part = buffer<double>(B * nch * C);
  return bwd(w.data(), u.data(), k.data(), v.data(), y.data(), m.data(), r.data(), gy.data(),
             gk.data(), gv.data(), bsumm.data(), bcarry.data(), bckpt.data(), bgrp.data(),
             gw_part.data(), gu_part.data(), gw.data(), gu.data(), B, T, C, len, 0) == 0;
}

}  // namespace

int main() {
  // T around the blocks of the loads ahead (8 / 4 rows) and the checkpoints (8 / 4), chunk
  // lengths from one row to the whole sequence, C below and above a 32-channel block; the
  // largest chunk counts use the grouped carries of phase 2
  const int64_t shapes[][3] = {{1, 1, 1},  {2, 7, 3},   {1, 8, 1},  {2, 9, 33}, {1, 16, 2},
                               {1, 17, 5}, {2, 33, 40}, {1, 64, 3}, {1, 100, 1}, {2, 400, 3}};
  const int64_t chunks[] = {1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 24, 33, 64};
  int calls = 0;
  const auto call = [&](const int64_t* s, int64_t len) {
    if (!run<float>(wkv_host_forward_f32, wkv_host_backward_f32, s[0], s[1], s[2], len) ||
        !run<double>(wkv_host_forward_f64, wkv_host_backward_f64, s[0], s[1], s[2], len)) {
      std::printf("CUDA error at B=%lld T=%lld C=%lld len=%lld\n", (long long)s[0],
                  (long long)s[1], (long long)s[2], (long long)len);
      return false;
    }
    calls += 2;
    return true;
  };
  for (const auto& s : shapes) {
    for (const int64_t len : chunks) {
      if (len < s[1] && !call(s, len)) return 1;
    }
    if (!call(s, s[1])) return 1;  // one chunk: the whole sequence
  }
  std::printf("ok %d\n", calls);
  return 0;
}

"""Tests of cuda_wkv: values vs the float64 dense reference, gradients, the chunked scan
at every chunk length, float32 accuracy at large |w| T, extreme inputs, determinism,
AMP dtypes.  CUDA tests are skipped without a GPU; the kernel cache (lazy loading, build
fallbacks, locks) is tested in test_wkv_cache.py, the nvcc compile in test_wkv_build.py."""
from __future__ import annotations

import math
import os
import re
import shutil

import pytest
import torch

import cuda_wkv
from cuda_wkv import bi_wkv, bi_wkv_dense, bi_wkv_scan, dispatch, loader

HAS_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _inputs(B, T, C, wT=1.0, kscale=1.0, dtype=torch.float64, device="cpu", seed=0, w_sign=None):
    """Random inputs with |w| * T <= wT (w of both signs, or of the sign ``w_sign``) and k ~ N(0, kscale^2)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1) * wT / T
    if w_sign is not None:
        w = w.abs() * w_sign
    u = torch.randn(C, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64) * kscale
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype) for x in (w, u, k, v)]


def _naive(w, u, k, v):
    """The formula, written out with Python loops (ground truth for the dense reference)."""
    B, T, C = k.shape
    y = torch.empty(B, T, C, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            for t in range(T):
                num = den = 0.0
                for i in range(T):
                    if i == t:
                        e = math.exp(u[c] + k[b, t, c])
                    else:
                        e = math.exp(-(abs(t - i) - 1) * w[c] + k[b, i, c])
                    num += e * v[b, i, c]
                    den += e
                y[b, t, c] = num / den
    return y


@pytest.fixture(scope="module")
def cpu_kernel():
    if not HAS_CXX:
        pytest.skip("no C++ compiler")
    mod = loader.load_extension("cpu")
    assert mod is not None, f"CPU kernel failed to build: {loader.failure_reason('cpu')}"
    return mod


@pytest.fixture
def backend(request, monkeypatch, cpu_kernel):
    monkeypatch.setenv("CUDA_WKV_BACKEND", request.param)
    return request.param


# ----------------------------------------------------------------------- references
def test_dense_reference_matches_formula():
    for wT in (3.0, -3.0):
        w, u, k, v = _inputs(2, 7, 3, wT=wT, kscale=2.0)
        torch.testing.assert_close(bi_wkv_dense(w, u, k, v), _naive(w, u, k, v),
                                   rtol=1e-12, atol=1e-12)


def test_dense_reference_chunking():
    w, u, k, v = _inputs(2, 50, 3, wT=5.0)
    full = bi_wkv_dense(w, u, k, v)
    chunked = bi_wkv_dense(w, u, k, v, max_chunk_elements=2 * 3 * 50 * 7)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-14)


# -------------------------------------------------------------- values vs dense fp64
SHAPES = [(1, 1, 1), (2, 2, 3), (3, 31, 64), (2, 33, 3), (1, 1000, 64), (3, 1000, 3),
          (1, 4099, 3), (2, 4099, 1)]
W_RANGES = [0.0, 1.0, 10.0]


_DENSE_CACHE = {}


def _dense_cached(key, w, u, k, v):
    if key not in _DENSE_CACHE:
        _DENSE_CACHE[key] = bi_wkv_dense(w, u, k, v)
    return _DENSE_CACHE[key]


def _tol(dtype, v):
    scale = v.abs().max().item()
    return (1e-11 if dtype == torch.float64 else 2e-5) * max(scale, 1.0)


@pytest.mark.parametrize("backend", ["auto", "torch"], indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("wT", W_RANGES)
def test_values_vs_dense(backend, shape, wT):
    w, u, k, v = _inputs(*shape, wT=wT, kscale=2.0, seed=hash((shape, wT)) % 1000)
    ref = _dense_cached((shape, wT), w, u, k, v)
    for dtype in (torch.float64, torch.float32):
        y = bi_wkv(*(x.to(dtype) for x in (w, u, k, v)))
        assert y.dtype == dtype and y.shape == k.shape
        err = (y.double() - ref).abs().max().item()
        assert err <= _tol(dtype, v), (backend, dtype, err)


@pytest.mark.parametrize("backend", ["auto", "torch"], indirect=True)
def test_extreme_inputs(backend):
    """|w| T up to 40 (both signs) and |k| up to 30: no overflow, exact result."""
    for wT, kscale in [(10.0, 30.0), (-10.0, 30.0), (40.0, 10.0), (-40.0, 10.0)]:
        w, u, k, v = _inputs(2, 500, 5, wT=wT, kscale=1.0, seed=3)
        k = (k / k.abs().max()) * kscale
        w = w.abs() * math.copysign(1.0, wT)
        ref = bi_wkv_dense(w, u, k, v)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
            y = bi_wkv(*(x.to(dtype) for x in (w, u, k, v)))
            assert torch.isfinite(y).all()
            err = (y.double() - ref).abs().max().item()
            assert err <= tol * v.abs().max().item(), (wT, kscale, dtype, err)


def test_kernel_large_decay_per_step(cpu_kernel):
    """The kernel has no |w| T limit at all (w = +-5 per step, T = 300)."""
    for sign in (1.0, -1.0):
        w, u, k, v = _inputs(1, 300, 4, wT=1.0, kscale=3.0, seed=5)
        w = torch.full_like(w, 5.0 * sign) + torch.linspace(0, 1, 4, dtype=w.dtype)
        ref = bi_wkv_dense(w, u, k, v)
        torch.testing.assert_close(bi_wkv(w, u, k, v), ref, rtol=1e-10, atol=1e-10)
        y32 = bi_wkv(*(x.float() for x in (w, u, k, v)))
        assert (y32.double() - ref).abs().max().item() < 1e-4


# ------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("backend", ["auto", "torch"], indirect=True)
@pytest.mark.parametrize("shape,wT", [((2, 5, 3), 2.0), ((1, 1, 2), 1.0), ((2, 9, 4), -4.0),
                                      ((3, 17, 2), 8.0)])
def test_gradcheck(backend, shape, wT):
    w, u, k, v = _inputs(*shape, wT=wT, kscale=1.5, seed=11)
    args = [x.clone().requires_grad_() for x in (w, u, k, v)]
    assert torch.autograd.gradcheck(bi_wkv, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "torch"], indirect=True)
@pytest.mark.parametrize("shape,wT", [((2, 300, 19), 5.0), ((1, 1000, 3), -8.0)])
def test_gradients_vs_dense(backend, shape, wT):
    w, u, k, v = _inputs(*shape, wT=wT, kscale=2.0, seed=7)
    gy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
    ref = torch.autograd.grad(bi_wkv_dense(*leaves), leaves, gy)
    for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 2e-4)):
        leaves = [x.to(dtype).requires_grad_() for x in (w, u, k, v)]
        got = torch.autograd.grad(bi_wkv(*leaves), leaves, gy.to(dtype))
        for name, g, r in zip("wukv", got, ref):
            assert g.dtype == dtype
            err = (g.double() - r).abs().max().item()
            assert err <= rtol * max(r.abs().max().item(), 1.0), (name, dtype, err)


def test_determinism_and_thread_independence(cpu_kernel):
    w, u, k, v = _inputs(3, 777, 19, wT=5.0, kscale=2.0, dtype=torch.float32, seed=2)
    gy = torch.randn(3, 777, 19)
    prev = torch.get_num_threads()

    def run():
        leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
        y = bi_wkv(*leaves)
        return [y.detach()] + list(torch.autograd.grad(y, leaves, gy))

    try:
        first = run()
        again = run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(prev)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, c)


# --------------------------------------------------------------- chunked three-phase scan
CHUNKS = ["1", "2", "3", "7", "64", "", "half"]  # "" = automatic


def _chunk_env(chunk, T):
    """CUDA_WKV_CHUNK for a test's chunk spec: "half" = two chunks (the CPU kernel's two-halves
    path, see wkv_cpu.cpp; three phases on two chunks on the CUDA backend), else the text."""
    return str(max(1, (T + 1) // 2)) if chunk == "half" else chunk
# every T x C of the grid; B = 2 where the dense reference is cheap
CHUNK_SHAPES = [(2 if T * C <= 4099 * 3 else 1, T, C) for T in (1, 2, 31, 33, 1000, 4099) for C in (1, 3, 64)]
_REF_CACHE = {}


def _grad_ref(shape, seed, wT=4.0):
    """Inputs, gy, the dense float64 values and the float64 gradients (cached per shape): autograd
    through the dense reference where its O(T^2 C) graph is small (T*C <= 12297), else through the
    float64 ``bi_wkv_scan`` (independent of the kernels, itself tested against the dense one)."""
    key = (shape, seed, wT)
    if key not in _REF_CACHE:
        w, u, k, v = _inputs(*shape, wT=wT, kscale=2.0, seed=seed)
        gy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
        if shape[1] * shape[2] <= 4099 * 3:
            y = graph = bi_wkv_dense(*leaves)
        else:
            y, graph = bi_wkv_dense(w, u, k, v), bi_wkv_scan(*leaves)
            assert (graph - y).abs().max() <= 1e-12 * v.abs().max()
        grads = torch.autograd.grad(graph, leaves, gy)
        _REF_CACHE[key] = ((w, u, k, v), gy, y.detach(), grads)
    return _REF_CACHE[key]


def _kernel_grads(args, gy):
    leaves = [x.clone().requires_grad_() for x in args]
    y = bi_wkv(*leaves)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, gy))


def _rel_err(got, ref):
    """Max error relative to the largest reference entry (floor 1e-3: exact zeros)."""
    return (got.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-3)


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c or 'auto'}")
@pytest.mark.parametrize("shape", CHUNK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunked_scan_vs_dense(cpu_kernel, monkeypatch, chunk, shape):
    """Every chunk length (1, 2, 3, 7 cross every boundary case) gives the exact values and
    gradients, in float64 to ~1e-12 and in float32 to ~1e-5."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.setenv("CUDA_WKV_CHUNK", _chunk_env(chunk, shape[1]))
    args, gy, y_ref, g_ref = _grad_ref(shape, seed=sum(shape))
    for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 3e-5)):
        got = _kernel_grads([x.to(dtype) for x in args], gy.to(dtype))
        assert got[0].dtype == dtype
        assert (got[0].double() - y_ref).abs().max().item() <= tol * args[3].abs().max().item()
        for name, g, r in zip("wukv", got[1:], g_ref):
            assert _rel_err(g, r) <= tol * 10, (name, dtype, _rel_err(g, r))


@pytest.mark.parametrize("T", [95, 96, 97, 193])
def test_grouped_carries_vs_dense(cpu_kernel, monkeypatch, T):
    """Chunks of one position on both sides of the grouping threshold (96 chunks: one sequential
    phase-2 scan below, groups of ceil(sqrt(n)) chunks from there, the last one partial: 6, 7, 11),
    B = 3 and C = 17 (a full and a partial channel block): float64 values and gradients exact."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.setenv("CUDA_WKV_CHUNK", "1")
    assert cpu_kernel.carry_groups(T) == {95: 1, 96: 10, 97: 10, 193: 14}[T]
    args, gy, y_ref, g_ref = _grad_ref((3, T, 17), seed=T)
    got = _kernel_grads(args, gy)
    assert (got[0] - y_ref).abs().max().item() <= 1e-11 * args[3].abs().max().item()
    for name, g, r in zip("wukv", got[1:], g_ref):
        assert _rel_err(g, r) <= 1e-10, (name, _rel_err(g, r))


def test_chunk_length_rules(cpu_kernel, monkeypatch):
    monkeypatch.delenv("CUDA_WKV_CHUNK", raising=False)
    cl = cpu_kernel.chunk_length
    # float64 (itemsize 8): chunks only for the threads' sake
    assert cl("cpu", 2, 32768, 64, 2, 8) == 32768  # 8 channel blocks >= 2 threads: one chunk
    assert cl("cpu", 1, 262144, 8, 2, 8) == 131072  # one block, two threads: two chunks
    assert cl("cpu", 1, 1000, 8, 2, 8) == 1000  # short sequences are not split
    # float32: at most 256 positions a chunk, for accuracy (wkv_recurrence.h, "chunk length")
    assert cl("cpu", 2, 32768, 64, 2, 4) == 256 and cl("cpu", 1, 262144, 8, 2, 4) == 256
    assert cl("cpu", 1, 256, 8, 2, 4) == 256 and cl("cpu", 1, 257, 8, 1, 4) == 129  # even chunks
    assert cl("cpu", 1, 1500, 8, 2, 4) == 250 and cl("cuda", 1, 2049, 8, 1, 4) == 228
    L = cl("cuda", 2, 32768, 128, 132 * 2048, 4)
    assert 32 <= L < 32768 and (32768 + L - 1) // L <= int(math.sqrt(3 * 32768)) + 1
    assert cl("cuda", 128, 100, 4096, 132 * 2048, 4) == 100  # lanes fill the device: no split
    assert cl("cuda", 128, 32768, 4096, 132 * 2048, 8) == 32768  # ... in float64
    assert cl("cuda", 128, 32768, 4096, 132 * 2048, 4) == 256  # float32: the accuracy cap
    with pytest.raises(RuntimeError, match="chunk_length: itemsize must be 4 .float32. or 8 .float64., got 2"):
        cl("cpu", 1, 100, 8, 2, 2)
    # phase 2 (both kernels): one scan below 96 chunks, then about sqrt(n) groups (work-items table)
    assert [cpu_kernel.carry_groups(n) for n in (1, 95, 96, 263)] == [1, 1, 10, 16]
    with pytest.raises(RuntimeError, match="carry_groups: nch must be >= 1, got 0"):
        cpu_kernel.carry_groups(0)
    monkeypatch.setenv("CUDA_WKV_CHUNK", "7")
    assert cl("cpu", 2, 100, 3, 2, 4) == 7 and cl("cuda", 2, 5, 3, 10, 4) == 5
    monkeypatch.setenv("CUDA_WKV_CHUNK", "32768")  # a forced length is not capped
    assert cl("cpu", 2, 32768, 64, 2, 4) == 32768
    # the CUDA kernel addresses a chunk's rows by 32-bit offsets: longer chunks are shortened
    limit = (2**31 - 1 - 64) // 1024
    monkeypatch.setenv("CUDA_WKV_CHUNK", "4000000000")
    assert cl("cuda", 1, 2**33, 1024, 10, 4) == limit and cl("cpu", 1, 2**33, 1024, 2, 4) == 4000000000
    monkeypatch.delenv("CUDA_WKV_CHUNK")
    assert cl("cuda", 1, 2**33, 1024, 1, 8) == limit


@pytest.mark.parametrize("bad", ["0", "-3", "abc", "12x", "1.5"])
def test_chunk_env_is_validated(cpu_kernel, monkeypatch, bad):
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.setenv("CUDA_WKV_CHUNK", bad)
    w, u, k, v = _inputs(1, 5, 2)
    with pytest.raises(RuntimeError, match=f"CUDA_WKV_CHUNK='{re.escape(bad)}' is not a "
                                           "positive integer"):
        bi_wkv(w, u, k, v)


@pytest.mark.parametrize("chunk", ["3", "16"])
def test_gradcheck_across_chunk_boundaries(cpu_kernel, monkeypatch, chunk):
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.setenv("CUDA_WKV_CHUNK", chunk)
    for wT in (6.0, -6.0):
        w, u, k, v = _inputs(2, 37, 3, wT=wT, kscale=1.5, seed=13)
        args = [x.clone().requires_grad_() for x in (w, u, k, v)]
        assert torch.autograd.gradcheck(bi_wkv, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def _wide_inputs(B, T, C, wT, kmax, seed, signs="alternating"):
    """|w| T between wT / 2 and wT per channel (signs alternating or all negative: far
    tokens weigh more), k ~ U(-kmax, kmax)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 0.5 + 0.5) * wT / T
    w = w * (torch.where(torch.arange(C) % 2 == 0, 1.0, -1.0).double()
             if signs == "alternating" else -1.0)
    u = torch.randn(C, generator=g, dtype=torch.float64)
    k = (torch.rand(B, T, C, generator=g, dtype=torch.float64) * 2 - 1) * kmax
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    gy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    # round to float32 first: the float64 run then sees exactly the float32 inputs
    return [x.float().double() for x in (w, u, k, v)], gy.float().double()


@pytest.mark.parametrize("signs", ["alternating", "negative"])
@pytest.mark.parametrize("wT", [1e2, 1e3, 1e4])
def test_float32_accuracy_vs_dense(cpu_kernel, monkeypatch, wT, signs):
    """float32 error does not grow with |w| T (the exponents use exact integer distances)
    nor with the number of terms folded into a running mean (automatic chunks, chunks of 100,
    and one forced chunk of 4099)."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.delenv("CUDA_WKV_CHUNK", raising=False)
    args, gy = _wide_inputs(1, 4099, 4, wT, 30.0, seed=int(wT), signs=signs)
    leaves = [x.clone().requires_grad_() for x in args]
    y_ref = bi_wkv_dense(*leaves)
    g_ref = torch.autograd.grad(y_ref, leaves, gy)
    for chunk in ("", "100", "4099"):
        monkeypatch.setenv("CUDA_WKV_CHUNK", chunk)
        got = _kernel_grads([x.float() for x in args], gy.float())
        assert (got[0].double() - y_ref).abs().max().item() <= 1e-5 * args[3].abs().max().item()
        for name, g, r in zip("wukv", got[1:], g_ref):
            assert _rel_err(g, r) <= 1e-5, (chunk, name, _rel_err(g, r))


@pytest.mark.parametrize("wT", [1e4, 1e5])
def test_float32_accuracy_long_sequence(cpu_kernel, monkeypatch, wT):
    """T = 32768, |w| T up to 1e5, |k| <= 30: float32 kernel vs the float64 kernel on the
    same (float32-rounded) inputs."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.setenv("CUDA_WKV_CHUNK", "1000")
    args, gy = _wide_inputs(1, 32768, 4, wT, 30.0, seed=3)
    ref = _kernel_grads(args, gy)
    got = _kernel_grads([x.float() for x in args], gy.float())
    assert (got[0].double() - ref[0]).abs().max().item() <= 1e-5 * args[3].abs().max().item()
    for name, g, r in zip("wukv", got[1:], ref[1:]):
        # the goal; gk sums gy P (v_j - y_t), relative to each sum's reference y
        # (it was 1.4e-5 as v_j gv_j - sum gy y P, which cancels where one token dominates)
        assert _rel_err(g, r) <= 1e-5, (name, _rel_err(g, r))


@pytest.mark.parametrize("wT", [0.1, 1.0, 10.0])
def test_float32_accuracy_one_long_chunk(cpu_kernel, monkeypatch, wT):
    """T = 32768 at GLSP's |w| T (w = decay / T), one chunk of 32768 (forced: the automatic float32
    length is 256): float32 values and all four gradients within 1e-5 of the float64 kernel on
    the same rounded inputs.  Over one long scan the transposed sums' reference moved at almost
    every step, rescaling the sum by the same rounded factor each time: gk and gv were 5e-5 to
    1.3e-4 off before the lazy rescaling (wkv_recurrence.h, merge_scales)."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.setenv("CUDA_WKV_CHUNK", "32768")
    _assert_float32_close_to_float64(32768, 64, wT)


def _assert_float32_close_to_float64(T, C, wT):
    """The kernel's float32 values and four gradients within 1e-5 of its float64 ones on the same
    rounded inputs (B = 1, GLSP-like w > 0 with |w| T <= wT, k ~ N(0, 2^2))."""
    w, u, k, v = _inputs(1, T, C, wT=wT, kscale=2.0, seed=5, w_sign=1)
    gy = torch.randn(1, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    rounded = [x.float() for x in (w, u, k, v, gy)]
    got = _kernel_grads(rounded[:4], rounded[4])
    ref = _kernel_grads([x.double() for x in rounded[:4]], rounded[4].double())
    for name, x, r in zip(["y", "gw", "gu", "gk", "gv"], got, ref):
        assert _rel_err(x, r) <= 1e-5, (name, _rel_err(x, r))


@pytest.mark.parametrize("wT", [0.0, 1.0])
def test_float32_accuracy_does_not_grow_with_t(cpu_kernel, monkeypatch, wT):
    """T = 262144 (the few-lanes shape: B = 1, C = 8) with the automatic chunk length: float32
    values and all four gradients within 1e-5 of the float64 kernel on the same rounded inputs.
    Before the float32 chunk cap the two halves of 131072 summed each lane in one running sum:
    y was 1.1e-4 off here, gw 1.7e-4, gu, gk, gv 3-4e-5 (wkv_recurrence.h, "chunk length")."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.delenv("CUDA_WKV_CHUNK", raising=False)
    assert cpu_kernel.chunk_length("cpu", 1, 262144, 8, torch.get_num_threads(), 4) == 256
    _assert_float32_close_to_float64(262144, 8, wT)


@pytest.mark.parametrize("wT", [0.1, 1.0, 10.0])
def test_float32_accuracy_many_chunks(cpu_kernel, monkeypatch, wT):
    """65536 chunks of one position (T = 65536, C = 8): the carries are merges of chunk summaries in
    groups (wkv_recurrence.h, "Grouped carries"), about 3 sqrt(n) merges deep, each rounding the
    running mean by about an ulp; float32 values and gradients within 1e-5 of the float64 kernel.
    With one sequential scan of 65535 merges per lane, as the CPU kernel's phase 2 ran until
    2026-12-06, y was 1.5e-5 off here and gw 2.4e-5."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.setenv("CUDA_WKV_CHUNK", "1")
    assert cpu_kernel.carry_groups(65536) == 256
    _assert_float32_close_to_float64(65536, 8, wT)


def _kernel_rounded(args, gy, dtype, kernel_dtype):
    """The ``kernel_dtype`` kernel's values and gradients for ``args`` and ``gy`` (called directly,
    not through bi_wkv's choice of dtype), rounded to ``dtype``."""
    leaves = [a.to(kernel_dtype).requires_grad_() for a in args]
    y = dispatch.kernel_bi_wkv(*leaves)
    grads = torch.autograd.grad(y, leaves, gy.to(kernel_dtype))
    return [x.to(dtype) for x in (y.detach(), *grads)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("T", [100, 101])
def test_long_float32_calls_run_the_float64_kernel(cpu_kernel, monkeypatch, T, dtype):
    """Calls longer than CUDA_WKV_FLOAT32_MAX_T (here 100) that would compute in float32
    give the float64 kernel's values and gradients rounded, bit for bit; calls up to it the float32
    kernel's (which differ from those in the last bits)."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.delenv("CUDA_WKV_CHUNK", raising=False)
    monkeypatch.setenv("CUDA_WKV_FLOAT32_MAX_T", "100")
    args = _inputs(2, T, 5, wT=3.0, kscale=2.0, dtype=dtype, seed=11)
    gy = torch.randn(2, T, 5, generator=torch.Generator().manual_seed(12)).to(dtype)
    got = _kernel_grads(args, gy)
    f32 = _kernel_rounded(args, gy, dtype, torch.float32)
    f64 = _kernel_rounded(args, gy, dtype, torch.float64)
    assert [x.dtype for x in got] == [dtype] * 5
    expected, other = (f64, f32) if T > 100 else (f32, f64)
    for name, x, e, o in zip(["y", "gw", "gu", "gk", "gv"], got, expected, other):
        assert torch.equal(x, e), name
    assert not all(torch.equal(x, o) for x, o in zip(got, other))


def test_backend_for_checks_the_dtype_the_call_runs_in(monkeypatch):
    """backend_for(k) answers for (and self-checks) the kernel's dtype of a call on k: float64 for
    a float32 (B, T, C) tensor longer than CUDA_WKV_FLOAT32_MAX_T, else k's own."""
    asked = []
    monkeypatch.setattr(dispatch, "_select_for_call", lambda device, dtype: asked.append(dtype) or "cpu")
    monkeypatch.setenv("CUDA_WKV_FLOAT32_MAX_T", "100")
    for T in (100, 101):
        cuda_wkv.backend_for(torch.zeros(1, T, 2))
    cuda_wkv.backend_for(torch.zeros(1, 101, 2, dtype=torch.float16))
    cuda_wkv.backend_for(torch.zeros(101))  # not (B, T, C): its own dtype
    cuda_wkv.backend_for("cpu")
    assert asked == [torch.float32, torch.float64, torch.float64, torch.float32, torch.float32]


@needs_gpu
def test_cuda_long_float32_calls_run_the_float64_kernel(monkeypatch):
    """On CUDA as on the CPU: beyond CUDA_WKV_FLOAT32_MAX_T (here 100) a float32 call is the float64
    CUDA kernel's values and gradients rounded, bit for bit, after that kernel's own self-check."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.delenv("CUDA_WKV_CHUNK", raising=False)
    monkeypatch.setenv("CUDA_WKV_FLOAT32_MAX_T", "100")
    args = [x.cuda() for x in _inputs(2, 101, 5, wT=3.0, kscale=2.0, dtype=torch.float32, seed=15)]
    gy = torch.randn(2, 101, 5, generator=torch.Generator().manual_seed(16)).cuda()
    assert cuda_wkv.backend_for(args[2]) == "cuda"
    got = _kernel_grads(args, gy)
    for name, x, e in zip(["y", "gw", "gu", "gk", "gv"], got,
                          _kernel_rounded(args, gy, torch.float32, torch.float64)):
        assert torch.equal(x, e), name


@pytest.mark.parametrize("value", ["0", "-3", "1e6", "abc"])
def test_bad_float32_max_t_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("CUDA_WKV_FLOAT32_MAX_T", value)
    args = _inputs(1, 5, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"CUDA_WKV_FLOAT32_MAX_T='{re.escape(value)}' is invalid: expected "
                                         "an integer in \\[1, "):
        bi_wkv(*args)
    monkeypatch.setenv("CUDA_WKV_FLOAT32_MAX_T", " ")  # blank: the default
    assert dispatch.float32_max_t() == cuda_wkv.FLOAT32_KERNEL_MAX_T == 262144


def test_float32_beyond_the_limit_is_float64_rounded(cpu_kernel, monkeypatch):
    """At the shipped limit: T = 2^18 + 1 in float32 runs the float64 kernel (its values and
    gradients rounded to float32, bit for bit)."""
    monkeypatch.delenv("CUDA_WKV_FLOAT32_MAX_T", raising=False)
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.delenv("CUDA_WKV_CHUNK", raising=False)
    T = cuda_wkv.FLOAT32_KERNEL_MAX_T + 1
    assert T == 262145
    args = _inputs(1, T, 2, wT=10.0, kscale=2.0, dtype=torch.float32, seed=13)
    gy = torch.randn(1, T, 2, generator=torch.Generator().manual_seed(14))
    got = _kernel_grads(args, gy)
    for name, x, e in zip(["y", "gw", "gu", "gk", "gv"], got,
                          _kernel_rounded(args, gy, torch.float32, torch.float64)):
        assert torch.equal(x, e), name


def test_determinism_across_threads_and_chunks(cpu_kernel, monkeypatch):
    """Bitwise equal for a fixed chunk length whatever the thread count; equal up to
    rounding across chunk lengths."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    w, u, k, v = _inputs(2, 3001, 19, wT=20.0, kscale=3.0, dtype=torch.float32, seed=9)
    gy = torch.randn(2, 3001, 19, generator=torch.Generator().manual_seed(2))
    prev = torch.get_num_threads()
    results = {}
    try:
        for chunk in ("7", "500", "1501", ""):  # 1501: two halves
            monkeypatch.setenv("CUDA_WKV_CHUNK", chunk)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results[chunk, threads] = _kernel_grads((w, u, k, v), gy)
    finally:
        torch.set_num_threads(prev)
    for chunk in ("7", "500", "1501", ""):
        for a, b in zip(results[chunk, 1], results[chunk, 2]):
            assert torch.equal(a, b), chunk
    for chunk in ("7", "500", "1501"):
        assert not torch.equal(results[chunk, 1][0], results["", 1][0])  # other summation
        for a, b in zip(results[chunk, 1], results["", 1]):
            assert _rel_err(a, b.double()) < 3e-5


# ------------------------------------------------------------------- extreme inputs
@pytest.mark.parametrize("backend", ["auto", "torch"], indirect=True)
@pytest.mark.parametrize("chunk", ["1", "3", "7", "", "half"])
def test_a_nan_key_makes_its_lane_nan_like_the_definition(backend, monkeypatch, chunk):
    """A NaN key enters every output of its lane (each is a softmax over all positions, as the dense
    reference): no sum holding it may pass for an empty one; the other lanes are untouched."""
    monkeypatch.setenv("CUDA_WKV_CHUNK", _chunk_env(chunk, 40))
    w, u, k, v = _inputs(2, 40, 3, wT=3.0, kscale=2.0, seed=22)
    k[0, 10, 0] = k[1, 39, 2] = math.nan
    ref = bi_wkv_dense(w, u, k, v)
    lanes = torch.zeros_like(ref, dtype=torch.bool)
    lanes[0, :, 0] = lanes[1, :, 2] = True
    assert torch.isnan(ref[lanes]).all() and torch.isfinite(ref[~lanes]).all()
    for dtype in (torch.float64, torch.float32):
        y = bi_wkv(*(x.to(dtype) for x in (w, u, k, v))).double()
        assert torch.isnan(y[lanes]).all(), (dtype, int(torch.isnan(y[lanes]).sum()))
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert (y[~lanes] - ref[~lanes]).abs().max().item() <= tol * 3


@pytest.mark.parametrize("backend", ["auto", "torch"], indirect=True)
@pytest.mark.parametrize("chunk", ["3", "", "half"])
def test_zero_weight_lane_is_nan_like_the_definition(backend, monkeypatch, chunk):
    """A lane whose weights are all e^{-inf} = 0 gives NaN (0/0, as the dense reference);
    -inf keys elsewhere are just zero weights; the other lanes are untouched."""
    monkeypatch.setenv("CUDA_WKV_CHUNK", _chunk_env(chunk, 40))
    w, u, k, v = _inputs(2, 40, 3, wT=3.0, kscale=2.0, seed=21)
    k[0, :, 1] = -math.inf  # every weight of lane (0, 1) is 0
    k[1, ::3, 2] = -math.inf  # some zero weights in lane (1, 2)
    ref = bi_wkv_dense(w, u, k, v)
    assert torch.isnan(ref[0, :, 1]).all()
    for dtype in (torch.float64, torch.float32):
        y = bi_wkv(*(x.to(dtype) for x in (w, u, k, v))).double()
        assert torch.isnan(y[0, :, 1]).all()
        mask = torch.ones_like(y, dtype=torch.bool)
        mask[0, :, 1] = False
        assert torch.isfinite(y[mask]).all()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert (y[mask] - ref[mask]).abs().max().item() <= tol * 3


@pytest.mark.parametrize("chunk", ["3", "", "half"])
def test_zero_weight_keys_gradients(cpu_kernel, monkeypatch, chunk):
    """Gradients with some k = -inf equal the dense reference's (zero for those keys)."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.setenv("CUDA_WKV_CHUNK", _chunk_env(chunk, 30))
    w, u, k, v = _inputs(2, 30, 3, wT=3.0, kscale=2.0, seed=22)
    k[:, ::4, :] = -math.inf
    gy = torch.randn(2, 30, 3, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
    ref = torch.autograd.grad(bi_wkv_dense(*leaves), leaves, gy)
    got = _kernel_grads((w, u, k, v), gy)
    for name, g, r in zip("wukv", got[1:], ref):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", ["3", "", "half"])
def test_huge_values_do_not_overflow(cpu_kernel, monkeypatch, chunk):
    """v = +-3e38 (finite float32): y is a convex combination of v, so it is finite and
    matches the float64 reference to float32 rounding."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.setenv("CUDA_WKV_CHUNK", _chunk_env(chunk, 50))
    w, u, k, v = _inputs(2, 50, 4, wT=2.0, kscale=0.5, seed=23)
    v = torch.where(v > 0, 3e38, -3e38).double()
    v[:, ::5] = 3e38
    ref = bi_wkv_dense(w, u, k, v)
    y = bi_wkv(*(x.float() for x in (w, u, k, v)))
    assert torch.isfinite(y).all()
    assert (y.double() - ref).abs().max().item() <= 1e-5 * 3e38


@pytest.mark.parametrize("chunk", ["3", "", "half"])
def test_an_infinite_value_gives_infinite_outputs_not_nan(cpu_kernel, monkeypatch, chunk):
    """One v = +inf in a lane: every output of that lane is +inf, as the dense reference gives
    (every weight is positive), in float32 and float64 -- the mean's update keeps an infinite
    major part infinite (inf - inf * f would be NaN)."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.setenv("CUDA_WKV_CHUNK", _chunk_env(chunk, 200))
    w, u, k, v = _inputs(1, 200, 4, wT=2.0, kscale=1.0, seed=31)
    v[0, 77, 1] = math.inf
    ref = bi_wkv_dense(w, u, k, v)
    assert torch.isposinf(ref[0, :, 1]).all()
    for dtype in (torch.float32, torch.float64):
        y = bi_wkv(*(x.to(dtype) for x in (w, u, k, v)))
        assert torch.isposinf(y[0, :, 1]).all(), (dtype, int(torch.isnan(y).sum()))
        others = [0, 2, 3]
        assert torch.isfinite(y[:, :, others]).all()
        assert _rel_err(y[:, :, others].double(), ref[:, :, others]) <= (1e-5 if dtype == torch.float32 else 1e-11)


# ------------------------------------------------------------ dispatch / validation
def test_backend_selection(monkeypatch, cpu_kernel):
    x = torch.zeros(1, 2, 3)
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    assert cuda_wkv.backend_for(x) == "cpu"
    monkeypatch.setenv("CUDA_WKV_BACKEND", "torch")
    assert cuda_wkv.backend_for(x) == "torch"
    monkeypatch.setenv("CUDA_WKV_BACKEND", " CPU ")
    assert cuda_wkv.backend_for(x) == "cpu"
    monkeypatch.setenv("CUDA_WKV_BACKEND", "cuda")
    with pytest.raises(ValueError, match="CUDA_WKV_BACKEND=cuda"):
        cuda_wkv.backend_for(x)
    monkeypatch.setenv("CUDA_WKV_BACKEND", "gpu")
    with pytest.raises(ValueError, match="CUDA_WKV_BACKEND='gpu'.*auto, cpu, cuda, torch"):
        bi_wkv(torch.zeros(3), torch.zeros(3), x, x)


def test_forced_torch_backend_matches(monkeypatch, cpu_kernel):
    w, u, k, v = _inputs(2, 100, 5, wT=3.0)
    y_kernel = bi_wkv(w, u, k, v)
    monkeypatch.setenv("CUDA_WKV_BACKEND", "torch")
    y_torch = bi_wkv(w, u, k, v)
    torch.testing.assert_close(y_kernel, y_torch, rtol=1e-10, atol=1e-10)


def test_kernel_checks_its_own_arguments(cpu_kernel):
    """Called directly (not through bi_wkv), the C++ kernel still refuses bad tensors with a clear message
    (the checks in csrc/wkv_checks.h, shared with the CUDA binding)."""
    w, u, k, v = _inputs(2, 6, 3)
    with pytest.raises(RuntimeError, match=r"wkv_cpu: k must be \(B, T, C\)"):
        cpu_kernel.forward(w, u, k[0], v[0])
    with pytest.raises(RuntimeError, match=r"wkv_cpu: w must be \(C,\) = \(3,\)"):
        cpu_kernel.forward(w[:2].contiguous(), u, k, v)
    with pytest.raises(RuntimeError, match="wkv_cpu: tensors must be contiguous"):
        cpu_kernel.forward(w, u, k.transpose(0, 1).contiguous().transpose(0, 1), v)
    with pytest.raises(RuntimeError, match="wkv_cpu: dtypes must match"):
        cpu_kernel.forward(w.float(), u, k, v)
    with pytest.raises(RuntimeError, match="wkv_cpu: float32 or float64 expected"):
        cpu_kernel.forward(w.half(), u.half(), k.half(), v.half())
    y, m, r = cpu_kernel.forward(w, u, k, v)
    with pytest.raises(RuntimeError, match="wkv_cpu backward: saved tensors / grad must match k"):
        cpu_kernel.backward(w, u, k, v, y, m, r, torch.ones_like(y)[:, :-1])


def test_input_validation():
    w, u, k, v = _inputs(2, 4, 3)
    with pytest.raises(ValueError, match=r"k must have shape \(B, T, C\)"):
        bi_wkv(w, u, k[0], v[0])
    with pytest.raises(ValueError, match="v must have the same shape"):
        bi_wkv(w, u, k, v[:, :3])
    with pytest.raises(ValueError, match=r"w must have shape \(C,\) = \(3,\)"):
        bi_wkv(w[:2], u, k, v)
    with pytest.raises(ValueError, match=r"u must have shape \(C,\)"):
        bi_wkv(w, u.reshape(1, 3), k, v)
    with pytest.raises(ValueError, match="same device.*w: meta"):
        bi_wkv(w.to("meta"), u, k, v)
    with pytest.raises(TypeError, match="k must be a floating-point"):
        bi_wkv(w, u, k.long(), v)
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        bi_wkv(w, 1.0, k, v)


def test_empty_batch():
    w, u, k, v = _inputs(0, 4, 3)
    y = bi_wkv(w, u, k, v)
    assert y.shape == (0, 4, 3)


def test_noncontiguous_inputs(cpu_kernel):
    w, u, k, v = _inputs(2, 40, 6, wT=2.0)
    kt = k.transpose(0, 1).contiguous().transpose(0, 1)
    vs = torch.cat([v, v], dim=2)[:, :, ::2]
    torch.testing.assert_close(bi_wkv(w, u, kt, vs), bi_wkv_dense(w, u, k, vs))


@pytest.mark.parametrize("allow_unused", [False, True])
def test_double_backward_through_the_kernel_is_a_clear_error(cpu_kernel, monkeypatch, allow_unused):
    """Differentiating the kernel's gradients again (a gradient penalty) raises an error that says
    so and names the way out -- never a silent None / zero gradient."""
    monkeypatch.setenv("CUDA_WKV_BACKEND", "cpu")
    w, u, k, v = (x.requires_grad_() for x in _inputs(1, 9, 4, wT=2.0))
    grads = torch.autograd.grad(bi_wkv(w, u, k, v).sum(), (w, u, k, v), create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward.*CUDA_WKV_BACKEND=torch"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), (w, u, k, v), allow_unused=allow_unused)
    monkeypatch.setenv("CUDA_WKV_BACKEND", "torch")  # the way out works
    grads = torch.autograd.grad(bi_wkv(w, u, k, v).sum(), (w, u, k, v), create_graph=True)
    assert all(g is not None for g in torch.autograd.grad(sum(g.square().sum() for g in grads), (w, u, k, v)))


def test_kernel_under_activation_checkpointing(cpu_kernel, monkeypatch):
    """GLSP recomputes its branch (torch.utils.checkpoint): the kernel's backward unpacks its
    saved tensors once, as checkpointing requires, and gives the gradients of a plain call."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setenv("CUDA_WKV_BACKEND", "cpu")
    args = [x.requires_grad_() for x in _inputs(2, 17, 3, wT=2.0, seed=4)]
    plain = torch.autograd.grad(bi_wkv(*args).square().sum(), args)
    recomputed = torch.autograd.grad(checkpoint(bi_wkv, *args, use_reentrant=False).square().sum(), args)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tracers_record_the_kernel_op(cpu_kernel, monkeypatch):
    """make_fx records the kernel as the custom op (a graph that recomputes on new inputs), and
    FakeTensorMode gets shapes from its fake implementation: a traced call never runs the
    extension directly, whose outputs a tracer could not see."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setenv("CUDA_WKV_BACKEND", "cpu")
    gm = make_fx(bi_wkv)(*_inputs(2, 17, 3, wT=2.0, seed=1))
    assert "cuda_wkv.bi_wkv_forward" in str(gm.graph)
    fresh = _inputs(2, 17, 3, wT=2.0, seed=2)
    torch.testing.assert_close(gm(*fresh), bi_wkv_dense(*fresh), rtol=1e-10, atol=1e-10)
    with FakeTensorMode() as mode:
        y = bi_wkv(*(mode.from_tensor(x) for x in fresh))
    assert y.shape == (2, 17, 3) and y.dtype == torch.float64


def test_backward_allocates_no_zero_gradients_for_the_saved_outputs(cpu_kernel, monkeypatch):
    """m and r are outputs of the kernel op that never get gradients: the backward must not be
    handed (B, T, C) tensors of zeros for them (two extra writes of the sequence per call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ZeroFills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if "zero" in name or "fill" in name or "full" in name:
                self.shapes += [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                self.shapes += [tuple(a) for a in args if isinstance(a, (list, tuple))]
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv("CUDA_WKV_BACKEND", "cpu")
    w, u, k, v = (x.requires_grad_() for x in _inputs(2, 33, 5, wT=2.0))
    gy = torch.randn(2, 33, 5)
    with ZeroFills() as log:
        grads = torch.autograd.grad(bi_wkv(w, u, k, v), (w, u, k, v), gy)
    assert (2, 33, 5) not in log.shapes, log.shapes
    reference = torch.autograd.grad(bi_wkv_scan(w, u, k, v), (w, u, k, v), gy)
    for g, ref in zip(grads, reference):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph(cpu_kernel):
    """The kernels are torch.library custom ops: torch.compile keeps them in one graph."""
    if getattr(torch.library, "custom_op", None) is None:
        pytest.skip("torch.library.custom_op not available")
    w, u, k, v = _inputs(2, 50, 8, wT=2.0, dtype=torch.float32)

    def f(w_, u_, k_, v_):
        return bi_wkv(w_, u_, k_, v_).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves)
    leaves2 = [x.clone().requires_grad_() for x in (w, u, k, v)]
    out2 = f(*leaves2)
    grads2 = torch.autograd.grad(out2, leaves2)
    torch.testing.assert_close(out, out2)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------- AMP / dtype
@pytest.mark.parametrize("backend", ["auto", "torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_round_trip(backend, dtype):
    w, u, k, v = _inputs(2, 64, 8, wT=3.0, dtype=torch.float32)
    kl, vl = k.to(dtype).requires_grad_(), v.to(dtype).requires_grad_()
    wl, ul = w.clone().requires_grad_(), u.clone().requires_grad_()
    y = bi_wkv(wl, ul, kl, vl)
    assert y.dtype == dtype
    ref = bi_wkv_dense(w.double(), u.double(), kl.double(), vl.double())
    assert (y.double() - ref).abs().max().item() < 2e-2
    y.float().square().sum().backward()
    assert kl.grad.dtype == dtype and vl.grad.dtype == dtype
    assert wl.grad.dtype == torch.float32 and ul.grad.dtype == torch.float32


def test_autocast_cpu(cpu_kernel):
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 32, 8)
    w = torch.full((8,), 0.05, requires_grad=True)
    u = torch.zeros(8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k = lin(x)
        assert k.dtype == torch.bfloat16
        y = bi_wkv(w, u, k, k)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    assert w.grad is not None and torch.isfinite(w.grad).all()


# ------------------------------------------------------------------------------ CUDA
@needs_gpu
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 33, 3), (3, 1000, 64), (1, 4099, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("wT", [0.0, 10.0, -10.0])
def test_cuda_values_vs_dense(shape, wT, monkeypatch):
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    assert cuda_wkv.backend_for(torch.zeros(1, device="cuda")) == "cuda"
    w, u, k, v = _inputs(*shape, wT=wT, kscale=2.0, seed=4)
    ref = bi_wkv_dense(w, u, k, v)
    for dtype in (torch.float64, torch.float32):
        y = bi_wkv(*(x.to("cuda", dtype) for x in (w, u, k, v)))
        assert y.device.type == "cuda" and y.dtype == dtype
        err = (y.double().cpu() - ref).abs().max().item()
        assert err <= _tol(dtype, v), (dtype, err)


@needs_gpu
@pytest.mark.parametrize("T, C, wT, kscale", [(4099, 3, 1e2, 2.0), (4099, 3, 1e4, 2.0), (4099, 3, 1e4, 10.0),
                                              (4099, 3, -1e2, 10.0), (32768, 4, 10.0, 2.0)],
                         ids=["T4099-wT1e2", "T4099-wT1e4", "T4099-wT1e4-k10", "T4099-wT-1e2-k10",
                              "T32768-wT10"])
def test_cuda_float32_accuracy_vs_float64(T, C, wT, kscale, monkeypatch):
    """The accuracy target on the hardware: float32 values and all four gradients within 1e-5 of the
    float64 kernel on the same rounded inputs (the kernel's exps and logs come from the GPU's
    approximations, ex2.approx / lg2.approx; test_wkv_cuda_host.py checks models of them on the CPU)."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    w, u, k, v = _inputs(1, T, C, wT=abs(wT), kscale=kscale, seed=11, w_sign=1 if wT > 0 else -1)
    gy = torch.randn(1, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    rounded = [x.float().to("cuda") for x in (w, u, k, v, gy)]
    got = _kernel_grads(rounded[:4], rounded[4])
    ref = _kernel_grads([x.double() for x in rounded[:4]], rounded[4].double())
    errors = {name: _rel_err(x.double().cpu(), r.cpu()) for name, x, r in zip(["y", "gw", "gu", "gk", "gv"], got, ref)}
    print(f"float32 vs float64 on {torch.cuda.get_device_name()}: " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    assert all(e <= 1e-5 for e in errors.values()), errors  # every column, for the run's record


@needs_gpu
def test_cuda_resident_threads_are_whole_blocks_within_the_sm(monkeypatch):
    """The automatic chunk length counts the threads an SM keeps resident for the chunk kernels:
    whole 128-thread blocks, at least one, at most the SM's thread limit; 4 blocks in float32 on
    sm_90 (__launch_bounds__(128, 4))."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    ext = loader.load_extension("cuda")
    assert ext is not None, loader.failure_reason("cuda")
    limit = torch.cuda.get_device_properties(0).max_threads_per_multi_processor
    for dbl in (False, True):
        per_sm = ext.resident_threads_per_sm(dbl)
        assert per_sm % 128 == 0 and 128 <= per_sm <= limit, (dbl, per_sm)
    if torch.cuda.get_device_capability(0) == (9, 0):
        assert ext.resident_threads_per_sm(False) >= 512


@needs_gpu
def test_cuda_gradients_and_determinism(monkeypatch):
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    w, u, k, v = _inputs(2, 300, 19, wT=5.0, kscale=2.0, seed=7)
    gy = torch.randn(2, 300, 19, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
    ref = torch.autograd.grad(bi_wkv_dense(*leaves), leaves, gy)
    for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 2e-4)):
        outs = []
        for _ in range(2):
            leaves = [x.to("cuda", dtype).requires_grad_() for x in (w, u, k, v)]
            outs.append(torch.autograd.grad(bi_wkv(*leaves), leaves, gy.to("cuda", dtype)))
        for name, g, g2, r in zip("wukv", outs[0], outs[1], ref):
            assert torch.equal(g, g2), name
            err = (g.double().cpu() - r).abs().max().item()
            assert err <= rtol * max(r.abs().max().item(), 1.0), (name, dtype, err)
    args = [x.to("cuda").requires_grad_() for x in _inputs(2, 6, 3, wT=2.0, seed=1)]
    assert torch.autograd.gradcheck(bi_wkv, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_amp_round_trip(dtype, monkeypatch):
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    w, u, k, v = _inputs(2, 257, 8, wT=3.0, dtype=torch.float32, device="cuda")
    kl, vl = k.to(dtype).requires_grad_(), v.to(dtype).requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        y = bi_wkv(w, u, kl, vl)
    assert y.dtype == dtype
    ref = bi_wkv_dense(w.double(), u.double(), kl.double(), vl.double())
    assert (y.double() - ref).abs().max().item() < 2e-2
    y.float().sum().backward()
    assert kl.grad.dtype == dtype and torch.isfinite(kl.grad.float()).all()


def test_bench_wkv_call_cost_times_each_path(cpu_kernel):
    """``bench_wkv.py --call-cost`` prints one row per way of calling the kernel, each a time."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_wkv.py"
    run = subprocess.run([sys.executable, str(script), "--call-cost", "--repeat", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split("|")[1:3] for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| call")]
    assert [name.strip() for name, _ in rows][:4] == [
        "extension forward", "extension forward + backward", "bi_wkv forward (no grad)",
        "bi_wkv forward + backward (autograd.grad)"]
    assert all(float(us) > 0 for _, us in rows)


def test_bench_wkv_profile_names_the_kernel_calls(cpu_kernel, tmp_path):
    """``bench_wkv.py --profile`` tabulates where one call's time goes; on the CPU the kernel
    calls of the op are rows of their own (on CUDA its kernels are)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_wkv.py"
    run = subprocess.run([sys.executable, str(script), "--T", "512", "--B", "1", "--C", "8", "--backends",
                          "kernel", "--repeat", "1", "--profile", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads((tmp_path / "wkv_cpu.json").read_text())["results"][0]
    fwd_names = {o["name"] for o in row["fwd_ops"]}
    assert "cuda_wkv::forward_kernel" in fwd_names and "cuda_wkv::backward_kernel" not in fwd_names
    assert {"cuda_wkv::forward_kernel", "cuda_wkv::backward_kernel"} <= {o["name"] for o in row["fwd_bwd_ops"]}
    assert "kernel fwd+bwd, T=512: wall" in (tmp_path / "wkv_cpu.md").read_text()


def test_bench_wkv_cuda_table_gives_one_call_and_back_to_back_bandwidth(tmp_path):
    """The CUDA markdown (rows faked; no GPU needed): effective bandwidth per T from the one-call median
    and from calls issued back to back, and the profile's bandwidth on device time, a call's mean."""
    from bench_scripts import load

    bench = load("bench_wkv")
    meta = {"device": "cuda", "dtype": "float32", "B": 2, "C": 128, "command": "bench_wkv.py --device cuda",
            "date": "2026-12-04", "machine": "NVIDIA H200", "torch": "2.11", "threads": 16,
            "load_average": (0.1, 0.1, 0.1), "repeat": 5, "memory_method": "peak", "itemsize": 4,
            "peak_gbps": 4800.0}
    ops = [{"name": "void bwd_rescan_kernel<float>", "ms": 0.2, "share": 2 / 3},
           {"name": "(total)", "ms": 0.3, "share": 1.0}]
    row = {"backend": "kernel", "impl": "cuda", "T": 32768, "fwd_s": 0.2e-3, "fwd_bwd_s": 0.6e-3,
           "fwd_b2b_s": 0.1e-3, "fwd_bwd_b2b_s": 0.3e-3, "fwd_bwd_ops": ops}
    path = tmp_path / "wkv_cuda.md"
    bench.write_markdown(path, meta, [row])
    text = path.read_text()
    # 13 (B, T, C) float32 tensors of 33.55 MB = 436.2 MB per fwd+bwd, 5 = 167.8 MB per forward
    assert "| 32768 | 839 | 17.5 % | 727 | 15.1 % | 1678 | 35.0 % | 1454 | 30.3 % |" in text
    assert "Profile of a call per point, mean of 5" in text
    assert "kernel fwd+bwd, T=32768: wall 0.6 ms; 1454 GB/s on device time = 30.3 % of peak" in text


def test_bench_wkv_targets_report_medians_fastest_runs_and_both_ratios(monkeypatch, capsys):
    """``bench_wkv.py --targets`` (its measured points replaced by fixed (median, fastest) times):
    each time with its fastest run, the ratios by the medians (the targets) and by the fastest
    runs; a point that fails stops the run with its error."""
    import argparse

    from bench_scripts import load

    bench = load("bench_wkv")
    times = {("kernel", 2, 2): (0.030, 0.025), ("lcse", 2, 2): (1.2, 0.9),
             ("kernel", 1, 1): (0.048, 0.046), ("kernel", 1, 2): (0.032, 0.023)}
    calls = []

    def fake_spawn(args, backend, T, modes, rss_allocator=True):
        calls.append((backend, args.B, T, args.C, args.threads, modes, rss_allocator))
        med, fastest = times[(backend, args.B, args.threads)]
        return {"fwd_bwd_s": med, "fwd_bwd_min_s": fastest, "fwd_bwd_runs": 3 if backend == "lcse" else 5}

    monkeypatch.setattr(bench, "_spawn", fake_spawn)
    bench.run_targets(argparse.Namespace(threads=2, repeat=5, max_seconds=30.0))
    out = capsys.readouterr().out
    assert calls == [("kernel", 2, 32768, 64, 2, ["fwd_bwd"], False), ("lcse", 2, 32768, 64, 2, ["fwd_bwd"], False),
                     ("kernel", 1, 262144, 8, 1, ["fwd_bwd"], False), ("kernel", 1, 262144, 8, 2, ["fwd_bwd"], False)]
    assert "median of up to 5 runs" in out
    assert ("kernel 30.0 ms (fastest 25.0 ms, 5 runs), plain logcumsumexp 1200.0 ms (fastest 900.0 ms, 3 runs): "
            "40.0x (target >= 30x; "
            "by the fastest runs 36.0x)") in out
    assert ("1 thread 48.0 ms (fastest 46.0 ms, 5 runs), 2 threads 32.0 ms (fastest 23.0 ms, 5 runs): 1.50x "
            "(target >= 1.6x; "
            "by the fastest runs 2.00x)") in out

    monkeypatch.setattr(bench, "_spawn", lambda *a, **k: {"error": "kernel unavailable: fell back to torch"})
    with pytest.raises(SystemExit, match="kernel T=32768 failed: kernel unavailable"):
        bench.run_targets(argparse.Namespace(threads=2, repeat=5, max_seconds=30.0))


def test_bench_wkv_accuracy_writes_both_tables(cpu_kernel, tmp_path, monkeypatch):
    """``bench_wkv.py --accuracy`` (here on one small case of each kind): the dense-reference table
    and the long-sequence table (float32 vs float64 of each backend), every error a small number."""
    import json

    from bench_scripts import load

    bench = load("bench_wkv")
    monkeypatch.delenv("CUDA_WKV_CHUNK", raising=False)
    monkeypatch.setattr(bench, "ACC_CASES", [(1, 50, 3, 10.0, 3.0)])
    monkeypatch.setattr(bench, "LONG_ACC_CASES", [(1, 1100, 5, 1.0)])
    bench.run_accuracy("cpu", tmp_path)
    data = json.loads((tmp_path / "wkv_accuracy_cpu.json").read_text())
    assert [(r["backend"], r["dtype"]) for r in data["dense"]] == [
        ("kernel", "float32"), ("kernel", "float64"), ("scan", "float32"), ("scan", "float64")]
    assert [(r["backend"], r["impl"]) for r in data["long"]] == [("kernel", "cpu"), ("scan", "torch")]
    assert data["long"][0]["chunks"] == [220, 1100]  # float32's chunks are capped (five of 220), float64's not
    for r in data["dense"] + data["long"]:
        tol = 1e-9 if r.get("dtype") == "float64" else 1e-4
        assert all(0 <= r[c] <= tol for c in ("y", "gw", "gu", "gk", "gv")), r
    md = (tmp_path / "wkv_accuracy_cpu.md").read_text()
    assert "## T = 1100 vs the float64 kernel" in md and "| 1×1100×5 | 1 | kernel (cpu) | 220 / 1100 |" in md


def test_bench_wkv_chunk_sweep_writes_its_table(cpu_kernel, tmp_path, monkeypatch):
    """``bench_wkv.py --chunk-sweep`` (one draw, two |w|T, a short sequence): one row per forced
    chunk length and one of bi_wkv, each with five small errors; the forced length does not leak
    into the environment, and the caller's CUDA_WKV_CHUNK / CUDA_WKV_BACKEND come back as they
    were."""
    from bench_scripts import load

    bench = load("bench_wkv")
    monkeypatch.delenv("CUDA_WKV_CHUNK", raising=False)
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.setattr(bench, "CHUNK_SWEEP_WT", (1.0, 1000.0))
    assert bench.main(["--chunk-sweep", "--T", "300", "--C", "3", "--seeds", "1", "--chunks", "7",
                       "300", "--out-dir", str(tmp_path)]) == 0
    assert "CUDA_WKV_CHUNK" not in os.environ and "CUDA_WKV_BACKEND" not in os.environ
    monkeypatch.setenv("CUDA_WKV_CHUNK", "5")
    monkeypatch.setenv("CUDA_WKV_BACKEND", "torch")  # the sweep measures the kernel whatever this says
    assert bench.main(["--chunk-sweep", "--T", "300", "--C", "3", "--seeds", "1", "--chunks", "7",
                       "300", "--out-dir", str(tmp_path)]) == 0
    assert os.environ["CUDA_WKV_CHUNK"] == "5" and os.environ["CUDA_WKV_BACKEND"] == "torch"
    md = (tmp_path / "wkv_chunk_sweep_cpu.md").read_text()
    assert "--chunk-sweep --T 300 --C 3 --seeds 1 --chunks 7 300" in md
    rows = re.findall(r"^\| (\d+|bi_wkv) \| (.+) \|$", md, re.M)
    assert [L for L, _ in rows] == ["7", "300", "bi_wkv"]
    for _, cells in rows:
        errs = [float(x) for x in cells.split(" | ")]
        assert len(errs) == 5 and all(0 <= e <= 1e-4 for e in errs), cells
    # beyond CUDA_WKV_FLOAT32_MAX_T = 299 bi_wkv's row is the float64 kernel's rounding
    monkeypatch.setenv("CUDA_WKV_FLOAT32_MAX_T", "299")
    assert bench.main(["--chunk-sweep", "--T", "300", "--C", "3", "--seeds", "1", "--chunks", "7",
                       "--vs-scan", "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "wkv_chunk_sweep_cpu.md").read_text()
    assert "for T > 299 the float64 kernel's results rounded" in md and "--chunks 7 --vs-scan`" in md
    cells = re.search(r"^\| bi_wkv \| (.+) \|$", md, re.M).group(1)
    assert all(0 <= float(x) <= 2 ** -24 for x in cells.split(" | ")), cells
    cells = re.search(r"^\| float64 kernel vs bi_wkv_scan \| (.+) \|$", md, re.M).group(1)
    assert all(0 <= float(x) <= 1e-12 for x in cells.split(" | ")), cells
    # without the compiled kernel there are no chunks to sweep: refused, the environment restored
    import cuda_wkv
    monkeypatch.setattr(cuda_wkv, "backend_for", lambda x, build=True: "torch")
    with pytest.raises(SystemExit, match="--chunk-sweep needs the compiled kernel on cpu, which is not in use"):
        bench.main(["--chunk-sweep", "--T", "300", "--C", "3", "--out-dir", str(tmp_path)])
    assert os.environ["CUDA_WKV_CHUNK"] == "5" and os.environ["CUDA_WKV_BACKEND"] == "torch"

"""The pure-PyTorch fallback ``cuda_wkv.bi_wkv_scan`` against the float64 dense reference:
values and gradients, float32 accuracy that depends neither on outliers in ``v`` nor, for
decay (w > 0), on ``|w| * T``, the extreme-input contract (NaN where the definition is 0/0, finite where the
exact result is finite) and O(T) autograd memory."""
from __future__ import annotations

import math

import pytest
import torch

from cuda_wkv import bi_wkv_dense, bi_wkv_scan
from test_wkv import _inputs

EPS32 = torch.finfo(torch.float32).eps


def _float32_case(w, u, k, v):
    """The inputs rounded to float32, the float32 result and the exact (float64) result
    for those same rounded inputs."""
    f32 = [x.float() for x in (w, u, k, v)]
    return bi_wkv_scan(*f32).double(), bi_wkv_dense(*(x.double() for x in f32)), f32


@pytest.mark.parametrize("T", [1, 2, 31, 33, 1000, 4099])
@pytest.mark.parametrize("C", [1, 3])
def test_values_vs_dense(T, C):
    w, u, k, v = _inputs(2, T, C, wT=10.0, kscale=2.0, seed=T * 7 + C)
    ref = bi_wkv_dense(w, u, k, v)
    y = bi_wkv_scan(w, u, k, v)
    assert y.dtype == torch.float64 and y.shape == k.shape
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    y32, ref32, _ = _float32_case(w, u, k, v)
    assert (y32 - ref32).abs().max().item() <= 1e-6


def test_dtypes_follow_the_inputs():
    w, u, k, v = _inputs(1, 20, 2)
    assert bi_wkv_scan(w.float(), u.float(), k.float(), v.float()).dtype == torch.float32
    assert bi_wkv_scan(w.float(), u.float(), k.half(), v.half()).dtype == torch.float16
    assert bi_wkv_scan(w, u.float(), k.float(), v.float()).dtype == torch.float32  # float64 inside
    assert bi_wkv_scan(w.float(), u.float(), k, v).dtype == torch.float64
    assert bi_wkv_scan(w, u, k[:0], v[:0]).shape == (0, 20, 2)


def test_outlier_in_v_does_not_spoil_the_lane():
    """float32, T = 4096, one v = -1e4: the rounding error at each position is a few ulp of
    sum_i P_ti |v_i| (what the outlier actually contributes there), not of the outlier.
    (Shifting v by min(v) - 1, as the previous fallback did, gave 2.5e-2 across the lane.)"""
    w, u, k, v = _inputs(1, 4096, 3, wT=10.0, seed=1, w_sign=1.0)
    v[0, 2000, :] = -1e4
    y32, ref, f32 = _float32_case(w, u, k, v)
    w_, u_, k_, v_ = (x.double() for x in f32)
    weight_of_abs_v = bi_wkv_dense(w_, u_, k_, v_.abs())  # sum_i P_ti |v_i|
    err = (y32 - ref).abs()
    assert (err <= 32 * EPS32 * weight_of_abs_v).all(), (err / weight_of_abs_v).max().item()
    far = torch.cat([err[0, :1000], err[0, 3000:]])
    assert far.max().item() < 2e-6


@pytest.mark.parametrize("wT", [1e2, 1e3, 1e4, 1e5])
def test_float32_accuracy_independent_of_w_times_T(wT):
    """Decay w > 0 with |w| * T up to 1e5 at T = 4096: the float32 error stays at the level
    of |w| * T ~ 1 (a model anchored at t = 0 loses ~eps * |w| * T: 1.7e-4 at |w| T = 4096)."""
    w, u, k, v = _inputs(1, 4096, 4, wT=wT, kscale=2.0, seed=2, w_sign=1.0)
    w[0] = wT / 4096  # the largest decay of the range is always present
    y32, ref, _ = _float32_case(w, u, k, v)
    assert (y32 - ref).abs().max().item() <= 2e-6 * v.abs().max().item()


def test_negative_w_large_k():
    """Growth with distance (w < 0) and |k| up to 30: finite, accurate in float64."""
    w, u, k, v = _inputs(2, 500, 3, wT=40.0, seed=3, w_sign=-1.0)
    k = k / k.abs().max() * 30.0
    ref = bi_wkv_dense(w, u, k, v)
    torch.testing.assert_close(bi_wkv_scan(w, u, k, v), ref, rtol=1e-10, atol=1e-10)
    y32, ref32, _ = _float32_case(w, u, k, v)
    assert torch.isfinite(y32).all() and (y32 - ref32).abs().max().item() < 1e-4


def test_lane_without_any_weight_is_nan_like_the_definition():
    """Every k of a lane -inf: 0/0 at every position of that lane (as bi_wkv_dense); other
    lanes unaffected; a lane with only some k = -inf is finite and exact."""
    w, u, k, v = _inputs(2, 37, 3, wT=5.0, seed=4)
    k[0, :, 1] = -math.inf
    k[1, 5:30, 2] = -math.inf
    ref = bi_wkv_dense(w, u, k, v)
    for dtype in (torch.float64, torch.float32):
        y = bi_wkv_scan(*(x.to(dtype) for x in (w, u, k, v))).double()
        assert torch.isnan(y[0, :, 1]).all() and torch.isnan(ref[0, :, 1]).all()
        nan_lane = torch.zeros_like(y, dtype=torch.bool)
        nan_lane[0, :, 1] = True
        assert torch.isfinite(y[~nan_lane]).all()
        torch.testing.assert_close(y[~nan_lane], ref[~nan_lane], rtol=1e-5, atol=1e-5)
    # u = -inf too: at T = 1 the only weight is e^{u + k} = 0
    one = [torch.zeros(1, dtype=torch.float64), torch.tensor([-math.inf], dtype=torch.float64),
           torch.zeros(1, 1, 1, dtype=torch.float64), torch.ones(1, 1, 1, dtype=torch.float64)]
    assert torch.isnan(bi_wkv_scan(*one)).all() and torch.isnan(bi_wkv_dense(*one)).all()


def test_some_weights_zero_gradients_match_dense():
    w, u, k, v = _inputs(2, 40, 3, wT=5.0, seed=5)
    k[1, :25, 0] = -math.inf
    k[0, 10, 2] = -math.inf
    gy = torch.randn(k.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
    ref = torch.autograd.grad(bi_wkv_dense(*leaves), leaves, gy)
    leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
    got = torch.autograd.grad(bi_wkv_scan(*leaves), leaves, gy)
    for name, g, r in zip("wukv", got, ref):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("big", [3e38, -3e38])
def test_v_near_float32_max_stays_finite(big):
    w, u, k, v = _inputs(2, 300, 3, wT=5.0, seed=6)
    v = v.clamp(-1, 1) * big
    v[0, 7, 0] = -big  # both signs in one lane
    y32, ref, _ = _float32_case(w, u, k, v)
    assert torch.isfinite(y32).all()
    assert ((y32 - ref).abs() / abs(big)).max().item() < 1e-6
    # the rescaling is by an exact power of two: the same bits as the unscaled problem
    f32 = [x.float() for x in (w, u, k, v)]
    y_scaled_down = bi_wkv_scan(*f32[:3], torch.ldexp(f32[3], torch.tensor(-60)))
    assert torch.equal(torch.ldexp(y_scaled_down, torch.tensor(60)), y32.float())


@pytest.mark.parametrize("shape,wT", [((2, 5, 3), 2.0), ((1, 1, 2), 1.0), ((2, 9, 4), -4.0),
                                      ((3, 17, 2), 8.0), ((1, 6, 2), 60.0)])
def test_gradcheck(shape, wT):
    w, u, k, v = _inputs(*shape, wT=wT, kscale=1.5, seed=11)
    args = [x.clone().requires_grad_() for x in (w, u, k, v)]
    assert torch.autograd.gradcheck(bi_wkv_scan, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_float32_gradients_at_large_w_times_T():
    w, u, k, v = _inputs(1, 2048, 3, wT=1e3, kscale=2.0, seed=8, w_sign=1.0)
    gy = torch.randn(k.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    f32 = [x.float() for x in (w, u, k, v)]
    leaves = [x.double().requires_grad_() for x in f32]
    ref = torch.autograd.grad(bi_wkv_dense(*leaves), leaves, gy)
    leaves = [x.clone().requires_grad_() for x in f32]
    got = torch.autograd.grad(bi_wkv_scan(*leaves), leaves, gy.float())
    for name, g, r in zip("wukv", got, ref):
        assert g.dtype == torch.float32
        err = (g.double() - r).abs().max().item()
        assert err <= 1e-5 * max(r.abs().max().item(), 1.0), (name, err)


def _saved_bytes(T):
    """Bytes of distinct storages autograd keeps for the backward of one call."""
    w, u, k, v = (x.float().requires_grad_() for x in _inputs(1, T, 4, seed=9))
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bi_wkv_scan(w, u, k, v)
    return sum(storages.values())


def test_autograd_memory_is_linear_in_T():
    """The pairwise scan keeps O(T) for the backward (a log-step doubling scan would keep
    O(T log T): the ratio below would be ~8 * 13/10)."""
    small, large = _saved_bytes(1024), _saved_bytes(8192)
    assert large / small < 8.5, (small, large)
    assert large <= 48 * 8192 * 4 * 4  # < 48 float32 values per input element

"""Elliptical attention: both metrics against their explicit formulas (float64), reductions, and use in PVT."""
import math

import pytest
import torch
from torch import nn

from nnunetv2_ext.blocks.elliptical_attention import (MetricAttention, diagonal_metric, key_metric_cholesky,
                                                      mahalanobis_attention)
from nnunetv2_ext.blocks.pvt import PVTStage

B, H, NQ, NK, D = 2, 3, 7, 9, 4


def _qkv(seed=0, nk=NK, d=D):
    torch.manual_seed(seed)
    return (torch.randn(B, H, NQ if i == 0 else nk, d, dtype=torch.float64) for i in range(3))


def _plain(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def test_diagonal_metric_equals_explicit_formula():
    q, k, v = _qkv()
    v_prev = v + torch.randn_like(v) * torch.tensor([0.1, 1.0, 0.5, 2.0], dtype=torch.float64)
    out = MetricAttention('elliptical')(q, k, v, v_prev)
    m = (v - v_prev).abs().mean(dim=2, keepdim=True)
    m = m / m.amax(dim=-1, keepdim=True)
    assert torch.all(m > 0) and torch.all(m <= 1) and torch.any(m == 1)
    # Mahalanobis form: softmax(qᵀ diag(m) k / √D) (the diagonal metric as a quadratic form)
    scores = torch.einsum('bhqd,bhd,bhkd->bhqk', q, m[:, :, 0], k) / math.sqrt(D)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diagonal_metric(v, v_prev), m)


def test_unit_metric_and_first_layer_are_plain_attention():
    q, k, v = _qkv(1)
    plain = MetricAttention('softmax')(q, k, v)
    torch.testing.assert_close(plain, _plain(q, k, v), rtol=1e-10, atol=1e-12)
    ell = MetricAttention('elliptical')
    torch.testing.assert_close(ell(q, k, v, None), plain)                  # first layer: no previous values
    torch.testing.assert_close(ell(q, k, v, v + 0.3), plain)               # |Δv| equal in every d -> m ≡ 1
    torch.testing.assert_close(ell(q, k, v, v), plain)                     # no change at all -> m ≡ 1


def test_diagonal_metric_is_detached():
    q, k, v = (t.requires_grad_() for t in _qkv(2))
    v_prev = torch.randn_like(v)
    MetricAttention('elliptical')(q, k, v, v_prev).sum().backward()
    grad_v = v.grad.clone()
    m = diagonal_metric(v, v_prev)
    assert not m.requires_grad
    v.grad = None
    torch.nn.functional.scaled_dot_product_attention(q * m, k, v).sum().backward()
    torch.testing.assert_close(v.grad, grad_v)


@pytest.mark.parametrize('nk,ridge', [(NK, 0.1), (3, 0.5), (40, 1e-3)])   # nk=3 < D: singular Σ_K
def test_mahalanobis_equals_explicit_formula(nk, ridge):
    q, k, v = _qkv(3, nk=nk)
    out = MetricAttention('mahalanobis', ridge=ridge)(q, k, v)
    centred = k - k.mean(dim=2, keepdim=True)
    cov = centred.transpose(-2, -1) @ centred / (nk - 1)
    lam = ridge * torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1) + 1e-6
    metric = torch.linalg.inv(cov + lam[..., None, None] * torch.eye(D, dtype=torch.float64))
    diff = q[:, :, :, None, :] - k[:, :, None, :, :]                       # (B, H, NQ, NK, D)
    dist = torch.einsum('bhqkd,bhde,bhqke->bhqk', diff, metric, diff)
    expected = torch.softmax(-0.5 * dist / math.sqrt(D), dim=-1) @ v
    torch.testing.assert_close(out, expected, rtol=1e-8, atol=1e-10)
    chol = key_metric_cholesky(k, ridge)
    torch.testing.assert_close(chol @ chol.transpose(-2, -1), torch.linalg.inv(metric))


def test_mahalanobis_under_autocast_and_large_keys():
    q, k, v = (t.float() for t in _qkv(4, nk=64, d=16))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = mahalanobis_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="'cosine' is not one of"):
        MetricAttention('cosine')


def _stage(attention, depth):
    torch.manual_seed(0)
    return PVTStage(2, 8, (2, 2, 2), depth, 2, 2.0, (2, 2, 2), nn.Conv3d, attention).eval()


def test_pvt_stage_uses_previous_values_after_the_first_block():
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        # one block: the first layer attends plainly
        torch.testing.assert_close(_stage('elliptical', 1)(x), _stage('softmax', 1)(x))
        # two blocks: the second one uses the metric from the first block's values
        assert not torch.allclose(_stage('elliptical', 2)(x), _stage('softmax', 2)(x))
        out = _stage('mahalanobis', 2)(x)
    assert out.shape == (1, 8, 4, 4, 4) and torch.isfinite(out).all()

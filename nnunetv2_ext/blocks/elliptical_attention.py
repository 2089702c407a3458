"""Softmax attention with an elliptical (Mahalanobis) metric (Nielsen et al. 2024, arXiv 2406.13770).

Tensors are per head: ``q (B, h, Nq, D)``, ``k, v (B, h, Nk, D)``; every variant runs through
``scaled_dot_product_attention`` (so flash / memory-efficient kernels apply) and returns ``(B, h, Nq, D)``.

* ``'softmax'``: ``softmax(q·k/√D) v``.
* ``'elliptical'`` (the paper's method, default of the option): diagonal metric per sample and head
  ``m_d = mean_n |v_{n,d} − v^{prev}_{n,d}|`` from the values of this layer and of the previous one,
  max-normalised to (0, 1] and detached; ``softmax((q ⊙ m)·k/√D) v``. Without a previous layer
  (the first layer) it is plain softmax attention.
* ``'mahalanobis'`` (a full-metric variant of ours): ``M = (Σ_K + λI)^{-1}`` from the keys' covariance,
  ``softmax(−½·(q−k)ᵀM(q−k)/√D) v = softmax((q'·k' − ½|k'|²)/√D) v`` with ``q' = L⁻¹q``,
  ``k' = L⁻¹k``, ``LLᵀ = Σ_K + λI`` (Cholesky; ``−½ qᵀMq`` is constant per query and cancels).
  ``λ = ridge · tr(Σ_K)/D`` (scale-free; an absolute 1e-6 explodes when ``Nk < D`` makes Σ_K
  singular). The metric is detached, as the paper's. Computed in (at least) float32.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

ATTENTION_VARIANTS = ('softmax', 'elliptical', 'mahalanobis')


def diagonal_metric(v: torch.Tensor, v_prev: torch.Tensor) -> torch.Tensor:
    """``v, v_prev (B, h, N, D)`` -> detached ``m (B, h, 1, D)``: ``mean_n |v − v_prev|`` / its max over D.

    A head whose values did not change at all gets ``m ≡ 1`` (plain attention).
    """
    with torch.no_grad():
        m = (v - v_prev).abs().mean(dim=-2, keepdim=True)
        peak = m.amax(dim=-1, keepdim=True)
        return torch.where(peak > 0, m / peak.clamp_min(torch.finfo(m.dtype).tiny), torch.ones_like(m))


def key_metric_cholesky(k: torch.Tensor, ridge: float) -> torch.Tensor:
    """``k (B, h, N, D)`` -> lower-triangular ``L (B, h, D, D)`` (≥ float32, detached) with
    ``LLᵀ = Σ_K + λI``, ``Σ_K = (K − K̄)ᵀ(K − K̄)/max(N − 1, 1)``,
    ``λ = ridge · tr(Σ_K)/D`` (+ a floor of 1e-6).
    """
    with torch.no_grad(), torch.autocast(k.device.type, enabled=False):
        k = k.to(torch.promote_types(k.dtype, torch.float32))
        centred = k - k.mean(dim=-2, keepdim=True)
        cov = centred.transpose(-2, -1) @ centred / max(k.shape[-2] - 1, 1)
        dim = k.shape[-1]
        lam = ridge * cov.diagonal(dim1=-2, dim2=-1).mean(dim=-1) + 1e-6
        eye = torch.eye(dim, dtype=cov.dtype, device=cov.device)
        return torch.linalg.cholesky(cov + lam[..., None, None] * eye)


def mahalanobis_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ridge: float) -> torch.Tensor:
    """``softmax(−½(q−k)ᵀ(Σ_K + λI)^{-1}(q−k)/√D) v`` via the Cholesky factor and a per-key bias."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    chol = key_metric_cholesky(k, ridge)
    with torch.autocast(q.device.type, enabled=False):
        q_m = torch.linalg.solve_triangular(chol, q.to(chol.dtype).transpose(-2, -1), upper=False).transpose(-2, -1)
        k_m = torch.linalg.solve_triangular(chol, k.to(chol.dtype).transpose(-2, -1), upper=False).transpose(-2, -1)
        bias = (-0.5 * scale) * k_m.pow(2).sum(dim=-1).unsqueeze(-2)           # (B, h, 1, Nk)
    out_dtype = v.dtype
    return F.scaled_dot_product_attention(q_m.to(out_dtype), k_m.to(out_dtype), v, attn_mask=bias.to(out_dtype),
                                          scale=scale)


class MetricAttention(nn.Module):
    """``forward(q, k, v, v_prev=None) -> (B, h, Nq, D)`` for ``variant`` in :data:`ATTENTION_VARIANTS`.

    ``v_prev`` (the previous layer's values, same shape as ``v``) is used by ``'elliptical'`` only.
    """

    def __init__(self, variant: str = 'softmax', ridge: float = 0.1):
        super().__init__()
        if variant not in ATTENTION_VARIANTS:
            raise ValueError(f"attention variant {variant!r} is not one of {ATTENTION_VARIANTS}")
        self.variant, self.ridge = variant, ridge

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                v_prev: torch.Tensor | None = None) -> torch.Tensor:
        if self.variant == 'mahalanobis':
            return mahalanobis_attention(q, k, v, self.ridge)
        if self.variant == 'elliptical' and v_prev is not None:
            q = q * diagonal_metric(v, v_prev).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v)

    def extra_repr(self) -> str:
        return f'variant={self.variant!r}' + (f', ridge={self.ridge}' if self.variant == 'mahalanobis' else '')

"""Vision-RWKV spatial mixing on a flattened image or volume (``VRWKV_SpatialMix``; Duan et al. 2024, Vision-RWKV,
eqs. 4–6, used by RWKV-UNet's GLSP module).

For ``x`` ``(B, T, C)``, ``T = H·W`` (2-D) or ``D·H·W`` (3-D), ``xx = q_shift(x)`` (2-D) or ``q_shift_3d(x)``:

    x_k = x·μ_k + xx·(1 − μ_k)        (same for v, r; μ learnable, shape (1, 1, C))
    k = W_k x_k,  v = W_v x_v,  r = W_r x_r                      (Linear, no bias)
    y = LayerNorm(WKV(decay / T, first / T, k, v))               (bidirectional WKV, docs/wkv.md)
    out = W_o (σ(r) ⊙ y)

WKV is global over all T pixels/voxels at O(T·C) cost (``cuda_wkv.bi_wkv``), computed in float32 even
under AMP. Dividing ``decay`` and ``first`` by T keeps the distance bias of a layer on the same
scale for every patch size.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from cuda_wkv import bi_wkv
from nnunetv2_ext.blocks.common import float32_region
from nnunetv2_ext.blocks.q_shift import Q_SHIFT, SHIFT_GAMMA


def wkv_float32(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``bi_wkv`` computed in (at least) float32 with autocast off; returns ``k``'s dtype."""
    with float32_region(w, u, k, v) as (w, u, k32, v):
        y = bi_wkv(w, u, k32, v)
    return y.to(k.dtype)


def fancy_init(dim: int, layer_id: int, n_layers: int) -> dict[str, torch.Tensor]:
    """Vision-RWKV's depth-dependent initial values, with ``a = layer_id/(n_layers−1)`` and
    ``b = 1 − layer_id/n_layers``, per channel ``c``:

        decay_c = −5 + 8·(c/(C−1))^(0.7 + 1.3a)        first_c = ln 0.3 + 0.5·((c+1) mod 3 − 1)
        μ_k = (c/C)^b,   μ_v = (c/C)^b + 0.3a,   μ_r = (c/C)^(b/2)

    Deeper layers get larger decays (more local) and lean more on the unshifted voxel.
    """
    a = layer_id / max(n_layers - 1, 1)
    b = 1.0 - layer_id / max(n_layers, 1)
    c = torch.arange(dim, dtype=torch.float32)
    ramp = (c / max(dim - 1, 1)) ** (0.7 + 1.3 * a)
    frac = (c / dim).view(1, 1, dim)
    return {
        'spatial_decay': -5.0 + 8.0 * ramp,
        'spatial_first': math.log(0.3) + 0.5 * (torch.remainder(c + 1, 3) - 1),
        'spatial_mix_k': frac ** b,
        'spatial_mix_v': frac ** b + 0.3 * a,
        'spatial_mix_r': frac ** (0.5 * b),
    }


class VRWKV_SpatialMix(nn.Module):
    """Token mixing ``(B, T, C) -> (B, T, C)`` for a sequence that is a flattened ``(H, W)`` image (``ndim=2``)
    or ``(D, H, W)`` volume (``ndim=3``).

    Args:
        dim: channels C.
        layer_id, n_layers: position of this layer among the network's RWKV layers (for :func:`fancy_init`).
        shift: pixels/voxels moved by the q-shift (0 disables the shift: ``x_k = x_v = x_r = x``).
        gamma: fraction of channels per shift direction (None: 1/4 in 2-D as Vision-RWKV, 1/8 in 3-D;
            see :mod:`~nnunetv2_ext.blocks.q_shift`).
        ndim: spatial axes of the grid (2 or 3).
    """

    def __init__(self, dim: int, layer_id: int = 0, n_layers: int = 1, shift: int = 1, gamma: float | None = None,
                 ndim: int = 3):
        super().__init__()
        if ndim not in Q_SHIFT:
            raise ValueError(f"VRWKV_SpatialMix works on 2-D or 3-D grids, got ndim={ndim}")
        self.ndim, self.shift = ndim, shift
        self.gamma = SHIFT_GAMMA[ndim] if gamma is None else gamma
        for name, value in fancy_init(dim, layer_id, n_layers).items():
            setattr(self, name, nn.Parameter(value))
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key_norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``x (B, T, C)`` with ``T = prod(size)``, ``size`` the ``ndim`` grid axes -> ``(B, T, C)``."""
        T = x.shape[1]
        if self.shift > 0:
            xx = Q_SHIFT[self.ndim](x, size, self.shift, self.gamma)
            xk = x * self.spatial_mix_k + xx * (1 - self.spatial_mix_k)
            xv = x * self.spatial_mix_v + xx * (1 - self.spatial_mix_v)
            xr = x * self.spatial_mix_r + xx * (1 - self.spatial_mix_r)
        else:
            xk = xv = xr = x
        k, v, r = self.key(xk), self.value(xv), self.receptance(xr)
        y = self.key_norm(wkv_float32(self.spatial_decay / T, self.spatial_first / T, k, v))
        return self.output(torch.sigmoid(r) * y)

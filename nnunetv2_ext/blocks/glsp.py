"""3-D global-local spatial perception block (GLSP3D) and its parts (DESIGN §3).

``norm_layer`` arguments are factories ``channels -> nn.Module`` (e.g. ``partial(nn.InstanceNorm3d,
affine=True)``), so the network decides the norm (the plans' ``norm_op`` or BatchNorm).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from nnunetv2_ext.blocks.common import NormLayer, as_triple
from nnunetv2_ext.blocks.drop_path import DropPath
from nnunetv2_ext.blocks.spatial_mix import VRWKV_SpatialMix
from nnunetv2_ext.blocks.tokens import grid_to_tokens, tokens_to_grid

DEFAULT_NORM: NormLayer = partial(nn.InstanceNorm3d, affine=True)


class SE3D(nn.Module):
    """Squeeze-and-excitation ``(B, C, D, H, W) -> same``:
    ``x · σ(W₂ ReLU(W₁ mean_{DHW}(x)))`` with ``W₁: C -> max(1, int(C·se_ratio))`` (1×1×1 convs)."""

    def __init__(self, dim: int, se_ratio: float = 0.25):
        super().__init__()
        hidden = max(1, int(dim * se_ratio))
        self.gate = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Conv3d(dim, hidden, 1), nn.ReLU(inplace=True),
                                  nn.Conv3d(hidden, dim, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class Downsample3D(nn.Sequential):
    """``(B, dim_in, D, H, W) -> (B, dim_out, D/s_d, H/s_h, W/s_w)``: conv with kernel = stride
    (non-overlapping patch merging; a 1×1×1 conv for stride 1) followed by a norm."""

    def __init__(self, dim_in: int, dim_out: int, stride: int | Sequence[int], norm_layer: NormLayer = DEFAULT_NORM):
        stride = as_triple(stride)
        super().__init__(nn.Conv3d(dim_in, dim_out, stride, stride=stride), norm_layer(dim_out))


class GLSP3D(nn.Module):
    """``(B, dim_in, D, H, W) -> (B, dim_out, D, H, W)``, with ``C' = round(dim_in·exp_ratio)``:

        x₁ = N(PW_in(x))                                        1×1×1 conv dim_in -> C' + norm
        s  = flat(x₁);  s ← s + DropPath(LN(SpatialMix(s)))     global (WKV) + local (q-shift) mixing
        x₂ = SE(SiLU(N(DW_k(unflat(s)))))                       depthwise k-conv, optional SE3D
        out = x + DropPath(PW_out(x₂))   (dim_in = dim_out, else PW_out(x₂))

    The LayerNorm after SpatialMix starts with weight 0, so the sequence residual is the identity at
    initialisation with well-conditioned gradients (a zeroed SpatialMix output projection instead
    would feed LN an all-zero input, whose Jacobian is ~1/√eps).
    """

    def __init__(self, dim_in: int, dim_out: int, exp_ratio: float = 1.0, se_ratio: float = 0.25,
                 drop_path: float = 0.0, kernel_size: int | Sequence[int] = 3, norm_layer: NormLayer = DEFAULT_NORM,
                 layer_id: int = 0, n_layers: int = 1, shift_gamma: float = 1 / 8):
        super().__init__()
        dim_mid = max(1, round(dim_in * exp_ratio))
        kernel_size = as_triple(kernel_size)
        self.has_skip = dim_in == dim_out
        self.conv1 = nn.Sequential(nn.Conv3d(dim_in, dim_mid, 1), norm_layer(dim_mid))
        self.mix = VRWKV_SpatialMix(dim_mid, layer_id, n_layers, gamma=shift_gamma)
        self.mix_norm = nn.LayerNorm(dim_mid)
        nn.init.zeros_(self.mix_norm.weight)
        self.local = nn.Sequential(
            nn.Conv3d(dim_mid, dim_mid, kernel_size, padding=[k // 2 for k in kernel_size], groups=dim_mid),
            norm_layer(dim_mid), nn.SiLU(),
            SE3D(dim_mid, se_ratio) if se_ratio > 0 else nn.Identity())
        self.proj = nn.Conv3d(dim_mid, dim_out, 1)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        size = h.shape[2:]
        seq = grid_to_tokens(h)  # (B, T, C), T = D·H·W with W fastest
        seq = seq + self.drop_path(self.mix_norm(self.mix(seq, size)))
        h = self.proj(self.local(tokens_to_grid(seq, size)))
        return x + self.drop_path(h) if self.has_skip else h

"""Global-local spatial perception block (GLSP) of RWKV-UNet (Jiang et al. 2025, "RWKV-UNet", Fig. 2) and its
parts, for 2-D or 3-D grids.

Every block takes ``conv_op`` (``nn.Conv2d`` or ``nn.Conv3d``, the plans' ``conv_op``) and ``norm_layer``, a
factory ``channels -> nn.Module`` (:func:`~nnunetv2_ext.blocks.common.norm_factory` of the plans' ``norm_op``;
default: the affine instance norm matching ``conv_op``), as dynamic-network-architectures' blocks do.
``S`` below is the spatial shape, ``(H, W)`` or ``(D, H, W)``.
"""
from __future__ import annotations

from typing import Sequence, Type

import torch
from torch import nn
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, get_matching_pool_op

from nnunetv2_ext.blocks.common import NormLayer, instance_norm_for, per_axis
from nnunetv2_ext.blocks.drop_path import DropPath
from nnunetv2_ext.blocks.spatial_mix import VRWKV_SpatialMix
from nnunetv2_ext.blocks.tokens import grid_to_tokens, tokens_to_grid


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) ``(B, C, *S) -> same``:
    ``x · σ(W₂ ReLU(W₁ mean_S(x)))`` with ``W₁: C -> max(1, int(C·se_ratio))`` (1×1 convs)."""

    def __init__(self, dim: int, se_ratio: float = 0.25, conv_op: Type[nn.Module] = nn.Conv3d):
        super().__init__()
        hidden = max(1, int(dim * se_ratio))
        pool = get_matching_pool_op(conv_op, adaptive=True, pool_type='avg')
        self.gate = nn.Sequential(pool(1), conv_op(dim, hidden, 1), nn.ReLU(inplace=True), conv_op(hidden, dim, 1),
                                  nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class Downsample(nn.Sequential):
    """``(B, dim_in, *S) -> (B, dim_out, *S/stride)``: conv with kernel = stride (non-overlapping patch
    merging; a 1×1 conv for stride 1) followed by a norm."""

    def __init__(self, dim_in: int, dim_out: int, stride: int | Sequence[int], conv_op: Type[nn.Module] = nn.Conv3d,
                 norm_layer: NormLayer | None = None):
        stride = per_axis(stride, convert_conv_op_to_dim(conv_op), 'stride')
        norm_layer = norm_layer or instance_norm_for(conv_op)
        super().__init__(conv_op(dim_in, dim_out, stride, stride=stride), norm_layer(dim_out))


class GLSP(nn.Module):
    """``(B, dim_in, *S) -> (B, dim_out, *S)``, with ``C' = round(dim_in·exp_ratio)``:

        x₁ = N(PW_in(x))                                        1×1 conv dim_in -> C' + norm
        s  = flat(x₁);  s ← s + DropPath(LN(SpatialMix(s)))     global (WKV) + local (q-shift) mixing
        x₂ = SE(SiLU(N(DW_k(unflat(s)))))                       depthwise k-conv, optional SqueezeExcite
        out = x + DropPath(PW_out(x₂))   (dim_in = dim_out, else PW_out(x₂))

    The LayerNorm after SpatialMix starts with weight 0, so the sequence residual is the identity at
    initialisation with well-conditioned gradients (a zeroed SpatialMix output projection instead
    would feed LN an all-zero input, whose Jacobian is ~1/√eps). ``shift_gamma`` None: the q-shift's
    default for the grid's dimension.
    """

    def __init__(self, dim_in: int, dim_out: int, exp_ratio: float = 1.0, se_ratio: float = 0.25,
                 drop_path: float = 0.0, kernel_size: int | Sequence[int] = 3, conv_op: Type[nn.Module] = nn.Conv3d,
                 norm_layer: NormLayer | None = None, layer_id: int = 0, n_layers: int = 1,
                 shift_gamma: float | None = None):
        super().__init__()
        ndim = convert_conv_op_to_dim(conv_op)
        norm_layer = norm_layer or instance_norm_for(conv_op)
        dim_mid = max(1, round(dim_in * exp_ratio))
        kernel_size = per_axis(kernel_size, ndim, 'kernel_size')
        self.has_skip = dim_in == dim_out
        self.conv1 = nn.Sequential(conv_op(dim_in, dim_mid, 1), norm_layer(dim_mid))
        self.mix = VRWKV_SpatialMix(dim_mid, layer_id, n_layers, gamma=shift_gamma, ndim=ndim)
        self.mix_norm = nn.LayerNorm(dim_mid)
        nn.init.zeros_(self.mix_norm.weight)
        self.local = nn.Sequential(
            conv_op(dim_mid, dim_mid, kernel_size, padding=[k // 2 for k in kernel_size], groups=dim_mid),
            norm_layer(dim_mid), nn.SiLU(),
            SqueezeExcite(dim_mid, se_ratio, conv_op) if se_ratio > 0 else nn.Identity())
        self.proj = conv_op(dim_mid, dim_out, 1)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        size = h.shape[2:]
        seq = grid_to_tokens(h)  # (B, T, C), T = prod(S), last axis fastest
        seq = seq + self.drop_path(self.mix_norm(self.mix(seq, size)))
        h = self.proj(self.local(tokens_to_grid(seq, size)))
        return x + self.drop_path(h) if self.has_skip else h

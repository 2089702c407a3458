"""Pyramid Vision Transformer v2 pieces (Wang et al. 2022), native for 2-D and 3-D via ``conv_op``.

Tokens are ``(B, N, C)`` on a grid ``S`` (``N = prod(S)``); every stride / reduction / kernel is per axis, so
anisotropic grids (e.g. nnU-Net's ``(1, 2, 2)`` strides) are handled without a cubic-grid assumption, and with the
plans' kernel of a level (e.g. ``(1, 3, 3)``) the convolutions never mix along an axis nnU-Net does not convolve.
LayerNorm epsilons follow PVTv2 (1e-6 in the blocks and after a stage, PyTorch's 1e-5 in the patch embedding and
the spatial reduction).
"""
from __future__ import annotations

from typing import Sequence, Type

import torch
from torch import nn
from torch.nn import functional as F

from nnunetv2_ext.blocks.common import depthwise_conv, merge_heads, split_heads
from nnunetv2_ext.blocks.drop_path import DropPath
from nnunetv2_ext.blocks.elliptical_attention import MetricAttention
from nnunetv2_ext.blocks.tokens import grid_to_tokens, tokens_to_grid


BLOCK_NORM_EPS = 1e-6  # PVTv2's LayerNorm in the blocks and at the end of a stage


def overlap_kernel(stride: Sequence[int], kernel: Sequence[int] | None = None) -> list[int]:
    """Per-axis kernel of a patch embedding with ``stride`` into a level whose plans conv kernel is ``kernel``
    (default 3 on every axis):

    * ``k > 1`` (nnU-Net convolves this axis): overlapping, ``2s − 1`` (PVTv2's 7 for s = 4, 3 for s = 2),
      ``k`` for ``s = 1``;
    * ``k = 1`` (nnU-Net does not): ``s`` (non-overlapping; 1 for s = 1), so neighbouring slices are not mixed.

    With :func:`embed_padding` the output size is ``ceil(L / s)``. ``overlap_kernel([4, 4, 1], [1, 3, 3])``
    gives ``[4, 7, 3]``.
    """
    kernel = [3] * len(stride) if kernel is None else list(kernel)
    if len(kernel) != len(stride):
        raise ValueError(f"kernel {kernel} and stride {list(stride)} need one entry per axis each")
    return [s if k == 1 else (2 * s - 1 if s > 1 else k) for s, k in zip(stride, kernel)]


def embed_padding(kernel: Sequence[int], stride: Sequence[int]) -> list[int]:
    """Per-axis padding of a patch embedding: ``k // 2`` (overlapping, odd kernels), 0 for ``k = s``
    (non-overlapping patches)."""
    return [0 if k == s else k // 2 for k, s in zip(kernel, stride)]


def reduction_ratios(grid: Sequence[int], target: int) -> list[int]:
    """Per-axis spatial-reduction ratios for a token grid and a PVT ``sr_ratio``.

    Each axis is reduced in proportion to its extent (limit ``target · g_a / max(g)``) so the K/V grid
    is roughly isotropic in tokens, using the largest divisor of ``g_a`` within the limit (no token is
    dropped) that leaves at least 2 K/V tokens along every axis that has 2 or more (with a single key the
    softmax is constant and the queries get no gradient). ``grid (4, 40, 40), target 8 -> (1, 8, 8)``;
    ``grid (8, 8, 8), target 8 -> (4, 4, 4)``.
    """
    longest = max(grid)
    ratios = []
    for g in grid:
        limit = min(max(1, int(target * g / longest)), max(1, g // 2))
        ratios.append(max(r for r in range(1, limit + 1) if g % r == 0))
    return ratios


class OverlapPatchEmbed(nn.Module):
    """``(B, C_in, *S) -> (tokens (B, N, dim), grid)``: strided conv (kernel :func:`overlap_kernel` of ``stride``
    and the plans' ``kernel``, padding :func:`embed_padding`) + LayerNorm (Wang et al. 2022, §3.1)."""

    def __init__(self, in_channels: int, dim: int, stride: Sequence[int], conv_op: Type[nn.Module],
                 kernel: Sequence[int] | None = None):
        super().__init__()
        size = overlap_kernel(stride, kernel)
        self.proj = conv_op(in_channels, dim, size, stride=list(stride), padding=embed_padding(size, stride))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        x = self.proj(x)
        return self.norm(grid_to_tokens(x)), tuple(x.shape[2:])


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys/values come from a reduced grid:

        Q = W_q x;  K, V = W_kv LN(Conv_{kernel=stride=sr}(x))   (no reduction when sr ≡ 1)
        out = W_o attend(Q, K, V)

    ``attend`` is :class:`MetricAttention` (softmax, elliptical or Mahalanobis).
    ``forward(x (B, N, C), grid, v_prev)`` returns ``(out (B, N, C), V (B, h, N_kv, D))``; pass ``V`` to
    the next layer as ``v_prev`` for elliptical attention.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: Sequence[int], conv_op: Type[nn.Module],
                 attention: str = 'softmax', qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.reduce = any(r > 1 for r in sr_ratio)
        if self.reduce:
            self.sr = conv_op(dim, dim, list(sr_ratio), stride=list(sr_ratio))
            self.sr_norm = nn.LayerNorm(dim)
        self.attend = MetricAttention(attention)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: Sequence[int],
                v_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.sr_norm(grid_to_tokens(self.sr(tokens_to_grid(x, grid)))) if self.reduce else x
        k, v = (split_heads(t, self.num_heads) for t in self.kv(context).chunk(2, dim=-1))
        out = self.attend(split_heads(self.q(x), self.num_heads), k, v, v_prev)
        return self.proj(merge_heads(out)), v


class ConvFFN(nn.Module):
    """``(B, N, C) -> (B, N, C)``: ``fc2(GELU(DWConv(fc1 x)))``, the depthwise conv (``kernel_size``: an int or
    one odd size per axis; PVTv2's 3) on the token grid."""

    def __init__(self, dim: int, hidden: int, conv_op: Type[nn.Module], kernel_size: int | Sequence[int] = 3):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = depthwise_conv(conv_op, hidden, kernel_size)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        return self.fc2(F.gelu(grid_to_tokens(self.dwconv(tokens_to_grid(self.fc1(x), grid)))))


class PVTBlock(nn.Module):
    """``x = x + SRA(LN(x)); x = x + ConvFFN(LN(x))`` (pre-norm, stochastic depth); returns ``(x, V)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: Sequence[int],
                 conv_op: Type[nn.Module], attention: str = 'softmax', drop_path: float = 0.0,
                 kernel_size: int | Sequence[int] = 3):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, conv_op, attention)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.ffn = ConvFFN(dim, int(dim * mlp_ratio), conv_op, kernel_size)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid: Sequence[int],
                v_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        y, v = self.attn(self.norm1(x), grid, v_prev)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.ffn(self.norm2(x), grid)), v


class PVTStage(nn.Module):
    """``(B, C_in, *S) -> (B, dim, *S/stride)``: overlapping patch embedding, ``depth`` PVT blocks, LayerNorm.

    ``kernel`` is the plans' conv kernel of the stage's level (default 3 per axis): it shapes the patch
    embedding (:func:`overlap_kernel`) and is the ConvFFNs' depthwise kernel. With elliptical attention each
    block gets the previous block's values; the first block of a stage has none (the token count and width
    change between stages) and attends plainly.
    """

    def __init__(self, in_channels: int, dim: int, stride: Sequence[int], depth: int, num_heads: int,
                 mlp_ratio: float, sr_ratio: Sequence[int], conv_op: Type[nn.Module], attention: str = 'softmax',
                 drop_path: Sequence[float] | None = None, kernel: Sequence[int] | None = None):
        super().__init__()
        drop_path = list(drop_path) if drop_path is not None else [0.0] * depth
        kernel = list(kernel) if kernel is not None else [3] * len(stride)
        self.embed = OverlapPatchEmbed(in_channels, dim, stride, conv_op, kernel)
        self.blocks = nn.ModuleList(PVTBlock(dim, num_heads, mlp_ratio, sr_ratio, conv_op, attention, drop_path[i],
                                             kernel) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self.embed(x)
        v = None
        for block in self.blocks:
            x, v = block(x, grid, v)
        return tokens_to_grid(self.norm(x), grid)

"""Gated Differential Linear Attention (GDLA) and the GDLAM decoder block (arXiv 2603.02727).

Per head (head dim ``D``, halves ``d = D/2``), with ``φ(x) = ELU(x) + 1``:

    LA(Q, K, V) = φ(Q) (φ(K)ᵀ V) / (φ(Q) (φ(K)ᵀ 1) + ε)          # O(N·d·D), no N×N matrix
    Y = LA(Q1, K1, V) − λ ⊙ LA(Q2, K2, V)                         # Q=(Q1,Q2), K=(K1,K2), V shared
    Y = RMSNorm_head(Y) ⊙ sigmoid(G)

``λ ∈ R^{heads×D}`` is learnable (init N(0, 0.1²), no weight decay). :class:`GDLA` computes Q, K, V, G
with one linear layer, runs this core on them and, with its own λ, on ``PW(DWConv(QKVG))`` (a local
token-mixing pass), then fuses both outputs with a linear layer. Works on 2-D or 3-D token grids
(``conv_op``); tokens are ``(B, N, C)`` in row-major grid order. Every depthwise conv takes a per-axis
kernel (the plans' kernel of its level, e.g. ``(1, 3, 3)``), so an axis nnU-Net does not convolve is not
mixed by the convolutions either (the attention itself is global).
"""
from __future__ import annotations

from typing import Sequence, Type

import torch
from torch import nn
from torch.nn import functional as F

from nnunetv2_ext.blocks.common import depthwise_conv, elu_feature_map, float32_region, merge_heads, split_heads
from nnunetv2_ext.blocks.drop_path import DropPath
from nnunetv2_ext.blocks.tokens import grid_to_tokens, tokens_to_grid


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """``q = φ(Q) (…, N, d)``, ``k = φ(K) (…, N, d)``, ``v (…, N, D)`` -> ``q (kᵀv) / (q (kᵀ1) + eps)`` ``(…, N, D)``
    (Katharopoulos et al. 2020, eq. 6).

    Computed in (at least) float32 even under autocast: the sums over N overflow half precision on large grids.
    """
    with float32_region(q, k, v) as (q, k, v):
        kv = k.transpose(-2, -1) @ v                            # (…, d, D)
        normaliser = q @ k.sum(dim=-2).unsqueeze(-1)            # (…, N, 1)
        return (q @ kv) / (normaliser + eps)


class GatedDiffLinearAttentionCore(nn.Module):
    """The GDLA formula on already-projected ``q, k, v, g`` of shape ``(B, N, C)`` -> ``(B, N, C)``.

    Holds λ (``lam``, ``(heads, D)``) and the per-head RMSNorm weight (``rms_weight``, ``(heads, D)``);
    both are listed in ``no_weight_decay_params``.
    """

    no_weight_decay_params = ('lam', 'rms_weight')

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, rms_eps: float = 1e-6, lambda_std: float = 0.1):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"GDLA needs dim ({dim}) divisible by num_heads ({num_heads}) into an even head dim")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.eps, self.rms_eps = eps, rms_eps
        self.lam = nn.Parameter(torch.randn(num_heads, self.head_dim) * lambda_std)
        self.rms_weight = nn.Parameter(torch.ones(num_heads, self.head_dim))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, h, N, D)``."""
        return split_heads(x, self.num_heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        # φ is applied in the (B, N, C) token layout, before the head split: on the transposed (B, h, N, D) view
        # the fake-tensor stride rule of elu_backward (output laid out like the forward input) disagrees with the
        # eager kernel (laid out like the incoming gradient), so torch.compile's AOT backward reshaped a gradient
        # with a `view` that is invalid at run time ("view size is not compatible with input tensor's size and
        # stride"). Elementwise, so the maths is the same.
        q, k, v = self._heads(elu_feature_map(q)), self._heads(elu_feature_map(k)), self._heads(v)
        d = self.head_dim // 2
        y1 = linear_attention(q[..., :d], k[..., :d], v, self.eps)
        y2 = linear_attention(q[..., d:], k[..., d:], v, self.eps)
        y = y1 - self.lam[None, :, None, :] * y2                              # (B, h, N, D)
        y = y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + self.rms_eps) * self.rms_weight[None, :, None, :]
        return merge_heads(y).to(g.dtype) * torch.sigmoid(g)


class GDLA(nn.Module):
    """``x (B, N, C)`` on a grid ``spatial_shape`` -> ``(B, N, C)``.

    ``qkvg = Linear(x)``; ``Y_main = core(qkvg)``; ``Y_aux = core'(PW(DWConv(qkvg)))`` (depthwise
    ``local_kernel`` conv on the grid, an int or one odd size per axis, then a pointwise conv);
    ``out = Linear(concat(Y_main, Y_aux))``. Cost O(N) in tokens.
    """

    def __init__(self, dim: int, num_heads: int, conv_op: Type[nn.Module], local_kernel: int | Sequence[int] = 3,
                 qkv_bias: bool = True, lambda_std: float = 0.1):
        super().__init__()
        self.qkvg = nn.Linear(dim, 4 * dim, bias=qkv_bias)
        self.local_dw = depthwise_conv(conv_op, 4 * dim, local_kernel)
        self.local_pw = conv_op(4 * dim, 4 * dim, 1)
        self.main = GatedDiffLinearAttentionCore(dim, num_heads, lambda_std=lambda_std)
        self.aux = GatedDiffLinearAttentionCore(dim, num_heads, lambda_std=lambda_std)
        self.fuse = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        qkvg = self.qkvg(x)
        local = grid_to_tokens(self.local_pw(self.local_dw(tokens_to_grid(qkvg, spatial_shape))))
        y_main = self.main(*qkvg.chunk(4, dim=-1))
        y_aux = self.aux(*local.chunk(4, dim=-1))
        return self.fuse(torch.cat((y_main, y_aux), dim=-1))


class GatedMLP(nn.Module):
    """``(B, C, *S) -> (B, C, *S)``: ``W_out(a ⊙ SiLU(b))`` with ``(a, b) = DWConv(W_in x)`` split in two
    (depthwise ``kernel_size``: an int or one odd size per axis)."""

    def __init__(self, dim: int, conv_op: Type[nn.Module], mlp_ratio: float = 2.0,
                 kernel_size: int | Sequence[int] = 3):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.expand = conv_op(dim, 2 * hidden, 1)
        self.dwconv = depthwise_conv(conv_op, 2 * hidden, kernel_size)
        self.project = conv_op(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.dwconv(self.expand(x)).chunk(2, dim=1)
        return self.project(value * F.silu(gate))


class GDLAM(nn.Module):
    """GDLA decoder block on ``(B, C, *S)`` (2-D or 3-D), shape preserved:

        x = x + GDLA(SiLU(DWConv(LN(x))))
        x = x + GatedMLP(LN(x))

    LN normalises channels per voxel; the depthwise conv gives the (position-free) linear attention
    local position information. ``kernel_size`` (an int or one odd size per axis, e.g. the plans' kernel
    of the level) is used by all three depthwise convs (this one, GDLA's local pass, the GatedMLP's).
    """

    def __init__(self, dim: int, num_heads: int, conv_op: Type[nn.Module], mlp_ratio: float = 2.0,
                 kernel_size: int | Sequence[int] = 3, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv = depthwise_conv(conv_op, dim, kernel_size)
        self.attn = GDLA(dim, num_heads, conv_op, local_kernel=kernel_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = GatedMLP(dim, conv_op, mlp_ratio, kernel_size)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[2:]
        h = F.silu(self.conv(tokens_to_grid(self.norm1(grid_to_tokens(x)), shape)))
        x = x + self.drop_path(tokens_to_grid(self.attn(grid_to_tokens(h), shape), shape))
        return x + self.drop_path(self.mlp(tokens_to_grid(self.norm2(grid_to_tokens(x)), shape)))

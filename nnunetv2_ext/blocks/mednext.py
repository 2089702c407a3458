"""MedNeXt-style convolutional encoder (Roy et al. 2023, "MedNeXt", Fig. 1): ConvNeXt blocks with depthwise
convs, 2-D or 3-D (``conv_op``).

A block maps ``(B, C_in, *S) -> (B, C_out, *S/stride)``:

    out = res(x) + PW_compress(GELU(PW_expand(N(DW_k,stride(x)))))       PW_expand: C_in -> r·C_in

``res`` is the identity for a regular block (``C_in = C_out``, stride 1) and a strided 1×1 conv for a down
block. The encoder has one stage per entry of the plans' ``strides``. The pointwise part runs through
:func:`~nnunetv2_ext.blocks.pointwise_mlp.pointwise_mlp`, which stores one of the two expanded tensors plain
autograd would keep (same outputs and gradients).
"""
from __future__ import annotations

from typing import Sequence, Type

import torch
from torch import nn
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim

from nnunetv2_ext.blocks.common import NormLayer, instance_norm_for, per_axis, run_checkpointed
from nnunetv2_ext.blocks.pointwise_mlp import pointwise_mlp


class MedNeXtBlock(nn.Module):
    """MedNeXt block ``(B, dim_in, *S) -> (B, dim_out, *S/stride)``; a down block when ``stride > 1``
    or ``dim_out != dim_in`` (then the residual path is a strided 1×1 conv).

    ``body`` (DW conv, norm, PW expand, GELU, PW compress) defines the maths; ``forward`` evaluates it with
    the memory-lean :func:`pointwise_mlp` for the last three. ``norm_layer`` None: affine instance norm."""

    def __init__(self, dim_in: int, dim_out: int | None = None, exp_ratio: int = 2,
                 kernel_size: int | Sequence[int] = 3, stride: int | Sequence[int] = 1,
                 norm_layer: NormLayer | None = None, conv_op: Type[nn.Module] = nn.Conv3d):
        super().__init__()
        ndim = convert_conv_op_to_dim(conv_op)
        dim_out = dim_in if dim_out is None else dim_out
        kernel_size, stride = per_axis(kernel_size, ndim, 'kernel_size'), per_axis(stride, ndim, 'stride')
        norm_layer = norm_layer or instance_norm_for(conv_op)
        self.body = nn.Sequential(
            conv_op(dim_in, dim_in, kernel_size, stride=stride, padding=[k // 2 for k in kernel_size], groups=dim_in),
            norm_layer(dim_in),
            conv_op(dim_in, exp_ratio * dim_in, 1), nn.GELU(),
            conv_op(exp_ratio * dim_in, dim_out, 1))
        identity = dim_in == dim_out and all(s == 1 for s in stride)
        self.res = nn.Identity() if identity else conv_op(dim_in, dim_out, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dw, norm, expand, _, compress = self.body
        return self.res(x) + pointwise_mlp(norm(dw(x)), expand, compress)


class MedNeXtEncoder(nn.Module):
    """``x (B, in_channels, *patch) -> [f_0, ..., f_{n-1}]``, ``f_s``: ``(B, features[s], *patch/Π strides[:s+1])``.

    Stage 0 is a conv stem (kernel = stride = ``strides[0]``, 1×1 for nnU-Net's usual stride 1);
    stage ``s > 0`` starts with a down block (stride ``strides[s]``). Each stage then has
    ``depths[s]`` regular blocks with depthwise kernel ``kernel_sizes[s]``. The ``checkpoint_stages``
    finest stages recompute their activations in backward instead of storing them.
    """

    def __init__(self, in_channels: int, features: Sequence[int], strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], depths: Sequence[int], exp_ratio: int = 2,
                 norm_layer: NormLayer | None = None, checkpoint_stages: int = 0, conv_op: Type[nn.Module] = nn.Conv3d):
        super().__init__()
        if not len(features) == len(strides) == len(kernel_sizes) == len(depths):
            raise ValueError("features, strides, kernel_sizes and depths need one entry per stage, got "
                             f"{len(features)}, {len(strides)}, {len(kernel_sizes)}, {len(depths)}")
        self.checkpoint_stages = checkpoint_stages
        self.stages = nn.ModuleList()
        for s, (dim, stride, kernel, depth) in enumerate(zip(features, strides, kernel_sizes, depths)):
            entry = (conv_op(in_channels, dim, stride, stride=stride) if s == 0 else
                     MedNeXtBlock(features[s - 1], dim, exp_ratio, kernel, stride, norm_layer, conv_op))
            blocks = [MedNeXtBlock(dim, dim, exp_ratio, kernel, 1, norm_layer, conv_op) for _ in range(depth)]
            self.stages.append(nn.Sequential(entry, *blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for s, stage in enumerate(self.stages):
            x = run_checkpointed(stage, x, s < self.checkpoint_stages)
            feats.append(x)
        return feats

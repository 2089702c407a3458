"""Light convolutional decoder.

One decoder stage at level ``s`` (``g`` = the fused feature, i.e. the upsampled coarser output
concatenated with the encoder skip):

    r1 = proj(g)                                  # 1x1 conv, or identity when widths match
    r2 = N(Conv_k(σ(N(Conv_k(g)))))              # N = plans' norm_op, σ = plans' nonlin
    h_s = σ(r1 + r2)                              # residual: ∂h/∂g keeps an identity path
    g_{s-1} = concat(U(h_s), skip_{s-1})          # U = transposed conv, kernel = stride
    logits_s = head_s(r1 + r2)                    # 1x1 conv, on the ``num_ds_outputs`` finest levels

Cost and memory are O(voxels), against O(voxels²) for a 3-D self-attention decoder. The heads read
the residual sum before σ: with σ in front of the 1x1 head, the full-resolution output learned markedly
slower in our tests (one class stayed at Dice 0 for 60+ iterations while coarser heads had learned it);
the path to the next stage keeps σ(r1 + r2). ``conv_op`` selects 2-D or 3-D; every width,
kernel and stride comes from the caller (the plans), so one code path serves every configuration.
"""
from __future__ import annotations

from typing import Sequence, Type

import torch
from torch import nn
from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp

# Four supervised levels, weights (8, 4, 2, 1) / 15, highest resolution first.
NUM_DS_OUTPUTS = 4


class LightResidualBlock(nn.Module):
    """``h = σ(proj(g) + N(Conv(σ(N(Conv(g))))))`` for ``g`` of shape ``(B, in_ch, *spatial)``.

    Returns ``(B, out_ch, *spatial)``; spatial size is preserved (same padding). ``residual_sum(g)``
    is the same without the final ``σ``.
    """

    def __init__(self, in_channels: int, out_channels: int, conv_op: Type[nn.Module],
                 kernel_size: Sequence[int], norm_op: Type[nn.Module] | None, norm_op_kwargs: dict | None,
                 nonlin: Type[nn.Module] | None, nonlin_kwargs: dict | None, conv_bias: bool = True):
        super().__init__()
        padding = [(k - 1) // 2 for k in kernel_size]

        def norm(ch: int) -> nn.Module:
            return nn.Identity() if norm_op is None else norm_op(ch, **(norm_op_kwargs or {}))

        def act(inplace_allowed: bool) -> nn.Module:
            # the inner σ may run in place as the plans say (its input, a norm output, has no other use);
            # the outer σ never: the heads read the residual sum r1 + r2 it would overwrite
            kwargs = dict(nonlin_kwargs or {})
            if not inplace_allowed:
                kwargs.pop('inplace', None)
            return nn.Identity() if nonlin is None else nonlin(**kwargs)

        self.proj = (nn.Identity() if in_channels == out_channels
                     else conv_op(in_channels, out_channels, 1, bias=conv_bias))
        self.body = nn.Sequential(
            conv_op(in_channels, out_channels, kernel_size, padding=padding, bias=conv_bias), norm(out_channels),
            act(inplace_allowed=True),
            conv_op(out_channels, out_channels, kernel_size, padding=padding, bias=conv_bias), norm(out_channels),
        )
        self.act = act(inplace_allowed=False)

    def residual_sum(self, g: torch.Tensor) -> torch.Tensor:
        return self.proj(g) + self.body(g)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.act(self.residual_sum(g))


def rename_legacy_heads(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """``load_state_dict`` pre-hook of the decoders: checkpoints saved before the segmentation heads were
    named ``seg_layers`` (as nnU-Net names them) call them ``heads``; their ``<prefix>heads.*`` entries are
    renamed to ``<prefix>seg_layers.*`` so trained model folders still predict and resume."""
    old = prefix + 'heads.'
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + 'seg_layers.' + key[len(old):]] = state_dict.pop(key)


class LightDecoder(nn.Module):
    """Decodes a list of encoder features (highest resolution first) into segmentation logits.

    Args:
        encoder_channels: channels of each encoder level, ``[C_0, ..., C_{n-1}]``.
        strides: stride of each encoder level relative to the previous one (``strides[0]`` is the
            stem's); ``U`` at level ``s`` undoes ``strides[s+1]``.
        kernel_sizes: conv kernel per level (the plans' ``kernel_sizes``).
        num_classes: seg-head outputs (nnU-Net's ``num_segmentation_heads``).
        deep_supervision: return ``min(4, n-1)`` logits, highest resolution first, instead of one.

    ``forward(skips)`` takes ``n`` tensors ``(B, C_s, *spatial_s)``; returns ``(B, num_classes, *spatial_0)``
    or, with deep supervision, the list ``[level 0, level 1, ...]``.
    """

    def __init__(self, encoder_channels: Sequence[int], strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], num_classes: int, conv_op: Type[nn.Module],
                 norm_op: Type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 nonlin: Type[nn.Module] | None = None, nonlin_kwargs: dict | None = None,
                 conv_bias: bool = True, deep_supervision: bool = True,
                 num_ds_outputs: int = NUM_DS_OUTPUTS):
        super().__init__()
        n = len(encoder_channels)
        if n < 2:
            raise ValueError(f"LightDecoder needs at least 2 encoder levels, got {n}")
        if not (len(strides) == len(kernel_sizes) == n):
            raise ValueError(f"encoder_channels ({n}), strides ({len(strides)}) and kernel_sizes "
                             f"({len(kernel_sizes)}) must have one entry per encoder level")
        self.deep_supervision = deep_supervision
        self.num_ds_outputs = min(num_ds_outputs, n - 1)
        transp_op = get_matching_convtransp(conv_op=conv_op)
        block_kwargs = dict(conv_op=conv_op, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, nonlin=nonlin,
                            nonlin_kwargs=nonlin_kwargs, conv_bias=conv_bias)
        # index i of these lists is decoder stage i, producing encoder level s = n - 2 - i
        self.upsample = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for s in range(n - 2, -1, -1):
            self.upsample.append(transp_op(encoder_channels[s + 1], encoder_channels[s], strides[s + 1],
                                           strides[s + 1], bias=conv_bias))
            self.blocks.append(LightResidualBlock(2 * encoder_channels[s], encoder_channels[s],
                                                  kernel_size=kernel_sizes[s], **block_kwargs))
        # seg_layers[j] predicts at level j (0 = full resolution); the name makes nnU-Net's
        # load_pretrained_weights skip them (fine-tuning with another class count)
        self.seg_layers = nn.ModuleList(conv_op(encoder_channels[j], num_classes, 1, bias=True)
                                   for j in range(self.num_ds_outputs))
        self.register_load_state_dict_pre_hook(rename_legacy_heads)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        n = len(self.blocks) + 1
        if len(skips) != n:
            raise ValueError(f"LightDecoder expected {n} feature maps, got {len(skips)}")
        h = skips[-1]
        levels: dict[int, torch.Tensor] = {}  # residual sums r1 + r2 of the supervised levels
        for i, (up, block) in enumerate(zip(self.upsample, self.blocks)):
            s = n - 2 - i
            r = block.residual_sum(torch.cat((up(h), skips[s]), dim=1))
            if s < self.num_ds_outputs:
                levels[s] = r
            if s > 0:
                h = block.act(r)
        if not self.deep_supervision:
            return self.seg_layers[0](levels[0])
        return [self.seg_layers[j](levels[j]) for j in range(self.num_ds_outputs)]

"""RWKV-UNet (Jiang et al. 2025, "RWKV-UNet", Fig. 1) for nnU-Net's 2-D and 3-D plans: MedNeXt encoder +
GLSP/WKV branch + light conv decoder.

    f_0 … f_{n-1} = MedNeXtEncoder(x)                         one stage per plans stage
    b_a … b_{n-1} = RWKVBranch(f_a)                             global-local branch from stage a = branch_start(n)
    g_s = f_s (s < a),   g_s = Fuse(f_s, b_s) (s ≥ a)           concat -> 1×1 conv -> norm -> act
    logits = LightDecoder(g_0 … g_{n-1})                         (8,4,2,1)/15 deep supervision

Stage ``s`` has the plans' ``features_per_stage[s]`` channels and stride ``strides[s]``; every layer is the
plans' ``conv_op`` (2-D or 3-D), so one code path serves every configuration. The branch starts at stage 2
(1/4 resolution for nnU-Net's usual (1,2,2,2,…) strides, with ``4C`` channels when widths double, as in
RWKV-UNet) when the plans have ≥ 4 stages, else at stage ``n − 2`` so it keeps one GLSP stage and one
downsampling (docs/glsp.md).
"""
from __future__ import annotations

from typing import Sequence, Type

import torch
from torch import nn
from dynamic_network_architectures.building_blocks.helper import get_matching_batchnorm
from dynamic_network_architectures.initialization.weight_init import InitWeights_He

from nnunetv2_ext.blocks.common import NormLayer, is_batch_norm, norm_factory, run_checkpointed
from nnunetv2_ext.blocks.glsp import GLSP, Downsample
from nnunetv2_ext.blocks.light_decoder import LightDecoder
from nnunetv2_ext.blocks.mednext import MedNeXtEncoder
from nnunetv2_ext.networks.plans import PlansError, check_patch_fits_strides, ops_from_plans

BRANCH_START = 2  # the RWKV branch reads encoder stage 2 (1/4 resolution) when the plans are deep enough
MIN_STAGES = 2  # the light decoder needs two levels; the branch then reads stage 0


def branch_start(n_stages: int) -> int:
    """Encoder stage the RWKV branch reads: ``min(2, n_stages − 2)`` (one GLSP stage + one downsampling)."""
    if n_stages < MIN_STAGES:
        raise ValueError(f"RWKV-UNet needs at least {MIN_STAGES} stages, got {n_stages}")
    return min(BRANCH_START, n_stages - 2)


class RWKVBranch(nn.Module):
    """``f_start (B, F_start, *S_start) -> [b_start, …, b_{n-1}]``, ``b_s`` shaped like encoder stage ``s``.

        h = N(PW(f_start))
        for s = start … n-2:   b_s = GLSP_s(h);   h = Downsample(F_s -> F_{s+1}, strides[s+1])(b_s)
        b_{n-1} = h

    ``features``/``strides``/``kernel_sizes`` are the full per-stage lists of the network.
    """

    def __init__(self, features: Sequence[int], strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], conv_op: Type[nn.Module], norm_layer: NormLayer,
                 start: int = BRANCH_START, exp_ratio: float = 1.0, se_ratio: float = 0.25, drop_path: float = 0.0,
                 shift_gamma: float | None = None, checkpoint: bool = False):
        super().__init__()
        n = len(features)
        if not 0 <= start <= n - 2:
            raise ValueError(f"RWKVBranch starting at stage {start} needs at least {start + 2} stages, got {n}")
        self.checkpoint = checkpoint
        self.in_proj = nn.Sequential(conv_op(features[start], features[start], 1), norm_layer(features[start]))
        n_glsp = n - 1 - start
        self.glsp = nn.ModuleList(
            GLSP(features[s], features[s], exp_ratio, se_ratio, drop_path, kernel_sizes[s], conv_op, norm_layer,
                 layer_id=s - start, n_layers=n_glsp, shift_gamma=shift_gamma) for s in range(start, n - 1))
        self.down = nn.ModuleList(Downsample(features[s], features[s + 1], strides[s + 1], conv_op, norm_layer)
                                  for s in range(start, n - 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.in_proj(x)
        out = []
        for glsp, down in zip(self.glsp, self.down):
            h = run_checkpointed(glsp, h, self.checkpoint)
            out.append(h)
            h = down(h)
        return out + [h]


class Fuse(nn.Module):
    """``(f, b)`` both ``(B, C, *S)`` -> ``act(N(PW(concat(f, b))))`` ``(B, C, *S)``."""

    def __init__(self, dim: int, conv_op: Type[nn.Module], norm_layer: NormLayer, nonlin: Type[nn.Module],
                 nonlin_kwargs: dict | None):
        super().__init__()
        self.body = nn.Sequential(conv_op(2 * dim, dim, 1), norm_layer(dim), nonlin(**(nonlin_kwargs or {})))

    def forward(self, f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat((f, b), dim=1))


class RWKVUNet(nn.Module):
    """RWKV-UNet. ``x (B, in_channels, *patch)`` (2-D or 3-D, by ``conv_op``) -> logits
    ``(B, num_classes, *patch)``, or with ``self.decoder.deep_supervision`` the ``min(4, n-1)`` finest levels,
    highest resolution first.

    Args:
        features_per_stage, strides, kernel_sizes: per stage, as in nnU-Net plans (n ≥ 2 stages).
        depths: MedNeXt blocks per stage after the stem / down block.
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d`` (the plans').
        norm_op, norm_op_kwargs, nonlin, nonlin_kwargs, conv_bias: as in the plans; ``norm_op`` is used
            everywhere (encoder, branch, fusion, decoder; None: no norm), ``nonlin`` in fusion and decoder.
        mednext_exp_ratio: MedNeXt expansion ratio r.
        rwkv_branch: build the GLSP branch and fusions (False: MedNeXt encoder + light decoder only).
        glsp_exp_ratio, se_ratio, drop_path, shift_gamma: GLSP options (see :class:`GLSP`).
        checkpoint_levels: the finest encoder stages recomputed in backward instead of stored (None: 1).
        checkpoint_branch: recompute the GLSP blocks in backward (None: True).
            At realistic 3-D plans stage 0 holds ~1/4 and the GLSP blocks ~1/6 of the stored activations for
            ~1 % of a step's FLOPs together (docs/glsp.md). With a BatchNorm both default to off: a
            recomputation would update its running statistics twice.
        checkpoint_blocks: recompute every encoder stage and GLSP block in backward (least memory).
    """

    def __init__(self, in_channels: int, num_classes: int, features_per_stage: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]], depths: Sequence[int],
                 conv_op: Type[nn.Module] = nn.Conv3d, norm_op: Type[nn.Module] | None = nn.InstanceNorm3d,
                 norm_op_kwargs: dict | None = None, nonlin: Type[nn.Module] | None = nn.LeakyReLU,
                 nonlin_kwargs: dict | None = None, conv_bias: bool = True, mednext_exp_ratio: int = 2,
                 rwkv_branch: bool = True, glsp_exp_ratio: float = 1.0, se_ratio: float = 0.25,
                 drop_path: float = 0.0, shift_gamma: float | None = None, checkpoint_levels: int | None = None,
                 checkpoint_branch: bool | None = None, checkpoint_blocks: bool = False,
                 deep_supervision: bool = True):
        super().__init__()
        n = len(features_per_stage)
        norm_op_kwargs = dict(affine=True) if norm_op_kwargs is None else norm_op_kwargs
        norm_layer = norm_factory(norm_op, norm_op_kwargs)
        recompute_safe = not is_batch_norm(norm_layer)
        if checkpoint_levels is None:
            checkpoint_levels = int(recompute_safe)
        if checkpoint_branch is None:
            checkpoint_branch = recompute_safe
        self.branch_start = branch_start(n)
        self.encoder = MedNeXtEncoder(in_channels, features_per_stage, strides, kernel_sizes, depths,
                                      mednext_exp_ratio, norm_layer, n if checkpoint_blocks else checkpoint_levels,
                                      conv_op)
        self.branch = self.fuse = None
        if rwkv_branch:
            self.branch = RWKVBranch(features_per_stage, strides, kernel_sizes, conv_op, norm_layer,
                                     self.branch_start, glsp_exp_ratio, se_ratio, drop_path, shift_gamma,
                                     checkpoint_blocks or checkpoint_branch)
            self.fuse = nn.ModuleList(Fuse(c, conv_op, norm_layer, nonlin or nn.Identity, nonlin_kwargs)
                                      for c in features_per_stage[self.branch_start:])
        self.decoder = LightDecoder(features_per_stage, strides, kernel_sizes, num_classes, conv_op, norm_op,
                                    norm_op_kwargs, nonlin, nonlin_kwargs, conv_bias, deep_supervision)
        self.decoder.apply(InitWeights_He(1e-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        feats = self.encoder(x)
        if self.branch is not None:
            a = self.branch_start
            branch = self.branch(feats[a])
            feats = feats[:a] + [fuse(f, b) for fuse, f, b in zip(self.fuse, feats[a:], branch)]
        return self.decoder(feats)

    @classmethod
    def from_plans(cls, configuration_manager, num_input_channels: int, num_output_channels: int,
                   deep_supervision: bool = True, batch_norm: bool = False, **options) -> "RWKVUNet":
        """Builds the network for an nnU-Net ``ConfigurationManager`` (2-D or 3-D plans with ≥ 2 stages).

        Widths, strides, kernels, ``conv_op``, norm and nonlinearity are the plans'; MedNeXt depths come from
        :func:`depths_from_plans`; the norm is the plans' ``norm_op`` unless ``batch_norm`` (the matching
        BatchNorm; nnU-Net turns it into SyncBatchNorm under DDP). ``options`` go to the constructor (e.g.
        ``rwkv_branch=False``, ``checkpoint_levels=0, checkpoint_branch=False``, ``checkpoint_blocks=True``).
        Raises :class:`PlansError` for plans it cannot serve.
        """
        arch = configuration_manager.network_arch_init_kwargs
        ops = ops_from_plans(configuration_manager)
        if arch['n_stages'] < MIN_STAGES:
            raise PlansError(f"RWKV-UNet needs at least {MIN_STAGES} encoder stages (its decoder joins two levels), "
                             f"but the plans have {arch['n_stages']}: use a larger patch_size so the planner adds "
                             f"stages.")
        check_patch_fits_strides(configuration_manager.patch_size, arch['strides'])
        norm_op, norm_op_kwargs = ops.norm_op, ops.norm_op_kwargs
        if batch_norm:
            norm_op, norm_op_kwargs = get_matching_batchnorm(ops.conv_op), {'eps': 1e-5, 'momentum': 0.1,
                                                                             'affine': True}
        return cls(num_input_channels, num_output_channels, arch['features_per_stage'], arch['strides'],
                   arch['kernel_sizes'], options.pop('depths', depths_from_plans(arch)), ops.conv_op, norm_op,
                   norm_op_kwargs, ops.nonlin, ops.nonlin_kwargs, ops.conv_bias, deep_supervision=deep_supervision,
                   **options)


def depths_from_plans(arch_kwargs: dict) -> list[int]:
    """MedNeXt blocks per stage: ResEnc plans' ``n_blocks_per_stage`` (one MedNeXt block per residual
    block), otherwise one block per two planned convs of ``n_conv_per_stage`` (a plain stage's
    conv pair is one residual unit), at least one."""
    if 'n_blocks_per_stage' in arch_kwargs:
        return [int(b) for b in arch_kwargs['n_blocks_per_stage']]
    return [max(1, int(c) // 2) for c in arch_kwargs['n_conv_per_stage']]

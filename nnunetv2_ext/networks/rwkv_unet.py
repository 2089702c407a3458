"""RWKV-UNet-3D (DESIGN §3–§4): MedNeXt encoder + GLSP3D/WKV branch + light conv decoder.

    f_0 … f_{n-1} = MedNeXtEncoder(x)                         one stage per plans stage
    b_2 … b_{n-1} = RWKVBranch3D(f_2)                           global-local branch from stage 2
    g_s = f_s (s < 2),   g_s = Fuse(f_s, b_s) (s ≥ 2)           concat -> 1×1×1 conv -> norm -> act
    logits = LightDecoder(g_0 … g_{n-1})                         (8,4,2,1)/15 deep supervision

Stage ``s`` has the plans' ``features_per_stage[s]`` channels and stride ``strides[s]``, so the
branch starts at 1/4 resolution for nnU-Net's usual (1,2,2,2,…) strides with ``4C`` channels when
widths double, exactly the seed's layout, and it follows any anisotropic or deeper plans.
"""
from __future__ import annotations

import pydoc
from functools import partial
from typing import Sequence, Type

import torch
from torch import nn
from dynamic_network_architectures.initialization.weight_init import InitWeights_He

from nnunetv2_ext.blocks.common import NormLayer, run_checkpointed
from nnunetv2_ext.blocks.glsp import GLSP3D, Downsample3D
from nnunetv2_ext.blocks.light_decoder import LightDecoder
from nnunetv2_ext.blocks.mednext import MedNeXtEncoder
from nnunetv2_ext.networks.plans import PlansError, check_patch_fits_strides

BRANCH_START = 2  # the RWKV branch reads encoder stage 2 (1/4 resolution in the seed)
MIN_STAGES = BRANCH_START + 2  # one GLSP3D stage + the downsampled deepest stage


class RWKVBranch3D(nn.Module):
    """``f_start (B, F_start, *S_start) -> [b_start, …, b_{n-1}]``, ``b_s`` shaped like encoder stage ``s``.

        h = N(PW(f_start))
        for s = start … n-2:   b_s = GLSP3D_s(h);   h = Downsample3D(F_s -> F_{s+1}, strides[s+1])(b_s)
        b_{n-1} = h

    ``features``/``strides``/``kernel_sizes`` are the full per-stage lists of the network.
    """

    def __init__(self, features: Sequence[int], strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], norm_layer: NormLayer, start: int = BRANCH_START,
                 exp_ratio: float = 1.0, se_ratio: float = 0.25, drop_path: float = 0.0,
                 shift_gamma: float = 1 / 8, checkpoint: bool = False):
        super().__init__()
        n = len(features)
        if n < start + 2:
            raise ValueError(f"RWKVBranch3D starting at stage {start} needs at least {start + 2} stages, got {n}")
        self.checkpoint = checkpoint
        self.in_proj = nn.Sequential(nn.Conv3d(features[start], features[start], 1), norm_layer(features[start]))
        n_glsp = n - 1 - start
        self.glsp = nn.ModuleList(
            GLSP3D(features[s], features[s], exp_ratio, se_ratio, drop_path, kernel_sizes[s], norm_layer,
                   layer_id=s - start, n_layers=n_glsp, shift_gamma=shift_gamma) for s in range(start, n - 1))
        self.down = nn.ModuleList(Downsample3D(features[s], features[s + 1], strides[s + 1], norm_layer)
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

    def __init__(self, dim: int, norm_layer: NormLayer, nonlin: Type[nn.Module], nonlin_kwargs: dict | None):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(2 * dim, dim, 1), norm_layer(dim), nonlin(**(nonlin_kwargs or {})))

    def forward(self, f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat((f, b), dim=1))


class RWKVUNet3D(nn.Module):
    """RWKV-UNet-3D. ``x (B, in_channels, D, H, W)`` -> logits ``(B, num_classes, D, H, W)``, or with
    ``self.decoder.deep_supervision`` the ``min(4, n-1)`` finest levels, highest resolution first.

    Args:
        features_per_stage, strides, kernel_sizes: per stage, as in nnU-Net plans (n ≥ 4 stages).
        depths: MedNeXt blocks per stage after the stem / down block.
        norm_op, norm_op_kwargs, nonlin, nonlin_kwargs, conv_bias: as in the plans; ``norm_op`` is used
            everywhere (encoder, branch, fusion, decoder), ``nonlin`` in fusion and decoder.
        mednext_exp_ratio: MedNeXt expansion ratio r.
        rwkv_branch: build the GLSP3D branch and fusions (False: MedNeXt encoder + light decoder only).
        glsp_exp_ratio, se_ratio, drop_path, shift_gamma: GLSP3D options (see :class:`GLSP3D`).
        checkpoint_levels: the finest encoder stages recomputed in backward instead of stored (None: 1).
        checkpoint_branch: recompute the GLSP3D blocks in backward (None: True).
            At realistic plans stage 0 holds ~1/4 and the GLSP3D blocks ~1/6 of the stored activations for
            ~1 % of a step's FLOPs together (docs/glsp.md). With a BatchNorm both default to off: a
            recomputation would update its running statistics twice.
        checkpoint_blocks: recompute every encoder stage and GLSP3D block in backward (least memory).
    """

    def __init__(self, in_channels: int, num_classes: int, features_per_stage: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]], depths: Sequence[int],
                 norm_op: Type[nn.Module] = nn.InstanceNorm3d, norm_op_kwargs: dict | None = None,
                 nonlin: Type[nn.Module] = nn.LeakyReLU, nonlin_kwargs: dict | None = None, conv_bias: bool = True,
                 mednext_exp_ratio: int = 2, rwkv_branch: bool = True, glsp_exp_ratio: float = 1.0,
                 se_ratio: float = 0.25, drop_path: float = 0.0, shift_gamma: float = 1 / 8,
                 checkpoint_levels: int | None = None, checkpoint_branch: bool | None = None,
                 checkpoint_blocks: bool = False, deep_supervision: bool = True):
        super().__init__()
        norm_op_kwargs = dict(affine=True) if norm_op_kwargs is None else norm_op_kwargs
        norm_layer = partial(norm_op, **norm_op_kwargs)
        recompute_safe = not issubclass(norm_op, nn.modules.batchnorm._BatchNorm)
        if checkpoint_levels is None:
            checkpoint_levels = int(recompute_safe)
        if checkpoint_branch is None:
            checkpoint_branch = recompute_safe
        self.encoder = MedNeXtEncoder(in_channels, features_per_stage, strides, kernel_sizes, depths,
                                      mednext_exp_ratio, norm_layer,
                                      len(features_per_stage) if checkpoint_blocks else checkpoint_levels)
        self.branch = self.fuse = None
        if rwkv_branch:
            self.branch = RWKVBranch3D(features_per_stage, strides, kernel_sizes, norm_layer, BRANCH_START,
                                       glsp_exp_ratio, se_ratio, drop_path, shift_gamma,
                                       checkpoint_blocks or checkpoint_branch)
            self.fuse = nn.ModuleList(Fuse(c, norm_layer, nonlin, nonlin_kwargs)
                                      for c in features_per_stage[BRANCH_START:])
        self.decoder = LightDecoder(features_per_stage, strides, kernel_sizes, num_classes, nn.Conv3d, norm_op,
                                    norm_op_kwargs, nonlin, nonlin_kwargs, conv_bias, deep_supervision)
        self.decoder.apply(InitWeights_He(1e-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        feats = self.encoder(x)
        if self.branch is not None:
            branch = self.branch(feats[BRANCH_START])
            feats = feats[:BRANCH_START] + [fuse(f, b) for fuse, f, b in zip(self.fuse, feats[BRANCH_START:], branch)]
        return self.decoder(feats)

    @classmethod
    def from_plans(cls, configuration_manager, num_input_channels: int, num_output_channels: int,
                   deep_supervision: bool = True, batch_norm: bool = False, **options) -> "RWKVUNet3D":
        """Builds the network for an nnU-Net ``ConfigurationManager`` (any 3-D plans with ≥ 4 stages).

        Widths, strides and kernels are the plans'; MedNeXt depths come from :func:`depths_from_plans`;
        the norm is the plans' ``norm_op`` unless ``batch_norm`` (BatchNorm3d; nnU-Net turns it into
        SyncBatchNorm under DDP). ``options`` go to the constructor (e.g. ``rwkv_branch=False``,
        ``checkpoint_levels=0, checkpoint_branch=False``, ``checkpoint_blocks=True``). Raises
        :class:`PlansError` for plans it cannot serve.
        """
        arch = configuration_manager.network_arch_init_kwargs
        patch = configuration_manager.patch_size
        if len(patch) != 3:
            raise PlansError(f"RWKV-UNet-3D (nnUNetTrainerGLSP) is 3-D only, but this configuration has a "
                             f"{len(patch)}-D patch {list(patch)}: train a 3-D configuration (3d_fullres, "
                             f"3d_lowres), or use nnUNetTrainerLightDecoder for 2d.")
        if arch['n_stages'] < MIN_STAGES:
            raise PlansError(f"RWKV-UNet-3D needs at least {MIN_STAGES} encoder stages (the RWKV branch starts at "
                             f"stage {BRANCH_START} and downsamples once more), but the plans have "
                             f"{arch['n_stages']}: use a larger patch_size so the planner adds stages, or "
                             f"nnUNetTrainerLightDecoder for shallow plans.")
        check_patch_fits_strides(patch, arch['strides'])
        resolved = {key: pydoc.locate(arch[key]) if isinstance(arch[key], str) else arch[key]
                    for key in ('norm_op', 'nonlin')}
        if batch_norm:
            norm_op, norm_op_kwargs = nn.BatchNorm3d, {'eps': 1e-5, 'momentum': 0.1, 'affine': True}
        elif resolved['norm_op'] is None:
            norm_op, norm_op_kwargs = nn.Identity, {}
        else:
            norm_op, norm_op_kwargs = resolved['norm_op'], arch['norm_op_kwargs'] or {}
        return cls(num_input_channels, num_output_channels, arch['features_per_stage'], arch['strides'],
                   arch['kernel_sizes'], options.pop('depths', depths_from_plans(arch)), norm_op, norm_op_kwargs,
                   resolved['nonlin'] or nn.Identity, arch['nonlin_kwargs'], arch['conv_bias'],
                   deep_supervision=deep_supervision, **options)


def depths_from_plans(arch_kwargs: dict) -> list[int]:
    """MedNeXt blocks per stage: ResEnc plans' ``n_blocks_per_stage`` (one MedNeXt block per residual
    block), otherwise one block per two planned convs of ``n_conv_per_stage`` (a plain stage's
    conv pair is one residual unit), at least one."""
    if 'n_blocks_per_stage' in arch_kwargs:
        return [int(b) for b in arch_kwargs['n_blocks_per_stage']]
    return [max(1, int(c) // 2) for c in arch_kwargs['n_conv_per_stage']]

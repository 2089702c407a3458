"""PVT-GDLA: a PVTv2 encoder (Wang et al. 2022) + a gated differential linear attention decoder (arXiv 2603.02727),
built from nnU-Net plans.

Plans mapping (``strides[j]`` = the plans' stride of level ``j``, ``c_j = strides[0] · … · strides[j]``):

* the first transformer stage sits at level ``k0`` = the first level whose cumulative stride reaches 4
  along some axis (PVTv2's stride-4 embedding; ``(1, 4, 4)`` counts for anisotropic plans), its
  patch embedding strides by ``c_k0`` straight from the image; each further stage takes one more plans
  stride, up to ``len(embed_dims)`` (4) stages. Deeper plans levels are not used (the attention is
  global already).
* every convolution uses the plans' kernel of its level, per axis: the stage at level ``l`` embeds with
  :func:`~nnunetv2_ext.blocks.pvt.overlap_kernel` of its stride and ``kernel_sizes[l]`` and uses
  ``kernel_sizes[l]`` in its ConvFFNs; the GDLAM at level ``l`` in its three depthwise convs. With
  ``(1, 3, 3)`` kernels (thick slices) no conv mixes slices where nnU-Net's U-Net would not.
* a full-resolution residual conv stem (plans' kernels, norm and nonlinearity) gives the levels
  ``0 … k0−1`` that the transformer skips.
* the decoder applies GDLAM to the deepest level, then walks back level by level: transposed conv
  (kernel = stride = ``strides[l+1]``), additive skip, then GDLAM at transformer levels or a light
  residual conv block at stem levels. A 1×1 head on each of the ``min(4, n_stages − 1)`` finest levels
  gives deep supervision at exactly the scales of ``nnUNetTrainerExtBase._get_deep_supervision_scales``
  (highest resolution first).
"""
from __future__ import annotations

import os
from typing import Sequence, Type

import numpy as np
import torch
from torch import nn
from dynamic_network_architectures.building_blocks.helper import convert_dim_to_conv_op, get_matching_convtransp
from dynamic_network_architectures.initialization.weight_init import InitWeights_He

from nnunetv2_ext.blocks.gdla import GDLAM
from nnunetv2_ext.blocks.light_decoder import NUM_DS_OUTPUTS, LightResidualBlock, rename_legacy_heads
from nnunetv2_ext.blocks.pvt import OverlapPatchEmbed, PVTStage, reduction_ratios
from nnunetv2_ext.networks.plans import PlansError, check_patch_fits_strides, ops_from_plans

# PVTv2-b2 (Wang et al. 2022): the defaults for real training.
PVT_V2_B2 = dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8),
                 mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))
FIRST_STAGE_STRIDE = 4
PRETRAINED_ENV = 'NNUNETV2_EXT_PVT_WEIGHTS'
# init std of the patch embeddings' conv bias (init_weights: why it is not zero)
EMBED_BIAS_STD = 1.0


def first_transformer_level(strides: Sequence[Sequence[int]], first_stride: int = FIRST_STAGE_STRIDE) -> int:
    """The plans level of the first PVT stage: first ``j ≥ 1`` with ``max(c_j) ≥ first_stride``, else the last."""
    cumulative = np.cumprod(np.asarray(strides, dtype=int), axis=0)
    for j in range(1, len(strides)):
        if cumulative[j].max() >= first_stride:
            return j
    return len(strides) - 1


class PVTEncoder(nn.Module):
    """Native PVTv2 (2-D or 3-D): ``x (B, C_in, *P) -> [(B, embed_dims[i], *P / c_{k0+i})]``.

    ``stage_strides[0]`` is the first embedding's total stride, then one plans stride per stage;
    ``stage_kernels`` the plans' conv kernel of each stage's level (default 3 per axis).
    Spatial-reduction ratios are per axis (:func:`reduction_ratios`) on the grid of ``patch_size``.
    """

    def __init__(self, in_channels: int, patch_size: Sequence[int], stage_strides: Sequence[Sequence[int]],
                 embed_dims: Sequence[int], depths: Sequence[int], num_heads: Sequence[int],
                 mlp_ratios: Sequence[float], sr_ratios: Sequence[int], attention: str = 'softmax',
                 drop_path_rate: float = 0.0, stage_kernels: Sequence[Sequence[int]] | None = None):
        super().__init__()
        conv_op = convert_dim_to_conv_op(len(patch_size))
        rates = np.linspace(0, drop_path_rate, sum(depths)).tolist()
        grid = np.asarray(patch_size, dtype=int)
        stage_kernels = stage_kernels or [[3] * len(patch_size)] * len(stage_strides)
        self.stages = nn.ModuleList()
        prev = in_channels
        for i, stride in enumerate(stage_strides):
            grid = grid // np.asarray(stride)
            sr = reduction_ratios(grid.tolist(), sr_ratios[i])
            dp = rates[sum(depths[:i]):sum(depths[:i + 1])]
            self.stages.append(PVTStage(prev, embed_dims[i], stride, depths[i], num_heads[i], mlp_ratios[i], sr,
                                        conv_op, attention, dp, stage_kernels[i]))
            prev = embed_dims[i]
        self.output_channels = list(embed_dims[:len(stage_strides)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class TimmPVTv2Encoder(nn.Module):
    """timm's ``pvt_v2_b*`` (2-D, ``features_only``): ``x (B, C_in, H, W) -> 4 maps at strides 4, 8, 16, 32``.

    Built without weights; :meth:`load_pretrained` reads a local ImageNet checkpoint (never downloads).
    """

    def __init__(self, variant: str, in_channels: int, drop_path_rate: float = 0.0):
        super().__init__()
        import timm

        self.variant, self.in_channels = variant, in_channels
        self.body = timm.create_model(variant, pretrained=False, features_only=True, in_chans=in_channels,
                                      drop_path_rate=drop_path_rate)
        self.output_channels = list(self.body.feature_info.channels())

    def load_pretrained(self, path: str) -> None:
        """Loads ``path`` (timm ``.safetensors``/``.pth`` or the official PVTv2 ``.pth``) into the encoder.

        timm converts official checkpoints and adapts the first conv to ``in_channels``. Raises
        ``FileNotFoundError`` / ``RuntimeError`` naming the file and the fix.
        """
        import timm

        if not os.path.isfile(path):
            raise FileNotFoundError(f"PVTv2 weights file {path!r} does not exist (set {PRETRAINED_ENV} or the "
                                    f"trainer's `pretrained_weights` to a local {self.variant} checkpoint).")
        try:
            loaded = timm.create_model(self.variant, pretrained=True, features_only=True, in_chans=self.in_channels,
                                       pretrained_cfg_overlay=dict(file=path, url='', hf_hub_id=''))
            self.body.load_state_dict(loaded.state_dict())
        except Exception as e:  # noqa: BLE001 - any failure here means the file does not fit the model
            raise RuntimeError(f"{path!r} is not a usable {self.variant} checkpoint ({type(e).__name__}: {e}). "
                               f"Use ImageNet weights of exactly {self.variant} (timm or the official PVTv2 "
                               f"release), or unset {PRETRAINED_ENV} to train from scratch.") from e

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body(x)


class ConvStem(nn.Module):
    """Residual conv levels ``0 … k0−1`` at the plans' resolutions: level j =
    ``LightResidualBlock(σ(N(Conv_{stride=strides[j]}(level j−1))))`` (level −1 = the image)."""

    def __init__(self, in_channels: int, channels: Sequence[int], strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], conv_op: Type[nn.Module], norm_op, norm_op_kwargs,
                 nonlin, nonlin_kwargs):
        super().__init__()
        self.levels = nn.ModuleList()
        prev = in_channels
        for ch, stride, kernel in zip(channels, strides, kernel_sizes):
            self.levels.append(nn.Sequential(
                conv_op(prev, ch, kernel, stride=list(stride), padding=[(k - 1) // 2 for k in kernel]),
                norm_op(ch, **(norm_op_kwargs or {})), nonlin(**(nonlin_kwargs or {})),
                LightResidualBlock(ch, ch, conv_op, kernel, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs)))
            prev = ch

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class GDLADecoder(nn.Module):
    """``skips`` (levels ``0 … L−1``, highest resolution first) -> logits.

    ``h = block_{L−1}(skip_{L−1})`` at the deepest level (so even shallow plans get a GDLAM), then
    ``h = block_l(U_l(h) + skip_l)`` with ``U_l`` a transposed conv undoing ``strides[l+1]`` and ``block_l`` =
    GDLAM for ``l ≥ k0`` (transformer levels), a light residual conv block below; both with the plans' kernel
    ``kernel_sizes[l]``. Heads: 1×1 convs on the ``num_ds_outputs`` finest levels; ``deep_supervision``
    selects the list ``[level 0, level 1, …]`` or the full-resolution tensor alone.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[Sequence[int]], first_transformer: int,
                 block_heads: Sequence[int], kernel_sizes: Sequence[Sequence[int]], num_classes: int,
                 conv_op: Type[nn.Module], norm_op, norm_op_kwargs, nonlin, nonlin_kwargs, mlp_ratio: float = 2.0,
                 num_ds_outputs: int = NUM_DS_OUTPUTS, deep_supervision: bool = True):
        super().__init__()
        n = len(channels)
        transp_op = get_matching_convtransp(conv_op=conv_op)
        self.deep_supervision = deep_supervision
        self.num_ds_outputs = min(num_ds_outputs, n)
        self.upsample = nn.ModuleDict()
        self.blocks = nn.ModuleDict()
        for lvl in range(n - 1, -1, -1):
            if lvl < n - 1:
                self.upsample[str(lvl)] = transp_op(channels[lvl + 1], channels[lvl], strides[lvl + 1],
                                                    strides[lvl + 1])
            self.blocks[str(lvl)] = (
                GDLAM(channels[lvl], block_heads[lvl], conv_op, mlp_ratio, kernel_sizes[lvl])
                if lvl >= first_transformer else
                LightResidualBlock(channels[lvl], channels[lvl], conv_op, kernel_sizes[lvl], norm_op, norm_op_kwargs,
                                   nonlin, nonlin_kwargs))
        self.seg_layers = nn.ModuleList(conv_op(channels[j], num_classes, 1) for j in range(self.num_ds_outputs))
        self.register_load_state_dict_pre_hook(rename_legacy_heads)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        deepest = len(skips) - 1
        h = self.blocks[str(deepest)](skips[deepest])
        levels: dict[int, torch.Tensor] = {deepest: h}
        for lvl in range(deepest - 1, -1, -1):
            h = self.blocks[str(lvl)](self.upsample[str(lvl)](h) + skips[lvl])
            levels[lvl] = h
        if not self.deep_supervision:
            return self.seg_layers[0](levels[0])
        return [self.seg_layers[j](levels[j]) for j in range(self.num_ds_outputs)]


def gdla_heads(dim: int, head_dim: int) -> int:
    """Heads of a GDLAM at width ``dim``: ``dim // head_dim`` (one head if narrower); the head dim must be even."""
    heads = max(1, dim // head_dim)
    if dim % heads or (dim // heads) % 2:
        raise ValueError(f"decoder width {dim} does not split into heads of even size {head_dim}: choose "
                         f"embed_dims that are multiples of decoder_head_dim (or an even width below it)")
    return heads


class PVTGDLA(nn.Module):
    """PVTv2 encoder + full-resolution conv stem + GDLA decoder, for 2-D or 3-D patches.

    ``forward(x (B, in_channels, *patch_size))`` -> logits ``(B, num_classes, *patch_size / strides[0])``,
    or with ``decoder.deep_supervision`` the list over the ``min(4, len(strides) − 1)`` finest plans levels.

    Args:
        strides / kernel_sizes: the plans' per-level strides and conv kernels (any number ≥ 2 of levels); the
            kernels shape every conv of their level (stem, patch embedding, ConvFFN, GDLAM).
        embed_dims, depths, num_heads, mlp_ratios, sr_ratios: per transformer stage (PVTv2-b2 by default).
        attention: the encoder's softmax attention: ``'softmax'``, ``'elliptical'`` or ``'mahalanobis'``.
        stem_channels: width of the stem at full resolution, doubled per stem level (capped at embed_dims[0]).
        decoder_head_dim / decoder_mlp_ratio: GDLAM head size and GatedMLP expansion.
        timm_encoder: 2-D only: a timm ``pvt_v2_b*`` name to use instead of the native encoder (its
            stages are fixed at strides 4…32, so the plans must have those cumulative strides).
    """

    def __init__(self, in_channels: int, num_classes: int, patch_size: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]],
                 norm_op: Type[nn.Module] = nn.InstanceNorm3d, norm_op_kwargs: dict | None = None,
                 nonlin: Type[nn.Module] = nn.LeakyReLU, nonlin_kwargs: dict | None = None,
                 embed_dims: Sequence[int] = PVT_V2_B2['embed_dims'], depths: Sequence[int] = PVT_V2_B2['depths'],
                 num_heads: Sequence[int] = PVT_V2_B2['num_heads'],
                 mlp_ratios: Sequence[float] = PVT_V2_B2['mlp_ratios'],
                 sr_ratios: Sequence[int] = PVT_V2_B2['sr_ratios'], attention: str = 'softmax',
                 drop_path_rate: float = 0.1, stem_channels: int = 32, decoder_head_dim: int = 32,
                 decoder_mlp_ratio: float = 2.0, timm_encoder: str | None = None, deep_supervision: bool = True):
        super().__init__()
        dim = len(patch_size)
        strides = [[int(s) for s in st] for st in strides]
        if len(strides) < 2:
            raise PlansError(f"PVT-GDLA needs plans with at least 2 stages, got {len(strides)}: use a larger "
                             f"patch_size so the planner adds stages.")
        if not (len(embed_dims) == len(depths) == len(num_heads) == len(mlp_ratios) == len(sr_ratios)):
            raise ValueError("embed_dims, depths, num_heads, mlp_ratios and sr_ratios need one entry per stage")
        k0 = first_transformer_level(strides)
        num_stages = min(len(embed_dims), len(strides) - k0)
        used = k0 + num_stages
        check_patch_fits_strides(patch_size, strides[:used])
        conv_op = convert_dim_to_conv_op(dim)
        self.first_transformer_level = k0
        stage_strides = ([np.prod(strides[:k0 + 1], axis=0).astype(int).tolist()] + strides[k0 + 1:used])
        if timm_encoder is None:
            self.encoder = PVTEncoder(in_channels, patch_size, stage_strides, embed_dims[:num_stages],
                                      depths[:num_stages], num_heads[:num_stages], mlp_ratios[:num_stages],
                                      sr_ratios[:num_stages], attention, drop_path_rate, kernel_sizes[k0:used])
        else:
            expected = [[4, 4], [2, 2], [2, 2], [2, 2]]
            if dim != 2 or stage_strides != expected:
                raise PlansError(f"timm encoder {timm_encoder} is 2-D with stages at strides 4, 8, 16, 32, but these "
                                 f"plans give {dim}-D stage strides {stage_strides}: use the 2d configuration of "
                                 f"plans with ≥ 6 isotropic stride-2 stages, or the native encoder.")
            self.encoder = TimmPVTv2Encoder(timm_encoder, in_channels, drop_path_rate)
        stem_widths = [min(stem_channels * 2 ** j, self.encoder.output_channels[0]) for j in range(k0)]
        norm_kwargs = dict(norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        self.stem = ConvStem(in_channels, stem_widths, strides[:k0], kernel_sizes[:k0], conv_op, **norm_kwargs)
        channels = stem_widths + self.encoder.output_channels
        heads = [gdla_heads(c, decoder_head_dim) if lvl >= k0 else 0 for lvl, c in enumerate(channels)]
        self.decoder = GDLADecoder(channels, strides[:used], k0, heads, kernel_sizes[:used], num_classes, conv_op,
                                   mlp_ratio=decoder_mlp_ratio, deep_supervision=deep_supervision,
                                   num_ds_outputs=min(NUM_DS_OUTPUTS, len(strides) - 1), **norm_kwargs)
        for module in (self.stem, self.decoder) + ((self.encoder,) if timm_encoder is None else ()):
            module.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.decoder(self.stem(x) + self.encoder(x))

    @classmethod
    def from_plans(cls, configuration_manager, num_input_channels: int, num_output_channels: int,
                   deep_supervision: bool = True, **options) -> "PVTGDLA":
        """Builds the network for an nnU-Net ``ConfigurationManager``: patch size, strides, kernels, norm
        and nonlinearity from the plans; ``options`` go to the constructor (widths, ``attention``, …);
        ``widths_from_plans=True`` takes the widths from the plans' ``features_per_stage`` (:func:`plans_widths`)."""
        arch = configuration_manager.network_arch_init_kwargs
        ops = ops_from_plans(configuration_manager)
        if options.pop('widths_from_plans', False):
            options = {**plans_widths(arch['features_per_stage'], arch['strides']), **options}
        return cls(num_input_channels, num_output_channels, configuration_manager.patch_size, arch['strides'],
                   arch['kernel_sizes'], norm_op=ops.norm_op or nn.Identity, norm_op_kwargs=ops.norm_op_kwargs,
                   nonlin=ops.nonlin or nn.Identity, nonlin_kwargs=ops.nonlin_kwargs,
                   deep_supervision=deep_supervision, **options)


def plans_widths(features_per_stage: Sequence[int], strides: Sequence[Sequence[int]],
                 head_dim: int = 64) -> dict:
    """PVTv2-b2's depths/ratios with the plans' widths: ``embed_dims`` = ``features_per_stage`` at the
    transformer levels, ``stem_channels`` = ``features_per_stage[0]``, heads of ``head_dim`` channels (PVTv2's
    64; fewer when a width does not divide). Gives a PVT-GDLA the same width budget as nnU-Net's U-Net."""
    k0 = first_transformer_level(strides)
    dims = [int(d) for d in features_per_stage[k0:k0 + len(PVT_V2_B2['embed_dims'])]]

    def heads(dim: int) -> int:
        h = max(1, dim // head_dim)
        while dim % h:
            h -= 1
        return h

    n = len(dims)
    return dict(embed_dims=dims, num_heads=[heads(d) for d in dims], depths=PVT_V2_B2['depths'][:n],
                mlp_ratios=PVT_V2_B2['mlp_ratios'][:n], sr_ratios=PVT_V2_B2['sr_ratios'][:n],
                stem_channels=int(features_per_stage[0]))


def init_weights(module: nn.Module) -> None:
    """Linear: truncated normal (std 0.02), zero bias (PVT); convs: He (nnU-Net); LayerNorm: PyTorch's;
    patch-embedding conv bias: ``N(0, 1)``, not zero.

    Why the embedding bias is not zero: nnU-Net's masked z-scoring and its padding make the background exactly 0,
    so with a zero bias every background token enters the embedding's LayerNorm as the zero vector. LayerNorm
    divides by ``√(var + eps)`` with ``var = 0``, i.e. by ``√1e-5``, and so does every pre-norm LayerNorm of the
    first stage after it: the gradient of the embedding bias reached ~3·10⁴ on the anatomy benchmark's
    patches (every other parameter ≤ 10), the global clip at norm 12 then scaled all gradients by ~4·10⁻⁴
    (docs/pvt_gdla.md, "Convergence in short schedules"). A unit-variance bias gives a constant
    region a token of channel variance ≈ 1 (like the image content's at He init), so no LayerNorm amplifies it.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, OverlapPatchEmbed):  # visited after its conv (``apply`` is post-order)
        nn.init.normal_(module.proj.bias, std=EMBED_BIAS_STD)
    else:
        InitWeights_He(1e-2)(module)

"""Decoder-aware encoder refinement trainers (docs/enc_refine.md).

``nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerGLSP_EncRefine`` (or ``nnUNetTrainerPVTGDLA_EncRefine``)
trains with

    L = L_seg + attn_weight·L_attn + contrast_weight·L_contrast + boundary_weight·L_boundary
      (defaults 0.1 / 0.05 / 0.02; a weight of 0 switches its term off and skips its computation)

on the encoder's deepest token features ``P`` — the deepest feature map the network hands to its decoder,
captured with a forward pre-hook on ``network.decoder`` (for GLSP the fused MedNeXt + RWKV map, for
PVT-GDLA the last PVT stage). The attention mass ``w`` for ``L_attn`` is:

* PVT-GDLA: the decoder's deepest GDLAM really attends over these tokens: ``w`` = the column sums of its
  main GDLA core's two linear-attention maps (``φ(Q1)φ(K1)ᵀ`` and ``φ(Q2)φ(K2)ᵀ``, each row-normalised),
  averaged over both maps and the heads, computed in O(N) (:func:`linear_attention_mass`) from the q/k the
  core receives (forward pre-hook), under ``no_grad``. The differential weight λ is not applied (it can make
  the mass negative).
* GLSP (RWKV-UNet, 2-D or 3-D): its decoder is convolutional (the WKV attention lives in the encoder branch), so
  there is no decoder attention; the documented proxy is the channel norm of the decoder's first-stage
  features (``decoder.upsample[0]``'s output, the transposed-conv read of the deepest tokens) average-pooled
  back onto the token grid, detached.

The terms enter through the loss (:class:`EncRefineLoss` wraps nnU-Net's, so nnU-Net's own
``train_step`` — AMP, grad scaler, clipping — runs unchanged; validation gets the segmentation loss only).
Each term and the total are returned by ``train_step`` and logged per epoch (``print_to_log_file`` and the
nnU-Net logger keys ``enc_seg``, ``enc_attn``, ``enc_contrast``, ``enc_boundary``; ``train_losses`` is the total).
Label-based terms respect the dataset's ignore label; for region-based training each distinct region
combination counts as one class. ``torch.compile`` is off for these trainers (hooks store tensors;
set ``enc_refine_allow_compile = True`` in a subclass to try it).

Inference refinement (off by default): :func:`build_network_architecture` attaches
:class:`~nnunetv2_ext.refinement.inference.FeatureRefinementHook` to the decoder input (deepest level, eval
mode only) when the environment variables ``NNUNETV2_EXT_REFINE_BOX`` (residual box smoothing strength) and/or
``NNUNETV2_EXT_REFINE_FFT`` (FFT low-pass blend strength) are set to non-zero values when the network is
built (e.g. by ``nnUNetv2_predict``); ``NNUNETV2_EXT_REFINE_KERNEL`` (3) and ``NNUNETV2_EXT_REFINE_CUTOFF``
(0.25) tune them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch import distributed as dist
from torch.nn import functional as F

from nnunetv2_ext.env_options import env_float, env_int
from nnunetv2_ext.refinement.inference import FeatureRefinementHook
from nnunetv2_ext.refinement.losses import (attention_distillation_loss, boundary_loss, linear_attention_mass,
                                            mask_contrastive_loss)
from nnunetv2_ext.trainers.glsp import nnUNetTrainerGLSP
from nnunetv2_ext.trainers.pvt_gdla import nnUNetTrainerPVTGDLA

TERMS = ('enc_seg', 'enc_attn', 'enc_contrast', 'enc_boundary')
REFINE_ENV = {'box': 'NNUNETV2_EXT_REFINE_BOX', 'fft': 'NNUNETV2_EXT_REFINE_FFT',
              'kernel': 'NNUNETV2_EXT_REFINE_KERNEL', 'cutoff': 'NNUNETV2_EXT_REFINE_CUTOFF'}


def attach_inference_refinement(network: nn.Module, box_strength: float = 0.0, fft_strength: float = 0.0,
                                kernel: int = 3, cutoff: float = 0.25):
    """Refines the deepest feature map ``network.decoder`` receives (eval mode only); returns the hook handle
    (None when both strengths are 0)."""
    if box_strength == 0 and fft_strength == 0:
        return None
    hook = FeatureRefinementHook(box_strength, fft_strength, kernel, cutoff, levels=(-1,))

    def pre_hook(module, args):
        if module.training:
            return None
        return (hook(module, args, list(args[0])),) + tuple(args[1:])

    return network.decoder.register_forward_pre_hook(pre_hook)


def refinement_from_env(network: nn.Module):
    """:func:`attach_inference_refinement` with the ``REFINE_ENV`` options: strengths in [0, 1] (default 0),
    an odd kernel in [1, 15] (3), a cutoff in [0, 2] (0.25; ``sqrt(3)`` already keeps every frequency).

    Raises :class:`~nnunetv2_ext.env_options.EnvOptionError` for an invalid value (nan, inf, out of range).
    """
    return attach_inference_refinement(network, env_float(REFINE_ENV['box'], 0.0, 0.0, 1.0),
                                       env_float(REFINE_ENV['fft'], 0.0, 0.0, 1.0),
                                       env_int(REFINE_ENV['kernel'], 3, 1, 15, odd=True),
                                       env_float(REFINE_ENV['cutoff'], 0.25, 0.0, 2.0))


def _unwrap(network: nn.Module) -> nn.Module:
    network = network.module if hasattr(network, 'module') and isinstance(network, nn.parallel.DistributedDataParallel) \
        else network
    return getattr(network, '_orig_mod', network)


class EncRefineLoss(nn.Module):
    """``aux(seg_loss(output, target), target)``: nnU-Net's loss with the encoder terms added by ``aux``
    (the trainer's ``_add_encoder_terms``), so nnU-Net's ``train_step`` and ``validation_step`` run unchanged."""

    def __init__(self, seg_loss: nn.Module, aux):
        super().__init__()
        self.seg_loss = seg_loss
        self.aux = aux

    def forward(self, output, target) -> torch.Tensor:
        return self.aux(self.seg_loss(output, target), target)


class EncRefineMixin:
    """Adds the auxiliary encoder-token losses to nnU-Net's ``train_step`` (see module docstring).

    Subclasses implement :meth:`_install_attention_hook` (store the detached ``(B, N)`` mass of the
    deepest tokens in ``self._enc_cache['mass']``).
    """

    attn_weight = 0.1
    contrast_weight = 0.05
    boundary_weight = 0.02
    contrast_num_anchors = 256
    contrast_temperature = 0.1
    enc_refine_allow_compile = False

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """The base trainer's network with the inference-time refinement of ``REFINE_ENV`` attached."""
        network = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                     num_output_channels, enable_deep_supervision)
        refinement_from_env(network)
        return network

    # ------------------------------------------------------------ hooks
    def _enc_refine_setup(self) -> None:
        net = _unwrap(self.network)
        if getattr(self, '_enc_hooked', None) is net:
            return
        self._enc_cache = {}

        def capture_tokens(module, args):
            if module.training:
                self._enc_cache['tokens'] = args[0][-1]

        self._enc_handles = [net.decoder.register_forward_pre_hook(capture_tokens)]
        if self.attn_weight:
            self._enc_handles.append(self._install_attention_hook(net))
        self._enc_hooked = net

    def _install_attention_hook(self, net: nn.Module):
        raise NotImplementedError

    def _do_i_compile(self):
        return self.enc_refine_allow_compile and super()._do_i_compile()

    # ------------------------------------------------------------ labels
    def _token_labels(self, target: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """Full-resolution target -> ``(B, 1, *S)`` integer classes and the ignore value (or None)."""
        lm = self.label_manager
        if lm.has_regions:
            regions = target[:, :-1] if lm.has_ignore_label else target
            weights = 2 ** torch.arange(regions.shape[1], device=target.device, dtype=torch.float32)
            ids = (regions.float() * weights.view(1, -1, *[1] * (target.ndim - 2))).sum(1, keepdim=True)
            if lm.has_ignore_label:
                ids = torch.where(target[:, -1:] > 0, torch.full_like(ids, -1), ids)
                return ids, -1
            return ids, None
        return target, lm.ignore_label if lm.has_ignore_label else None

    # ------------------------------------------------------------ losses
    def encoder_refinement_losses(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted terms' raw values (unweighted) from the captured tokens; only non-zero weights."""
        tokens = self._enc_cache.get('tokens')
        if tokens is None:
            raise RuntimeError("the encoder's deepest features were not captured (network.decoder not called?)")
        out = {}
        if self.attn_weight:
            out['enc_attn'] = attention_distillation_loss(tokens, self._enc_cache['mass'])
        if self.contrast_weight or self.boundary_weight:
            labels, ignore = self._token_labels(target)
            if self.contrast_weight:
                out['enc_contrast'] = mask_contrastive_loss(tokens, labels, self.contrast_num_anchors,
                                                            self.contrast_temperature, ignore)
            if self.boundary_weight:
                out['enc_boundary'] = boundary_loss(tokens, labels, ignore)
        return out

    def _build_loss(self):
        return EncRefineLoss(super()._build_loss(), self._add_encoder_terms)

    def _add_encoder_terms(self, l_seg: torch.Tensor, target) -> torch.Tensor:
        """``l_seg + Σ weight·term`` for a training forward (tokens captured); ``l_seg`` otherwise (validation)."""
        cache = getattr(self, '_enc_cache', None)
        if not cache or 'tokens' not in cache:
            return l_seg
        terms = self.encoder_refinement_losses(target[0] if isinstance(target, (list, tuple)) else target)
        cache.clear()
        weights = {'enc_attn': self.attn_weight, 'enc_contrast': self.contrast_weight,
                   'enc_boundary': self.boundary_weight}
        self._enc_terms = {'enc_seg': l_seg.detach(), **{k: v.detach() for k, v in terms.items()}}
        return l_seg + sum(weights[k] * v for k, v in terms.items())

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's own ``train_step`` (AMP, grad scaler, clipping) — the terms come in through ``self.loss``;
        adds each term's value to the returned dict for the epoch log."""
        self._enc_refine_setup()
        self._enc_cache.clear()
        self._enc_terms = {}
        result = super().train_step(batch)
        result.update({k: v.float().cpu().numpy() for k, v in self._enc_terms.items()})
        return result

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        store = getattr(getattr(self.logger, 'local_logger', self.logger), 'my_fantastic_logging', None)
        parts = []
        for key in TERMS:
            values = [o[key] for o in train_outputs if key in o]
            if not values:
                continue
            value = float(np.mean(values))
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, value)
                value = float(np.mean(gathered))
            if store is not None:
                store.setdefault(key, [])
                self.logger.log(key, value, self.current_epoch)
            parts.append(f'{key[4:]} {value:.4f}')
        if parts:
            total = float(np.mean([o['loss'] for o in train_outputs]))
            self.print_to_log_file(f'enc_refine train loss {total:.4f} = ' + ', '.join(parts) +
                                   f' (weights attn {self.attn_weight}, contrast {self.contrast_weight}, '
                                   f'boundary {self.boundary_weight})')


class nnUNetTrainerGLSP_EncRefine(EncRefineMixin, nnUNetTrainerGLSP):
    """RWKV-UNet with the auxiliary encoder losses; ``L_attn`` uses the decoder-response proxy (module docstring)."""

    def _install_attention_hook(self, net: nn.Module):
        def capture_mass(module, args, output):
            if module.training:
                with torch.no_grad():
                    tokens = self._enc_cache['tokens']
                    norms = output.detach().float().norm(dim=1, keepdim=True)
                    pooled = F.adaptive_avg_pool3d(norms, tokens.shape[2:]) if norms.ndim == 5 else \
                        F.adaptive_avg_pool2d(norms, tokens.shape[2:])
                    self._enc_cache['mass'] = pooled.flatten(1)

        return net.decoder.upsample[0].register_forward_hook(capture_mass)


class nnUNetTrainerPVTGDLA_EncRefine(EncRefineMixin, nnUNetTrainerPVTGDLA):
    """PVT-GDLA with the auxiliary encoder losses; ``L_attn`` uses the deepest GDLAM's O(N) attention mass."""

    def _install_attention_hook(self, net: nn.Module):
        blocks = net.decoder.blocks
        core = blocks[str(max(int(k) for k in blocks.keys()))].attn.main

        def capture_mass(module, args):
            if module.training:
                with torch.no_grad():
                    self._enc_cache['mass'] = gdla_core_mass(module, args[0], args[1])

        return core.register_forward_pre_hook(capture_mass)


def gdla_core_mass(core: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention mass ``(B, N)`` of a ``GatedDiffLinearAttentionCore`` on its raw ``q, k`` ``(B, N, C)``:
    the mean over heads and over its two linear-attention maps (halves ``Q1,K1`` and ``Q2,K2``) of the O(N)
    column sums, with the core's own ε."""
    q, k = core._heads(q.detach()), core._heads(k.detach())
    d = core.head_dim // 2
    return 0.5 * (linear_attention_mass(q[..., :d], k[..., :d], core.eps) +
                  linear_attention_mass(q[..., d:], k[..., d:], core.eps))

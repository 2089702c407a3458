"""PVT-GDLA trainers: PVTv2 encoder + GDLA decoder, optionally elliptical encoder attention (docs/pvt_gdla.md).

Every nnU-Net configuration (2d, 3d_lowres, 3d_fullres, cascade) is served; the network follows the plans'
strides and per-axis kernels. A variant that changes network options sets ``network_options`` (keyword
arguments of :meth:`PVTGDLA.from_plans`); ``build_network_architecture`` is a classmethod with nnU-Net's
signature, so both nnU-Net's trainer (``self.build_network_architecture(...)``) and ``nnUNetPredictor``
(``trainer_class.build_network_architecture(...)``) build the variant's network.

Optimiser (transformer recipe instead of nnU-Net's SGD): AdamW, ``initial_lr = adamw_lr`` (3e-4; 1e-3 for the
plans-width variant, see its docstring),
``weight_decay = 0.05`` (decoupled) on weights only — no decay on biases, norm weights, GDLA's λ and
per-head RMSNorm weights; the lr rises linearly over ``warmup_epochs = 10`` epochs, then follows
nnU-Net's poly decay (exponent 0.9). Gradients are clipped at norm 12 by nnU-Net's ``train_step``
(kept). These values are a sensible default, not tuned per dataset.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import _LRScheduler

from nnunetv2_ext.networks.pvt_gdla import PRETRAINED_ENV, PVTGDLA
from nnunetv2_ext.trainers.base import nnUNetTrainerExtBase


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (weights with ≥ 2 dims) and not decayed (biases, norm weights, and the
    parameters a module lists in ``no_weight_decay_params``, e.g. GDLA's λ)."""
    exempt = {id(getattr(m, name)) for m in model.modules() for name in getattr(m, 'no_weight_decay_params', ())}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or id(p) in exempt else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


WEIGHT_DECAY = 0.05  # decoupled, on weights only


def adamw(model: nn.Module, lr: float, weight_decay: float = WEIGHT_DECAY) -> torch.optim.AdamW:
    """The PVT-GDLA trainers' AdamW (betas 0.9/0.999, eps 1e-8) on :func:`weight_decay_groups`."""
    return torch.optim.AdamW(weight_decay_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8)


class WarmupPolyLRScheduler(_LRScheduler):
    """Per epoch ``e``: ``lr = initial_lr · (e + 1) / W`` for ``e < W``,
    then ``initial_lr · (1 − (e − W)/(E − W))^0.9``.

    Stateless in ``e`` like nnU-Net's ``PolyLRScheduler`` (which the trainer steps with the epoch), so
    ``--c`` resumes on the right value.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int, warmup_steps: int,
                 exponent: float = 0.9):
        self.initial_lr, self.max_steps, self.exponent = initial_lr, max_steps, exponent
        self.warmup_steps = max(0, min(warmup_steps, max_steps - 1))
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return self.initial_lr * max(0.0, 1 - progress) ** self.exponent

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step, self.ctr = self.ctr, self.ctr + 1
        for group in self.optimizer.param_groups:
            group['lr'] = self.lr_at(current_step)
        self._last_lr = [group['lr'] for group in self.optimizer.param_groups]


class nnUNetTrainerPVTGDLA(nnUNetTrainerExtBase):
    """PVTv2-b2-sized encoder (native 2-D/3-D), GDLA decoder, AdamW with warmup (module docstring).

    Widths and options: set ``network_options`` in a subclass (keyword arguments of ``PVTGDLA.from_plans``).
    2-D ImageNet initialisation: ``nnUNetTrainerPVTGDLA_ImageNet`` (weights from a local file only).
    """

    warmup_epochs = 10
    adamw_lr = 3e-4  # nnU-Net's ``initial_lr`` for this trainer's AdamW (nnU-Net's __init__ sets 1e-2 for SGD)
    network_options: dict[str, Any] = {'attention': 'softmax'}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.adamw_lr
        self.weight_decay = WEIGHT_DECAY

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return PVTGDLA.from_plans(configuration_manager, num_input_channels, num_output_channels,
                                  enable_deep_supervision, **cls.network_options)

    def configure_optimizers(self):
        optimizer = adamw(self.network, self.initial_lr, self.weight_decay)
        scheduler = WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)
        return optimizer, scheduler


class nnUNetTrainerPVTGDLA_Elliptical(nnUNetTrainerPVTGDLA):
    """As :class:`nnUNetTrainerPVTGDLA` with the encoder's attention elliptical (the paper's diagonal metric)."""

    network_options = {'attention': 'elliptical'}


class nnUNetTrainerPVTGDLA_Mahalanobis(nnUNetTrainerPVTGDLA):
    """As :class:`nnUNetTrainerPVTGDLA` with key-covariance Mahalanobis attention in the encoder."""

    network_options = {'attention': 'mahalanobis'}


class nnUNetTrainerPVTGDLA_PlansWidths(nnUNetTrainerPVTGDLA):
    """As :class:`nnUNetTrainerPVTGDLA` with the plans' ``features_per_stage`` as widths instead of PVTv2-b2's
    (``pvt_gdla.plans_widths``): the same width budget as ``nnUNetTrainer`` on the same plans.

    AdamW at 1e-3 instead of 3e-4: at the narrow widths of the six-subject cohort (8…64, 5000 steps, fold 0)
    3e-4 learned 10–11 of the 16 structures on the held-out subjects, 1e-3 all 16 (docs/pvt_gdla.md,
    "Convergence on the six-subject cohort")."""

    network_options = {'attention': 'softmax', 'widths_from_plans': True}
    adamw_lr = 1e-3


class nnUNetTrainerPVTGDLA_ImageNet(nnUNetTrainerPVTGDLA):
    """2-D only: timm's ``pvt_v2_b2`` encoder initialised from a local ImageNet checkpoint.

    The file is ``pretrained_weights`` (set it in a subclass) or else the environment variable
    ``NNUNETV2_EXT_PVT_WEIGHTS``; it is read once when training starts (not for ``--c`` resumes, whose
    checkpoint overwrites it, nor for prediction). Nothing is downloaded.
    """

    network_options = {'timm_encoder': 'pvt_v2_b2'}
    pretrained_weights: str | None = None

    def initialize(self):
        first = not self.was_initialized
        super().initialize()
        if first:
            path = self.pretrained_weights or os.environ.get(PRETRAINED_ENV)
            if not path:
                raise RuntimeError(f"{type(self).__name__} needs ImageNet weights: set {PRETRAINED_ENV} to a local "
                                   f"pvt_v2_b2 checkpoint (timm .safetensors/.pth or the official release), or use "
                                   f"nnUNetTrainerPVTGDLA to train from scratch.")
            network = self.network.module if self.is_ddp else self.network
            getattr(network, '_orig_mod', network).encoder.load_pretrained(path)
            self.print_to_log_file(f'Loaded ImageNet encoder weights from {path}')

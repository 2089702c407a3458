"""Reading network settings out of nnU-Net plans, with errors that say what to fix."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import nn


class PlansError(ValueError):
    """The plans cannot build the requested network; the message names the problem and the fix."""


def check_patch_fits_strides(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> None:
    """Raise :class:`PlansError` unless every patch axis is divisible by the product of its strides.

    nnU-Net's planner guarantees this; hand-edited plans may not, and the failure would otherwise
    surface as a shape mismatch deep inside the decoder.
    """
    total = np.prod(np.asarray(strides, dtype=int), axis=0)
    bad = [(ax, p, int(t)) for ax, (p, t) in enumerate(zip(patch_size, total)) if p % t]
    if bad:
        details = ', '.join(f'axis {ax}: patch {p} vs total stride {t}' for ax, p, t in bad)
        raise PlansError(f"patch_size {list(patch_size)} does not fit the network's strides {[list(s) for s in strides]} "
                         f"({details}). Each patch axis must be a positive multiple of the product of the strides "
                         f"along it: re-run nnUNetv2_plan_and_preprocess, or fix 'patch_size'/'strides' in the plans.")


def stock_encoder_from_plans(configuration_manager, num_input_channels: int) -> nn.Module:
    """The encoder of nnU-Net's own network for this configuration (plain or residual, as planned).

    Builds the planned architecture with nnU-Net's initialisation and keeps its ``.encoder``, so
    plans with ``PlainConvUNet``, ``ResidualEncoderUNet`` (ResEnc M/L/XL presets) or any other
    encoder-decoder of dynamic-network-architectures are honoured. Returns an encoder with
    ``return_skips=True``: ``forward(x)`` gives one feature map per stage, highest resolution first.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = configuration_manager.network_arch_class_name
    kwargs = configuration_manager.network_arch_init_kwargs
    check_patch_fits_strides(configuration_manager.patch_size, kwargs['strides'])
    stock = get_network_from_plans(arch, kwargs, configuration_manager.network_arch_init_kwargs_req_import,
                                   num_input_channels, 2, allow_init=True, deep_supervision=False)
    encoder = getattr(stock, 'encoder', None)
    needed = ('output_channels', 'strides', 'conv_op', 'return_skips')
    if encoder is None or not all(hasattr(encoder, a) for a in needed):
        raise PlansError(f"the plans' architecture {arch} has no U-Net encoder (an `.encoder` with {needed}); "
                         f"use plans made by nnU-Net's ExperimentPlanner or a ResEnc planner (-pl nnUNetPlannerResEncM).")
    encoder.return_skips = True
    return encoder

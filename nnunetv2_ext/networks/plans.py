"""Reading network settings out of nnU-Net plans, with errors that say what to fix."""
from __future__ import annotations

import pydoc
from dataclasses import dataclass
from typing import Sequence, Type

import numpy as np
from torch import nn
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim


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


@dataclass(frozen=True)
class PlansOps:
    """A configuration's layer types and their arguments, resolved from the plans' dotted names."""
    conv_op: Type[nn.Module]
    norm_op: Type[nn.Module] | None
    norm_op_kwargs: dict
    nonlin: Type[nn.Module] | None
    nonlin_kwargs: dict
    conv_bias: bool

    @property
    def ndim(self) -> int:
        """Spatial axes of the configuration (2 for ``nn.Conv2d``, 3 for ``nn.Conv3d``)."""
        return convert_conv_op_to_dim(self.conv_op)


def _resolve(arch_kwargs: dict, key: str):
    value = arch_kwargs.get(key)
    if not isinstance(value, str):
        return value
    resolved = pydoc.locate(value)
    if resolved is None:
        raise PlansError(f"the plans' {key} {value!r} cannot be imported: fix '{key}' in the plans (a dotted "
                         f"name such as 'torch.nn.modules.conv.Conv3d') or re-run nnUNetv2_plan_and_preprocess.")
    return resolved


def ops_from_plans(configuration_manager) -> PlansOps:
    """The ``conv_op``, ``norm_op``, ``nonlin`` (and their kwargs) of a ``ConfigurationManager``'s plans.

    Raises :class:`PlansError` when a name does not import, or when ``conv_op``, ``patch_size``, ``strides``
    and ``kernel_sizes`` disagree on the number of spatial axes (hand-edited plans).
    """
    arch = configuration_manager.network_arch_init_kwargs
    conv_op = _resolve(arch, 'conv_op')
    patch = list(configuration_manager.patch_size)
    if not (isinstance(conv_op, type) and issubclass(conv_op, (nn.Conv2d, nn.Conv3d))):
        raise PlansError(f"the plans' conv_op {arch.get('conv_op')!r} is not nn.Conv2d or nn.Conv3d: fix 'conv_op' "
                         f"in the plans or re-run nnUNetv2_plan_and_preprocess.")
    ndim = convert_conv_op_to_dim(conv_op)
    lengths = {'patch_size': [len(patch)], 'strides': sorted({len(s) for s in arch['strides']}),
               'kernel_sizes': sorted({len(k) for k in arch['kernel_sizes']})}
    bad = {key: n for key, n in lengths.items() if n != [ndim]}
    if bad:
        raise PlansError(f"the plans' conv_op is {ndim}-D but {', '.join(f'{k} has {v} axes' for k, v in bad.items())}"
                         f": every patch_size, strides and kernel_sizes entry needs {ndim} values; re-run "
                         f"nnUNetv2_plan_and_preprocess or fix the plans.")
    norm_op, nonlin = _resolve(arch, 'norm_op'), _resolve(arch, 'nonlin')
    return PlansOps(conv_op, norm_op, dict(arch.get('norm_op_kwargs') or {}) if norm_op else {}, nonlin,
                    dict(arch.get('nonlin_kwargs') or {}) if nonlin else {}, bool(arch.get('conv_bias', True)))


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

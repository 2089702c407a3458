"""nnU-Net's encoder (from the plans) + the light conv decoder (:mod:`nnunetv2_ext.blocks.light_decoder`)."""
from __future__ import annotations

import torch
from torch import nn
from dynamic_network_architectures.initialization.weight_init import InitWeights_He

from nnunetv2_ext.blocks.light_decoder import LightDecoder
from nnunetv2_ext.networks.plans import stock_encoder_from_plans


class LightDecoderUNet(nn.Module):
    """``encoder(x) -> skips -> LightDecoder(skips)``.

    ``x``: ``(B, in_ch, *patch)``. Output: logits ``(B, num_classes, *patch)``, or with deep
    supervision the list of the ``min(4, n_stages-1)`` finest levels, highest resolution first.
    ``self.decoder.deep_supervision`` is the switch nnU-Net's trainer flips.
    """

    def __init__(self, encoder: nn.Module, kernel_sizes, num_classes: int, deep_supervision: bool = True):
        super().__init__()
        self.encoder = encoder
        self.decoder = LightDecoder(
            encoder.output_channels, encoder.strides, kernel_sizes, num_classes, conv_op=encoder.conv_op,
            norm_op=encoder.norm_op, norm_op_kwargs=encoder.norm_op_kwargs, nonlin=encoder.nonlin,
            nonlin_kwargs=encoder.nonlin_kwargs, conv_bias=encoder.conv_bias, deep_supervision=deep_supervision)
        self.decoder.apply(InitWeights_He(1e-2))

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))

    @classmethod
    def from_plans(cls, configuration_manager, num_input_channels: int, num_output_channels: int,
                   deep_supervision: bool = True) -> "LightDecoderUNet":
        encoder = stock_encoder_from_plans(configuration_manager, num_input_channels)
        kernel_sizes = configuration_manager.network_arch_init_kwargs['kernel_sizes']
        return cls(encoder, kernel_sizes, num_output_channels, deep_supervision)

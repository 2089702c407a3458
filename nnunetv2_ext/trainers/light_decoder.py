"""``nnUNetTrainerLightDecoder``: nnU-Net's planned encoder + the light conv decoder (DESIGN §4).

The ablation "does the decoder matter?": everything but the decoder is stock nnU-Net.
"""
from __future__ import annotations

from torch import nn

from nnunetv2_ext.networks.light_decoder_unet import LightDecoderUNet
from nnunetv2_ext.trainers.base import nnUNetTrainerExtBase


class nnUNetTrainerLightDecoder(nnUNetTrainerExtBase):
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return LightDecoderUNet.from_plans(configuration_manager, num_input_channels, num_output_channels,
                                           enable_deep_supervision)

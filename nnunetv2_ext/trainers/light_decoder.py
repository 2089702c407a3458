"""``nnUNetTrainerLightDecoder``: nnU-Net's planned encoder + the light conv decoder.

The ablation "does the decoder matter?": everything but the decoder is stock nnU-Net.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunetv2_ext.losses import SquaredDenominatorDiceLoss
from nnunetv2_ext.networks.light_decoder_unet import LightDecoderUNet
from nnunetv2_ext.trainers.base import nnUNetTrainerExtBase


class nnUNetTrainerLightDecoder(nnUNetTrainerExtBase):
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return LightDecoderUNet.from_plans(configuration_manager, num_input_channels, num_output_channels,
                                           enable_deep_supervision)


class nnUNetTrainerLightDecoder_VNetDice(nnUNetTrainerLightDecoder):
    """The V-Net Dice (Milletari et al. 2016, eq. 1), ``1 − 2⟨Y,Ŷ⟩/(‖Y‖² + ‖Ŷ‖²)``, in place of nnU-Net's plain-sum soft Dice."""

    def _build_loss(self):
        loss = super()._build_loss()
        base = loss.loss if self.enable_deep_supervision else loss
        dc = getattr(base.dc, '_orig_mod', base.dc)  # nnU-Net may have compiled it
        base.dc = SquaredDenominatorDiceLoss(apply_nonlin=dc.apply_nonlin, batch_dice=dc.batch_dice, do_bg=dc.do_bg,
                                             smooth=dc.smooth, ddp=dc.ddp)
        if self._do_i_compile():
            base.dc = torch.compile(base.dc)
        return loss

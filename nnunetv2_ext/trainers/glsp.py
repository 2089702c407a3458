"""RWKV-UNet trainers on every nnU-Net configuration (2d, 3d_lowres, 3d_fullres, cascade):
``nnUNetv2_train DATASET 2d|3d_fullres FOLD -tr nnUNetTrainerGLSP``.

* ``nnUNetTrainerGLSP``: MedNeXt encoder + GLSP/WKV branch + light decoder, the plans' ``conv_op`` and norm; the
  full-resolution encoder stage and the GLSP blocks are recomputed in backward (~40 % of the stored
  activations at realistic 3-D plans for ~1 % of a step's FLOPs).
* ``nnUNetTrainerGLSP_NoRWKV``: the same network without the RWKV branch and its fusions (ablation).
* ``nnUNetTrainerGLSP_BN``: BatchNorm everywhere; under DDP nnU-Net's ``initialize`` converts it to
  SyncBatchNorm (``nn.SyncBatchNorm.convert_sync_batchnorm``); nothing is recomputed (a recomputation would
  update the running statistics twice).
* ``nnUNetTrainerGLSP_Checkpoint``: gradient checkpointing of every encoder stage and GLSP block, for
  large patches (same results, less memory, more time).
* ``nnUNetTrainerGLSP_NoRecompute``: nothing recomputed (same results, more memory, a little less time).

A variant that changes network options sets ``network_options`` (keyword arguments of
:meth:`RWKVUNet.from_plans`); ``build_network_architecture`` is a classmethod with nnU-Net's signature, so both
nnU-Net's trainer (``self.build_network_architecture(...)``) and ``nnUNetPredictor``
(``trainer_class.build_network_architecture(...)``) build the variant's network. Training, loss and deep
supervision ((8,4,2,1)/15) are :class:`nnUNetTrainerExtBase`'s.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from nnunetv2_ext.networks.rwkv_unet import RWKVUNet
from nnunetv2_ext.trainers.base import nnUNetTrainerExtBase


class nnUNetTrainerGLSP(nnUNetTrainerExtBase):
    network_options: dict[str, Any] = {}

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return RWKVUNet.from_plans(configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision, **cls.network_options)


class nnUNetTrainerGLSP_NoRWKV(nnUNetTrainerGLSP):
    network_options = {'rwkv_branch': False}


class nnUNetTrainerGLSP_BN(nnUNetTrainerGLSP):
    network_options = {'batch_norm': True}


class nnUNetTrainerGLSP_Checkpoint(nnUNetTrainerGLSP):
    network_options = {'checkpoint_blocks': True}


class nnUNetTrainerGLSP_NoRecompute(nnUNetTrainerGLSP):
    network_options = {'checkpoint_levels': 0, 'checkpoint_branch': False}

"""RWKV-UNet-3D trainers (DESIGN §3): ``nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerGLSP``.

* ``nnUNetTrainerGLSP``: MedNeXt encoder + GLSP3D/WKV branch + light decoder, the plans' norm; the
  full-resolution encoder stage and the GLSP3D blocks are recomputed in backward (~40 % of the stored
  activations at realistic plans for ~1 % of a step's FLOPs).
* ``nnUNetTrainerGLSP_NoRWKV``: the same network without the RWKV branch and its fusions (ablation).
* ``nnUNetTrainerGLSP_BN``: BatchNorm3d everywhere (the design notes' choice); under DDP nnU-Net's
  ``initialize`` converts it to SyncBatchNorm (``nn.SyncBatchNorm.convert_sync_batchnorm``); nothing is
  recomputed (a recomputation would update the running statistics twice).
* ``nnUNetTrainerGLSP_Checkpoint``: gradient checkpointing of every encoder stage and GLSP3D block, for
  large patches (same results, less memory, more time).
* ``nnUNetTrainerGLSP_NoRecompute``: nothing recomputed (same results, more memory, a little less time).

Training, loss and deep supervision ((8,4,2,1)/15) are :class:`nnUNetTrainerExtBase`'s. The networks
compile with ``torch.compile`` (the WKV call is a graph break, see ``spatial_mix.wkv_float32``).
"""
from __future__ import annotations

from torch import nn

from nnunetv2_ext.networks.rwkv_unet import RWKVUNet3D
from nnunetv2_ext.trainers.base import nnUNetTrainerExtBase


class nnUNetTrainerGLSP(nnUNetTrainerExtBase):
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return RWKVUNet3D.from_plans(configuration_manager, num_input_channels, num_output_channels,
                                     enable_deep_supervision)


class nnUNetTrainerGLSP_NoRWKV(nnUNetTrainerGLSP):
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return RWKVUNet3D.from_plans(configuration_manager, num_input_channels, num_output_channels,
                                     enable_deep_supervision, rwkv_branch=False)


class nnUNetTrainerGLSP_BN(nnUNetTrainerGLSP):
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return RWKVUNet3D.from_plans(configuration_manager, num_input_channels, num_output_channels,
                                     enable_deep_supervision, batch_norm=True)


class nnUNetTrainerGLSP_Checkpoint(nnUNetTrainerGLSP):
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return RWKVUNet3D.from_plans(configuration_manager, num_input_channels, num_output_channels,
                                     enable_deep_supervision, checkpoint_blocks=True)


class nnUNetTrainerGLSP_NoRecompute(nnUNetTrainerGLSP):
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return RWKVUNet3D.from_plans(configuration_manager, num_input_channels, num_output_channels,
                                     enable_deep_supervision, checkpoint_levels=0, checkpoint_branch=False)

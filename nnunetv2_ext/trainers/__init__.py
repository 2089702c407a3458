"""All trainers of nnunetv2_ext (public API: subclass them to change schedules, losses, ...)."""
from nnunetv2_ext.discovery import nnunet_version_problem

_problem = nnunet_version_problem()
if _problem is not None:
    raise ImportError(_problem)

from nnunetv2_ext.trainers.base import nnUNetTrainerExtBase  # noqa: E402
from nnunetv2_ext.trainers.demo import nnUNetTrainer_ExtDemo, nnUNetTrainerLightDecoder_ExtDemo  # noqa: E402
from nnunetv2_ext.trainers.light_decoder import nnUNetTrainerLightDecoder, nnUNetTrainerLightDecoder_VNetDice  # noqa: E402,E501
from nnunetv2_ext.trainers.glsp import (nnUNetTrainerGLSP, nnUNetTrainerGLSP_BN,  # noqa: E402
                                        nnUNetTrainerGLSP_Checkpoint, nnUNetTrainerGLSP_NoRecompute,
                                        nnUNetTrainerGLSP_NoRWKV)
from nnunetv2_ext.trainers.pvt_gdla import (nnUNetTrainerPVTGDLA, nnUNetTrainerPVTGDLA_Elliptical,  # noqa: E402
                                            nnUNetTrainerPVTGDLA_ImageNet, nnUNetTrainerPVTGDLA_Mahalanobis,
                                            nnUNetTrainerPVTGDLA_PlansWidths)
from nnunetv2_ext.trainers.enc_refine import nnUNetTrainerGLSP_EncRefine, nnUNetTrainerPVTGDLA_EncRefine  # noqa: E402

__all__ = [
    'nnUNetTrainerExtBase',
    'nnUNetTrainerLightDecoder',
    'nnUNetTrainerLightDecoder_VNetDice',
    'nnUNetTrainer_ExtDemo',
    'nnUNetTrainerLightDecoder_ExtDemo',
    'nnUNetTrainerGLSP',
    'nnUNetTrainerGLSP_NoRWKV',
    'nnUNetTrainerGLSP_BN',
    'nnUNetTrainerGLSP_Checkpoint',
    'nnUNetTrainerGLSP_NoRecompute',
    'nnUNetTrainerPVTGDLA',
    'nnUNetTrainerPVTGDLA_Elliptical',
    'nnUNetTrainerPVTGDLA_Mahalanobis',
    'nnUNetTrainerPVTGDLA_ImageNet',
    'nnUNetTrainerPVTGDLA_PlansWidths',
    'nnUNetTrainerGLSP_EncRefine',
    'nnUNetTrainerPVTGDLA_EncRefine',
]

"""Short-schedule trainers for the built-in demo and smoke runs (never for reported results).

``nnUNetTrainer_ExtDemo`` is stock ``nnUNetTrainer``; ``nnUNetTrainerLightDecoder_ExtDemo`` is ours;
both train ``NNUNETV2_EXT_DEMO_EPOCHS`` epochs (default 4) of ``NNUNETV2_EXT_DEMO_ITERS`` iterations
(default 25), validating on 2 batches, so the comparison uses identical schedules.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_ext.env_options import env_int
from nnunetv2_ext.trainers.base import CrashSafeCheckpoints
from nnunetv2_ext.trainers.light_decoder import nnUNetTrainerLightDecoder


def _apply_demo_schedule(trainer: nnUNetTrainer) -> None:
    trainer.num_epochs = env_int('NNUNETV2_EXT_DEMO_EPOCHS', 4, 1, 100_000)
    trainer.num_iterations_per_epoch = env_int('NNUNETV2_EXT_DEMO_ITERS', 25, 1, 100_000)
    trainer.num_val_iterations_per_epoch = 2


class nnUNetTrainer_ExtDemo(CrashSafeCheckpoints, nnUNetTrainer):  # stock training, crash-safe files
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_demo_schedule(self)


class nnUNetTrainerLightDecoder_ExtDemo(nnUNetTrainerLightDecoder):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_demo_schedule(self)

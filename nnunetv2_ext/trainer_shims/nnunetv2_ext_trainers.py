# Imported as a top-level module by nnU-Net's trainer lookup (nnUNet_extTrainer); re-exports only.
from nnunetv2_ext.trainers import *  # noqa: F401,F403

"""nnU-Net v2 plugin: extra trainers and networks driven by nnU-Net's own CLIs.

Importing this package is cheap (no torch, no nnunetv2): it runs at every interpreter start through
the startup hook. The trainers live in :mod:`nnunetv2_ext.trainers`; :func:`register_trainers` makes them
findable by nnU-Net's trainer lookup in a script that sets ``nnUNet_extTrainer`` itself.
"""
from nnunetv2_ext.discovery import register_trainers

__all__ = ['register_trainers']
__version__ = "0.1.0"

"""nnU-Net v2 plugin: extra trainers and networks driven by nnU-Net's own CLIs.

Importing this package is cheap (no torch, no nnunetv2): it runs at every interpreter start through
the startup hook. The trainers live in :mod:`nnunetv2_ext.trainers`.
"""
__version__ = "0.1.0"

"""Decoder-aware encoder refinement (docs/enc_refine.md): auxiliary token losses and training-free inference refinement.

* :mod:`nnunetv2_ext.refinement.losses`: attention-mass (O(N)), attention distillation, mask-aware
  contrastive and boundary losses on encoder tokens;
* :mod:`nnunetv2_ext.refinement.inference`: residual box smoothing and FFT low-pass blending of features.
"""
from nnunetv2_ext.refinement.inference import box_smooth_residual, fft_lowpass_blend  # noqa: F401
from nnunetv2_ext.refinement.losses import (attention_distillation_loss, boundary_loss,  # noqa: F401
                                            linear_attention_mass, mask_contrastive_loss)

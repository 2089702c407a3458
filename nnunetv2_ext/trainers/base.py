"""Base trainer: stock nnU-Net training, deep supervision on the four finest outputs (DESIGN §4)."""
from __future__ import annotations

import numpy as np
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_ext.blocks.light_decoder import NUM_DS_OUTPUTS


def deep_supervision_weights(num_outputs: int) -> np.ndarray:
    """Weights ``2^(L-1-i) / Σ`` for outputs ``i = 0..L-1`` (highest resolution first).

    ``L = 4`` gives ``(8, 4, 2, 1) / 15``; every output is used (nnU-Net's stock scheme zeroes
    the coarsest one instead).
    """
    w = 2.0 ** np.arange(num_outputs - 1, -1, -1)
    return w / w.sum()


class nnUNetTrainerExtBase(nnUNetTrainer):
    """nnU-Net's trainer with the light decoder's supervision: the ``min(4, n_stages-1)`` finest
    outputs, weighted ``(8, 4, 2, 1)/15`` on nnU-Net's own CE+Dice (or BCE+Dice for regions, with the
    ignore label handled as upstream). Subclasses override only ``build_network_architecture``;
    their networks return exactly ``len(self._get_deep_supervision_scales())`` outputs.
    """

    def _get_deep_supervision_scales(self):
        scales = super()._get_deep_supervision_scales()
        return None if scales is None else scales[:NUM_DS_OUTPUTS]

    def _build_loss(self):
        loss = super()._build_loss()
        if self.enable_deep_supervision:
            loss.weight_factors = tuple(deep_supervision_weights(len(self._get_deep_supervision_scales())))
        return loss

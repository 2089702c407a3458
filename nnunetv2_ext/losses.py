"""Loss options beyond nnU-Net's own."""
from __future__ import annotations

import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.ddp_allgather import AllGatherGrad


class SquaredDenominatorDiceLoss(MemoryEfficientSoftDiceLoss):
    """V-Net soft Dice (Milletari et al. 2016, eq. 1): ``-(2⟨Y,Ŷ⟩ + s) / (‖Y‖² + ‖Ŷ‖² + s)``.

    Same interface and options as nnU-Net's ``MemoryEfficientSoftDiceLoss`` (``apply_nonlin``,
    ``batch_dice``, ``do_bg``, ``smooth``, ``ddp``, ``loss_mask`` for the ignore label), which uses
    plain sums ``ΣY + ΣŶ`` instead. ``x``: logits ``(B, C, *spatial)``; ``y``: labels
    ``(B, 1, *spatial)`` or one-hot ``(B, C, *spatial)``. Since ``Y`` is binary, only ``Ŷ`` is squared.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.apply_nonlin is not None:
            x = self.apply_nonlin(x)
        axes = tuple(range(2, x.ndim))
        with torch.no_grad():
            if x.ndim != y.ndim:
                y = y.view((y.shape[0], 1, *y.shape[1:]))
            if x.shape == y.shape:
                y_onehot = y.to(torch.float32)
            else:
                y_onehot = torch.zeros(x.shape, device=x.device, dtype=torch.float32).scatter_(1, y.long(), 1)
            if not self.do_bg:
                y_onehot = y_onehot[:, 1:]
            if loss_mask is not None:
                y_onehot = y_onehot * loss_mask
        if not self.do_bg:
            x = x[:, 1:]
        if loss_mask is not None:
            x = x * loss_mask
        sums = torch.stack([(x * y_onehot).sum(axes, dtype=torch.float32), (x * x).sum(axes, dtype=torch.float32),
                            y_onehot.sum(axes, dtype=torch.float32)])  # (3, B, C): intersect, ‖Ŷ‖², ‖Y‖²
        if self.batch_dice:
            if self.ddp:
                sums = AllGatherGrad.apply(sums).sum(0)  # (world, 3, B, C) -> summed over ranks
            sums = sums.sum(1, dtype=torch.float32)
        intersect, sum_pred_sq, sum_gt = sums
        dc = (2 * intersect + self.smooth) / (sum_gt + sum_pred_sq + float(self.smooth)).clamp_min(1e-8)
        return -dc.mean()

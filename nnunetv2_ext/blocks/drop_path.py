"""Stochastic depth (Huang et al. 2016): drop a residual branch per sample while training."""
from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """``x (B, ...) -> x · mask_b / (1 − p)``, ``mask_b ~ Bernoulli(1 − p)`` per sample in training; else identity."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f'p={self.p}'

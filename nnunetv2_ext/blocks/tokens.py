"""Conversions between channel-first grids ``(B, C, *S)`` and token sequences ``(B, N, C)``, N = prod(S)."""
from __future__ import annotations

from typing import Sequence

import torch


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *S) -> (B, N, C)``, tokens in row-major order of ``S`` (last axis fastest)."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_grid(x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """``(B, N, C) -> (B, C, *spatial_shape)``; inverse of :func:`grid_to_tokens`."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *spatial_shape)

"""Directional token shift of a flattened image or volume: ``q_shift`` (2-D, Vision-RWKV) and ``q_shift_3d``.

A parameter-free "directional convolution" (Duan et al. 2024, Vision-RWKV, "Q-Shift"): for ``x`` of shape
``(B, N, C)`` that is a flattened ``(B, C, *size)`` grid in row-major order (last axis fastest) and
``g = int(C·gamma)``, channel group pairs move by ``shift`` along each axis, last axis first:

    channels [0:g]    take the value of the neighbour at w - s   (content moves +W)
    channels [g:2g]   ... at w + s                                (content moves -W)
    channels [2g:3g]  ... at h - s (+H)      channels [3g:4g] ... at h + s (-H)
    channels [4g:5g]  ... at d - s (+D)      channels [5g:6g] ... at d + s (-D)      (3-D only)
    channels [2·ndim·g:]  unshifted

Tokens whose source lies outside the grid become 0. 2-D uses Vision-RWKV's ``gamma = 1/4`` (all four
groups, every channel shifted); 3-D defaults to ``gamma = 1/8``: 6/8 of the channels move (one eighth per
direction) and 2/8 stay at their own voxel, so the following token mixing sees the voxel and its six face
neighbours.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

# default fraction of channels per shifted group, by number of spatial axes
SHIFT_GAMMA = {2: 1 / 4, 3: 1 / 8}


def _q_shift(x: torch.Tensor, size: Sequence[int], shift: int, gamma: float, name: str) -> torch.Tensor:
    ndim = len(size)
    if x.dim() != 3:
        raise ValueError(f"{name} expects (B, N, C), got shape {tuple(x.shape)}")
    B, N, C = x.shape
    size = [int(s) for s in size]
    if math.prod(size) != N:
        raise ValueError(f"{name}: size {tuple(size)} has {math.prod(size)} voxels but the sequence has N={N}")
    groups = 2 * ndim
    if not 0 <= gamma <= 1 / groups:
        raise ValueError(f"{name}: gamma={gamma} must lie in [0, 1/{groups}] ({groups} shifted groups of C·gamma "
                         f"channels)")
    if shift < 0:
        raise ValueError(f"{name}: shift={shift} must be >= 0")
    g = int(C * gamma)
    grid = x.reshape(B, *size, C)  # channels-last view: no copy
    out = torch.zeros_like(grid)
    out[..., groups * g:] = grid[..., groups * g:]
    for i, axis in enumerate(range(ndim, 0, -1)):  # axes of the (B, *size, C) view: last spatial axis first
        length = grid.shape[axis] - shift
        if g == 0 or length <= 0:
            continue  # whole group shifted out of the grid: stays zero
        plus, minus = slice(2 * i * g, (2 * i + 1) * g), slice((2 * i + 1) * g, (2 * i + 2) * g)
        out.narrow(axis, shift, length)[..., plus] = grid.narrow(axis, 0, length)[..., plus]
        out.narrow(axis, 0, length)[..., minus] = grid.narrow(axis, shift, length)[..., minus]
    return out.reshape(B, N, C)


def q_shift(x: torch.Tensor, size: Sequence[int], shift: int = 1, gamma: float = SHIFT_GAMMA[2]) -> torch.Tensor:
    """Shift channel groups of ``x`` ``(B, N, C)`` by ``shift`` pixels along ±W, ±H of ``size = (H, W)``.

    Returns a new ``(B, N, C)`` tensor (layout in the module docstring). Raises ``ValueError`` if ``H·W != N``,
    ``gamma`` is outside ``[0, 1/4]`` or ``shift < 0``.
    """
    if len(size) != 2:
        raise ValueError(f"q_shift is 2-D: size must be (H, W), got {tuple(size)} (use q_shift_3d for volumes)")
    return _q_shift(x, size, shift, gamma, 'q_shift')


def q_shift_3d(x: torch.Tensor, size: Sequence[int], shift: int = 1, gamma: float = SHIFT_GAMMA[3]) -> torch.Tensor:
    """Shift channel groups of ``x`` ``(B, N, C)`` by ``shift`` voxels along ±W, ±H, ±D of ``size = (D, H, W)``.

    Returns a new ``(B, N, C)`` tensor (layout in the module docstring). Raises ``ValueError`` if ``D·H·W != N``,
    ``gamma`` is outside ``[0, 1/6]`` or ``shift < 0``.
    """
    if len(size) != 3:
        raise ValueError(f"q_shift_3d is 3-D: size must be (D, H, W), got {tuple(size)} (use q_shift for images)")
    return _q_shift(x, size, shift, gamma, 'q_shift_3d')


# the shift for a grid with that many spatial axes
Q_SHIFT = {2: q_shift, 3: q_shift_3d}

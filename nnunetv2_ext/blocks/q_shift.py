"""Directional token shift for volumetric sequences (``q_shift_3d``, DESIGN §3).

A parameter-free "directional convolution": for ``x`` of shape ``(B, N, C)`` with ``N = D·H·W``
(W fastest, i.e. ``x`` is a flattened ``(B, C, D, H, W)`` volume) and ``g = int(C·gamma)``:

    channels [0:g]    take the value of the neighbour at w - s   (content moves +W)
    channels [g:2g]   ... at w + s                                (content moves -W)
    channels [2g:3g]  ... at h - s (+H)      channels [3g:4g] ... at h + s (-H)
    channels [4g:5g]  ... at d - s (+D)      channels [5g:6g] ... at d + s (-D)
    channels [6g:]    unshifted

Voxels whose source lies outside the volume become 0. The default ``gamma = 1/8`` shifts 6/8 of
the channels (one eighth per direction) and keeps 2/8 at their own voxel, so the following
token mixing always sees both the voxel itself and its six face neighbours.
"""
from __future__ import annotations

from typing import Sequence

import torch

# axis of the (B, D, H, W, C) view moved by each pair of channel groups: W, H, D
_AXES = (3, 2, 1)


def q_shift_3d(x: torch.Tensor, size: Sequence[int], shift: int = 1, gamma: float = 1 / 8) -> torch.Tensor:
    """Shift channel groups of ``x`` ``(B, N, C)`` by ``shift`` voxels along ±W, ±H, ±D of ``size = (D, H, W)``.

    Returns a new tensor ``(B, N, C)``; see the module docstring for the channel layout.
    """
    if x.dim() != 3:
        raise ValueError(f"q_shift_3d expects (B, N, C), got shape {tuple(x.shape)}")
    B, N, C = x.shape
    D, H, W = (int(s) for s in size)
    if D * H * W != N:
        raise ValueError(f"q_shift_3d: size {tuple(size)} has {D * H * W} voxels but the sequence has N={N}")
    if not 0 <= gamma <= 1 / 6:
        raise ValueError(f"q_shift_3d: gamma={gamma} must lie in [0, 1/6] (six shifted groups of C·gamma channels)")
    if shift < 0:
        raise ValueError(f"q_shift_3d: shift={shift} must be >= 0")
    g = int(C * gamma)
    vol = x.reshape(B, D, H, W, C)  # channels-last view: no copy
    out = torch.zeros_like(vol)
    out[..., 6 * g:] = vol[..., 6 * g:]
    for i, axis in enumerate(_AXES):
        length = vol.shape[axis] - shift
        if g == 0 or length <= 0:
            continue  # whole group shifted out of the volume: stays zero
        plus, minus = slice(2 * i * g, (2 * i + 1) * g), slice((2 * i + 1) * g, (2 * i + 2) * g)
        out.narrow(axis, shift, length)[..., plus] = vol.narrow(axis, 0, length)[..., plus]
        out.narrow(axis, 0, length)[..., minus] = vol.narrow(axis, shift, length)[..., minus]
    return out.reshape(B, N, C)

"""Training-free refinement of encoder features at inference. Off by default (strength 0).

Both functions map ``x (B, C, *S)`` (2-D or 3-D) to a tensor of the same shape and dtype, are the
identity at ``strength = 0`` and keep a spatially constant field unchanged.

* :func:`box_smooth_residual`: ``x + s·(box_k(x) − x)``, ``box_k`` a ``k×k(×k)`` mean over the in-image
  neighbours (``count_include_pad=False``: borders average only real tokens).
* :func:`fft_lowpass_blend`: ``(1 − s)·x + s·lowpass(x)``, ``lowpass`` an ideal radial low-pass in the
  Fourier domain (``rfftn`` over the spatial dims) keeping the normalised frequencies
  ``ρ = sqrt(Σ_d (f_d / 0.5)²) ≤ cutoff`` (``f_d`` in cycles per token, 0.5 = Nyquist, so ``cutoff = 1``
  keeps everything up to Nyquist along each single axis).

:class:`FeatureRefinementHook` applies them to the outputs of a module (e.g. the features an encoder
hands to the decoder), only in eval mode.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def box_smooth_residual(x: torch.Tensor, strength: float, kernel: int = 3) -> torch.Tensor:
    """``x + strength · (box(x) − x)`` with ``box`` the ``kernel``-wide mean over the 2-D/3-D grid."""
    if strength == 0:
        return x
    if kernel % 2 != 1:
        raise ValueError(f"kernel must be odd, got {kernel}")
    pool = {4: F.avg_pool2d, 5: F.avg_pool3d}.get(x.ndim)
    if pool is None:
        raise ValueError(f"expected (B, C, *S) with a 2-D/3-D grid, got {tuple(x.shape)}")
    smooth = pool(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return x + strength * (smooth - x)


def lowpass_mask(shape, cutoff: float, device=None) -> torch.Tensor:
    """Boolean ``rfftn`` mask for a spatial ``shape``: ``sqrt(Σ_d (2 f_d)²) ≤ cutoff`` (``f`` in cycles/token)."""
    freqs = [torch.fft.fftfreq(n, device=device) for n in shape[:-1]] + [torch.fft.rfftfreq(shape[-1], device=device)]
    grids = torch.meshgrid(*freqs, indexing='ij')
    rho = torch.sqrt(sum((2 * g) ** 2 for g in grids))
    return rho <= cutoff + 1e-9


def fft_lowpass_blend(x: torch.Tensor, strength: float, cutoff: float = 0.25) -> torch.Tensor:
    """``(1 − strength)·x + strength·lowpass(x)``; the FFT runs in float32 (or float64 for float64 input)."""
    if strength == 0:
        return x
    if x.ndim not in (4, 5):
        raise ValueError(f"expected (B, C, *S) with a 2-D/3-D grid, got {tuple(x.shape)}")
    dims = tuple(range(2, x.ndim))
    spatial = x.shape[2:]
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        spec = torch.fft.rfftn(x.to(dtype), dim=dims)
        spec = spec * lowpass_mask(spatial, cutoff, x.device)
        low = torch.fft.irfftn(spec, s=spatial, dim=dims)
    return ((1 - strength) * x.to(dtype) + strength * low).to(x.dtype)


def refine_features(x: torch.Tensor, box_strength: float = 0.0, fft_strength: float = 0.0, kernel: int = 3,
                    cutoff: float = 0.25) -> torch.Tensor:
    """Box smoothing then the FFT blend (each skipped at strength 0)."""
    return fft_lowpass_blend(box_smooth_residual(x, box_strength, kernel), fft_strength, cutoff)


class FeatureRefinementHook:
    """Forward hook refining a module's output (a tensor or a list of ``(B, C, *S)`` tensors) in eval mode.

    ``levels``: indices into the list to refine (default: the last, deepest one; ``None`` for all).
    ``attach(module)`` registers it and returns the handle (``handle.remove()`` to detach).
    """

    def __init__(self, box_strength: float = 0.0, fft_strength: float = 0.0, kernel: int = 3, cutoff: float = 0.25,
                 levels=(-1,)):
        for name, value in (('box_strength', box_strength), ('fft_strength', fft_strength), ('cutoff', cutoff)):
            if not math.isfinite(value):
                raise ValueError(f'{name}={value} is not finite: it would turn every refined feature into NaN')
        if kernel < 1 or kernel % 2 != 1:
            raise ValueError(f'kernel={kernel}: the box kernel must be a positive odd integer')
        self.box_strength, self.fft_strength = box_strength, fft_strength
        self.kernel, self.cutoff, self.levels = kernel, cutoff, levels

    def _refine(self, x):
        return refine_features(x, self.box_strength, self.fft_strength, self.kernel, self.cutoff)

    def __call__(self, module: nn.Module, args, output):
        if module.training or (self.box_strength == 0 and self.fft_strength == 0):
            return None
        if isinstance(output, torch.Tensor):
            return self._refine(output)
        out = list(output)
        chosen = range(len(out)) if self.levels is None else [i % len(out) for i in self.levels]
        for i in chosen:
            out[i] = self._refine(out[i])
        return out

    def attach(self, module: nn.Module):
        return module.register_forward_hook(self)

"""Memory-lean pointwise MLP of a MedNeXt block: ``y = PW₂(GELU(PW₁(x)))`` (1×1 convs, 2-D or 3-D).

Plain autograd keeps three tensors for its backward: ``x`` (for PW₁'s weight gradient), ``h = PW₁(x)`` (for
GELU') and ``a = GELU(h)`` (for PW₂'s weight gradient) — ``h`` and ``a`` are ``r`` times wider than ``x``
(expansion ratio ``r``). :func:`pointwise_mlp` keeps only ``x`` and ``h`` and recomputes the element-wise
``a = GELU(h)`` in backward: ``r·C`` fewer stored channels per voxel for one GELU of extra work, with the
same outputs and gradients as plain autograd (the same ATen kernels run on the same tensors). Under
autocast the convolutions run in the autocast dtype as they would unwrapped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {4: F.conv2d, 5: F.conv3d}  # by the weight's ndim


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a convolution on ``x`` in (``x.dtype`` when autocast is off)."""
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _conv_backward(gy, x, w, has_bias: bool, mask: tuple[bool, bool]):
    """Gradients of ``convNd(x, w, b)`` (1×1, stride 1) w.r.t. ``x, w, b`` — autograd's own kernel."""
    ones, zeros = [1] * (w.dim() - 2), [0] * (w.dim() - 2)
    return torch.ops.aten.convolution_backward(gy, x, w, [w.shape[0]] if has_bias else None, ones, zeros,
                                               ones, False, zeros, 1, [mask[0], mask[1], has_bias])


class _PointwiseMLP(torch.autograd.Function):
    """``(x, w1, b1, w2, b2) -> convNd(gelu(convNd(x, w1, b1)), w2, b2)``, storing ``x`` and the hidden ``h``."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):  # type: ignore[override]
        dtype = _compute_dtype(x)
        xc, w1c, b1c, w2c, b2c = (_cast(t, dtype) for t in (x, w1, b1, w2, b2))
        conv = _CONV[w1.dim()]
        with torch.autocast(x.device.type, enabled=False):
            h = conv(xc, w1c, b1c)
            y = conv(F.gelu(h), w2c, b2c)
        ctx.save_for_backward(xc, h, w1c, w2c)
        ctx.dtypes = (x.dtype, w1.dtype, w2.dtype)
        ctx.has_bias = (b1 is not None, b2 is not None)
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        xc, h, w1c, w2c = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        x_dtype, w1_dtype, w2_dtype = ctx.dtypes
        gy = gy.to(h.dtype)
        ga, gw2, gb2 = _conv_backward(gy, F.gelu(h), w2c, ctx.has_bias[1], (True, need_w2))
        gh = torch.ops.aten.gelu_backward(ga, h)
        gx, gw1, gb1 = _conv_backward(gh, xc, w1c, ctx.has_bias[0], (need_x, need_w1))
        cast = lambda g, dtype, need: g.to(dtype) if need and g is not None else None  # noqa: E731
        return (cast(gx, x_dtype, need_x), cast(gw1, w1_dtype, need_w1), cast(gb1, w1_dtype, need_b1),
                cast(gw2, w2_dtype, need_w2), cast(gb2, w2_dtype, need_b2))


def pointwise_mlp(x: torch.Tensor, expand: nn.Conv2d | nn.Conv3d, compress: nn.Conv2d | nn.Conv3d) -> torch.Tensor:
    """``compress(GELU(expand(x)))`` for ``x`` ``(B, C, *S)`` (2-D or 3-D) and 1×1 convs ``expand: C -> rC``,
    ``compress: rC -> C_out``; returns ``(B, C_out, *S)``, storing ``x`` and ``expand(x)`` for backward.

    Raises ``ValueError`` unless both are 1×1 (1×1×1) ``nn.Conv2d``/``nn.Conv3d`` of ``x``'s dimension with
    stride 1 and one group."""
    ones = (1,) * (x.dim() - 2)
    for conv in (expand, compress):
        if (not isinstance(conv, (nn.Conv2d, nn.Conv3d)) or conv.kernel_size != ones or conv.stride != ones
                or conv.groups != 1 or conv.padding_mode != 'zeros'):
            raise ValueError(f"pointwise_mlp needs {'×'.join('1' * len(ones))} convs with stride 1 and one group "
                             f"for a {len(ones)}-D input of shape {tuple(x.shape)}, got {conv}")
    return _PointwiseMLP.apply(x, expand.weight, expand.bias, compress.weight, compress.bias)

"""Helpers shared by every block and network of the package (one place, one convention).

* :func:`per_axis` / :func:`as_triple` — a kernel size or stride given as an int or per axis, as a tuple.
* :func:`norm_factory` / :func:`instance_norm_for` — ``channels -> nn.Module`` factories (``NormLayer``) from
  the plans' ``norm_op`` (class, dotted name or ``None``) and ``norm_op_kwargs``.
* :func:`run_checkpointed` — activation recomputation (``torch.utils.checkpoint``) that is switched per call.
* :func:`elu_feature_map` — ``φ(x) = ELU(x) + 1``, the positive feature map of linear attention
  (Katharopoulos et al. 2020, "Transformers are RNNs", eq. 7).
* :func:`float32_region` — run a block of maths in (at least) float32 with autocast off.
* :func:`split_heads` / :func:`merge_heads` — ``(B, N, C) <-> (B, h, N, C/h)``.
* :func:`depthwise_conv` — a depthwise conv with per-axis (plans') kernel and 'same' padding.
"""
from __future__ import annotations

import contextlib
import pydoc
from functools import partial
from typing import Callable, Iterator, Sequence, Type

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, get_matching_instancenorm

NormLayer = Callable[[int], nn.Module]


def per_axis(value: int | Sequence[int], ndim: int, name: str = 'value') -> tuple[int, ...]:
    """``value`` (an int, or one int per spatial axis) as a tuple of ``ndim`` ints.

    Raises ``ValueError`` when a sequence has the wrong length (e.g. a 3-D kernel size for a 2-D network).
    """
    if isinstance(value, int):
        return (value,) * ndim
    out = tuple(int(v) for v in value)
    if len(out) != ndim:
        raise ValueError(f"{name} {list(out)} has {len(out)} entries but the network is {ndim}-D: give one int "
                         f"or {ndim} values (one per spatial axis)")
    return out


def as_triple(value: int | Sequence[int], name: str = 'value') -> tuple[int, int, int]:
    """:func:`per_axis` for 3-D: ``3 -> (3, 3, 3)``, ``(1, 3, 3) -> (1, 3, 3)``."""
    return per_axis(value, 3, name)  # type: ignore[return-value]


def norm_factory(norm_op: Type[nn.Module] | str | None, norm_op_kwargs: dict | None = None) -> NormLayer:
    """``channels -> norm_op(channels, **norm_op_kwargs)``, for the plans' ``norm_op``.

    ``norm_op`` may be a class, a dotted name as stored in nnU-Net plans (``'torch.nn.modules.instancenorm.
    InstanceNorm2d'``) or ``None`` (no norm: ``nn.Identity``). Raises ``ValueError`` for a name that does
    not resolve to an ``nn.Module`` class.
    """
    if isinstance(norm_op, str):
        resolved = pydoc.locate(norm_op)
        if not (isinstance(resolved, type) and issubclass(resolved, nn.Module)):
            raise ValueError(f"norm_op {norm_op!r} is not an importable torch.nn module class: fix 'norm_op' in the "
                             f"plans (e.g. 'torch.nn.modules.instancenorm.InstanceNorm3d')")
        norm_op = resolved
    if norm_op is None:
        return lambda channels: nn.Identity()
    return partial(norm_op, **(norm_op_kwargs or {}))


def instance_norm_for(conv_op: Type[nn.Module]) -> NormLayer:
    """The affine instance norm matching ``conv_op`` (``nn.Conv2d -> InstanceNorm2d``), nnU-Net's default norm."""
    return norm_factory(get_matching_instancenorm(conv_op), {'affine': True})


def is_batch_norm(norm_layer: NormLayer) -> bool:
    """Whether ``norm_layer`` builds a BatchNorm (its running statistics would be updated twice by a recomputation)."""
    op = norm_layer.func if isinstance(norm_layer, partial) else norm_layer
    return isinstance(op, type) and issubclass(op, nn.modules.batchnorm._BatchNorm)


def run_checkpointed(module: nn.Module, x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``module(x)``; with ``enabled`` and autograd on, activations inside ``module`` are recomputed
    in backward instead of stored (``torch.utils.checkpoint``, non-reentrant)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``φ(x) = ELU(x) + 1`` elementwise (positive, so a linear-attention normaliser is positive)."""
    return torch.nn.functional.elu(x) + 1


@contextlib.contextmanager
def float32_region(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """``with float32_region(a, b) as (a32, b32):`` — autocast off inside, the tensors cast to
    ``promote_types(dtype, float32)`` (float64 stays float64). Results keep that dtype; cast back if needed.

    For sums over many tokens (linear attention, WKV) that overflow or lose precision in half precision.
    """
    if not tensors:
        raise ValueError("float32_region needs at least one tensor (it takes the device from the first)")
    with torch.autocast(tensors[0].device.type, enabled=False):
        yield tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, N, C) -> (B, num_heads, N, C/num_heads)``; raises ``ValueError`` if ``C % num_heads``."""
    b, n, c = x.shape
    if c % num_heads:
        raise ValueError(f"{c} channels do not split into {num_heads} heads: choose a width divisible by the heads")
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, h, N, D) -> (B, N, h·D)``; inverse of :func:`split_heads`."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def depthwise_conv(conv_op: Type[nn.Module], channels: int, kernel_size: int | Sequence[int]) -> nn.Module:
    """Depthwise ``conv_op`` (``groups = channels``) with a per-axis odd ``kernel_size`` (e.g. the plans'
    ``(1, 3, 3)``) and padding ``k // 2`` per axis, so the grid keeps its shape and an axis with kernel 1 is
    never mixed. Raises ``ValueError`` for an even kernel (no symmetric 'same' padding exists)."""
    kernel = per_axis(kernel_size, convert_conv_op_to_dim(conv_op), 'kernel_size')
    if any(k % 2 == 0 for k in kernel):
        raise ValueError(f"depthwise kernel {list(kernel)} has an even entry: use odd kernel sizes (1, 3, 5, ...)")
    return conv_op(channels, channels, kernel, padding=[k // 2 for k in kernel], groups=channels)

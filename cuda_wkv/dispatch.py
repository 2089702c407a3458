"""Backend selection, input validation, dtype handling and the autograd Function."""
from __future__ import annotations

import os
from typing import Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from . import loader
from .reference import bi_wkv_scan

__all__ = ["bi_wkv", "backend_for", "requested_backend", "BACKEND_ENV"]

BACKEND_ENV = "CUDA_WKV_BACKEND"
_VALID_BACKENDS = ("auto", "cpu", "cuda", "torch")


def requested_backend() -> str:
    """The backend requested through ``CUDA_WKV_BACKEND`` (default ``auto``)."""
    raw = os.environ.get(BACKEND_ENV, "auto")
    val = raw.strip().lower() or "auto"
    if val not in _VALID_BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={raw!r} is not a valid backend; expected one of "
                         f"{', '.join(_VALID_BACKENDS)}")
    return val


def _device_of(x: Union[torch.Tensor, torch.device, str]) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    return torch.device(x)


def _select(device_type: str, build: bool = True) -> str:
    req = requested_backend()
    if req == "torch":
        return "torch"
    kind = device_type if device_type in ("cpu", "cuda") else None
    if req != "auto" and req != kind:
        raise ValueError(f"{BACKEND_ENV}={req} cannot run on tensors on device "
                         f"'{device_type}'; unset it or use 'auto' / 'torch'")
    if kind is None:  # e.g. mps / xpu: no kernel, the PyTorch path works anywhere
        return "torch"
    if loader.failure_reason(kind) is not None:
        return "torch"
    if not build:
        return kind
    return kind if loader.load_extension(kind) is not None else "torch"


def _select_for_call(device_type: str) -> str:
    return _select(device_type, True)


# Under torch.compile the backend choice is evaluated eagerly and baked into the graph
# (it depends only on the device type, the environment and the build outcome).
_assume_const = getattr(getattr(torch, "compiler", None), "assume_constant_result", None)
if _assume_const is not None:
    _select_for_call = _assume_const(_select_for_call)


def backend_for(x: Union[torch.Tensor, torch.device, str], build: bool = True) -> str:
    """Backend that :func:`bi_wkv` uses for tensors like ``x``: 'cpu', 'cuda' or 'torch'.

    With ``build=True`` (default) the kernel is built/loaded if needed, so the answer
    accounts for build failures (then 'torch').  With ``build=False`` nothing is
    compiled and the intended backend is returned (a kernel that already failed to
    build in this process still reports 'torch').
    """
    return _select(_device_of(x).type, build)


def _validate(w, u, k, v) -> None:
    for name, x in (("w", w), ("u", u), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"bi_wkv: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"bi_wkv: {name} must be a floating-point tensor, got {x.dtype}")
    if k.dim() != 3:
        raise ValueError(f"bi_wkv: k must have shape (B, T, C), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"bi_wkv: v must have the same shape as k {tuple(k.shape)}, "
                         f"got {tuple(v.shape)}")
    C = k.shape[2]
    for name, x in (("w", w), ("u", u)):
        if x.shape != (C,):
            raise ValueError(f"bi_wkv: {name} must have shape (C,) = ({C},) to match "
                             f"k {tuple(k.shape)}, got {tuple(x.shape)}")
    devs = {name: x.device for name, x in (("w", w), ("u", u), ("k", k), ("v", v))}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n}: {d}" for n, d in devs.items())
        raise ValueError(f"bi_wkv: all inputs must be on the same device, got {desc}")


class _BiWKVFunction(torch.autograd.Function):
    """Autograd wrapper around a compiled kernel module (forward + closed-form backward).

    Used when ``torch.library.custom_op`` is unavailable (old PyTorch)."""

    @staticmethod
    def forward(ctx, w, u, k, v, ext):  # type: ignore[override]
        y, m, r = ext.forward(w, u, k, v)
        ctx.ext = ext
        ctx.save_for_backward(w, u, k, v, y, m, r)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):  # type: ignore[override]
        w, u, k, v, y, m, r = ctx.saved_tensors
        gy = gy.to(k.dtype).contiguous()
        gw, gu, gk, gv = ctx.ext.backward(w, u, k, v, y, m, r, gy)
        return gw, gu, gk, gv, None


def _ext_for(t: torch.Tensor):
    ext = loader.load_extension(t.device.type)
    if ext is None:  # pragma: no cover - bi_wkv checks the backend first
        raise RuntimeError(f"cuda_wkv: the {t.device.type} kernel is not available: "
                           f"{loader.failure_reason(t.device.type)}")
    return ext


def _register_ops():
    """Register the kernels as torch.library custom ops (PyTorch >= 2.4), so that
    torch.compile can keep them in the graph (fake implementations give the shapes)."""
    custom_op = getattr(getattr(torch, "library", None), "custom_op", None)
    if custom_op is None:
        return None
    try:
        @custom_op("cuda_wkv::bi_wkv_forward", mutates_args=())
        def fwd_op(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            y, m, r = _ext_for(k).forward(w, u, k, v)
            return y, m, r

        @fwd_op.register_fake
        def _(w, u, k, v):
            return torch.empty_like(k), torch.empty_like(k), torch.empty_like(k)

        @custom_op("cuda_wkv::bi_wkv_backward", mutates_args=())
        def bwd_op(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   y: torch.Tensor, m: torch.Tensor, r: torch.Tensor,
                   gy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
            gw, gu, gk, gv = _ext_for(k).backward(w, u, k, v, y, m, r, gy)
            return gw, gu, gk, gv

        @bwd_op.register_fake
        def _(w, u, k, v, y, m, r, gy):
            return (torch.empty_like(w), torch.empty_like(u), torch.empty_like(k),
                    torch.empty_like(k))

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs, *output)
            ctx.mark_non_differentiable(output[1], output[2])

        def backward(ctx, gy, _gm, _gr):
            w, u, k, v, y, m, r = ctx.saved_tensors
            if gy is None:
                gy = torch.zeros_like(y)
            return bwd_op(w, u, k, v, y, m, r, gy.to(k.dtype).contiguous())

        fwd_op.register_autograd(backward, setup_context=setup_context)
        return fwd_op
    except Exception:  # pragma: no cover - e.g. registered twice after a reload
        return None


_FWD_OP = _register_ops()


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact bidirectional WKV.

    ``w, u``: ``(C,)``; ``k, v``: ``(B, T, C)``.  Returns ``y`` of shape ``(B, T, C)``
    in the promoted dtype of ``k`` and ``v``::

        y_t = (sum_{i!=t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t)
            / (sum_{i!=t} e^{-(|t-i|-1) w + k_i}     + e^{u + k_t})

    Differentiable w.r.t. all four inputs.  Computation happens in float32 (float64
    for float64 inputs); float16 / bfloat16 inputs (e.g. under AMP) are upcast
    internally and the result is cast back.  Backend: the C++ kernel for CPU tensors,
    the CUDA kernel for CUDA tensors, the PyTorch O(T) scan if the kernel cannot be
    built or if ``CUDA_WKV_BACKEND=torch``.
    """
    _validate(w, u, k, v)
    out_dtype = torch.promote_types(k.dtype, v.dtype)
    cd = torch.float64 if torch.float64 in (w.dtype, u.dtype, k.dtype, v.dtype) \
        else torch.float32
    if k.numel() == 0:
        zero = (w.to(cd) * 0 + u.to(cd) * 0)
        return (k.to(cd) * 0 + v.to(cd) * 0 + zero).to(out_dtype)
    backend = _select_for_call(k.device.type)
    if backend == "torch":
        return bi_wkv_scan(w, u, k, v)
    args = [x.to(cd).contiguous() for x in (w, u, k, v)]
    if _FWD_OP is not None:
        y = _FWD_OP(*args)[0]
    else:
        y = _BiWKVFunction.apply(*args, _ext_for(k))
    return y.to(out_dtype)

"""Backend selection (with the kernels' self-check), input validation, dtype handling
and the autograd Function."""
from __future__ import annotations

import contextlib
import os
import platform
import threading
import warnings
from typing import Dict, Optional, Tuple, Union

import torch

from nnunetv2_ext.env_options import env_int

from . import loader
from .reference import _compute_dtype, bi_wkv_scan

__all__ = ["bi_wkv", "backend_for", "requested_backend", "kernel_backend", "kernel_bi_wkv",
           "BACKEND_ENV", "FLOAT32_KERNEL_MAX_T", "FLOAT32_MAX_T_ENV", "float32_max_t"]

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
    """``x``'s device, a bare ``"cuda"`` resolved to the current CUDA device as tensors have
    it (``cuda:0``), so the self-check runs once per GPU, not once per spelling. Does not
    initialise CUDA: before it is, the current device is 0."""
    if isinstance(x, torch.Tensor):
        return x.device
    device = torch.device(x)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
        return torch.device("cuda", index)
    return device


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


# Kernels checked against the PyTorch path on first use per (device, dtype); the outcome
# per (str(device), dtype): None = passed, else what was wrong.
_CHECKED_BACKENDS: Tuple[str, ...] = ("cuda",)
_checks: Dict[Tuple[str, torch.dtype], Optional[str]] = {}
_checks_lock = threading.RLock()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


_selfcheck_module = None


def _selfcheck():
    """:mod:`cuda_wkv.selfcheck`, imported on the first call rather than with this module: the package must not
    import it before ``python -m cuda_wkv.selfcheck`` runs it (runpy would warn about a module imported twice)."""
    global _selfcheck_module
    if _selfcheck_module is None:
        from . import selfcheck
        _selfcheck_module = selfcheck
    return _selfcheck_module


def _kernel_passes(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the ``backend`` kernel may serve ``device`` / ``dtype``: checked once per
    process against the PyTorch path (for backends in ``_CHECKED_BACKENDS``); a failed
    check warns once and answers False from then on."""
    if backend not in _CHECKED_BACKENDS:
        return True
    check = _selfcheck()
    key = (str(device), dtype)
    with _checks_lock:
        if key not in _checks:
            problem = check.compare_to_reference(kernel_bi_wkv, device, dtype)
            _checks[key] = problem
            if problem is not None:
                dt = str(dtype).split(".")[-1]
                warnings.warn(
                    f"cuda_wkv: the {backend} kernel disagrees with the exact PyTorch path on "
                    f"{device} ({_device_name(device)}) in {dt}: {problem}. bi_wkv uses the "
                    f"PyTorch path (correct, slower) on {device} in {dt} for the rest of this "
                    f"process. Please report this on the nnunetv2_ext issue tracker with the "
                    f"output of `{check.reproduce_command(device, dtype)}`; "
                    f"CUDA_WKV_SELFCHECK=0 skips the check.", check.WKVSelfCheckWarning, stacklevel=4)
        return _checks[key] is None


def _select_for_call(device: str, dtype: torch.dtype) -> str:
    check = _selfcheck().selfcheck_enabled()  # validates CUDA_WKV_SELFCHECK at every call
    backend = _select(torch.device(device).type, True)
    if backend != "torch" and check and not _kernel_passes(backend, torch.device(device), dtype):
        return "torch"
    return backend


# Under torch.compile the backend choice is evaluated eagerly and baked into the graph
# (it depends only on the device, the dtype, the environment, the build outcome and the
# self-check).
_assume_const = getattr(getattr(torch, "compiler", None), "assume_constant_result", None)
if _assume_const is not None:
    _select_for_call = _assume_const(_select_for_call)


def backend_for(x: Union[torch.Tensor, torch.device, str], build: bool = True) -> str:
    """Backend that :func:`bi_wkv` uses for tensors like ``x``: 'cpu', 'cuda' or 'torch'.

    With ``build=True`` (default) the kernel is built/loaded if needed and self-checked
    (for the dtype a call on ``x`` runs the kernel in: its computation dtype, float64 for a
    float32 ``(B, T, C)`` tensor with T > :func:`float32_max_t`; float32 for a device), so
    the answer accounts for build failures and failed checks (then 'torch').  With
    ``build=False`` nothing is compiled or run and the intended backend is returned (a
    kernel that already failed to build in this process still reports 'torch').
    """
    device = _device_of(x)
    if not build:
        return _select(device.type, False)
    dtype = torch.float32
    if isinstance(x, torch.Tensor):
        dtype = _compute_dtype(x)
        if x.dim() == 3:  # like k: (B, T, C)
            dtype = _kernel_dtype(dtype, x.shape[1])
    return _select_for_call(str(device), dtype)


def kernel_backend(x: Union[torch.Tensor, torch.device, str]) -> Optional[str]:
    """The compiled kernel ('cpu' or 'cuda') that serves ``x``'s device, built if needed,
    ignoring the self-check; None where :func:`bi_wkv` can only use the PyTorch path."""
    backend = _select(_device_of(x).type, True)
    return None if backend == "torch" else backend


# The longest sequence the compiled kernels compute in float32 by default: longer float32 (and
# float16 / bfloat16) calls run the float64 kernel and round its results, because the float32
# kernel's gw drifts past 1e-5 of the largest entry from about T = 2^20 (docs/wkv.md, "Longer
# still": the rounding of the backward states' float32 sums adds up).  Up to 2^18 it is within
# 8.8e-6 (measured); GLSP's calls are at most 32 768 long.  FLOAT32_MAX_T_ENV overrides it.
FLOAT32_KERNEL_MAX_T = 1 << 18
FLOAT32_MAX_T_ENV = "CUDA_WKV_FLOAT32_MAX_T"


def float32_max_t() -> int:
    """The longest T the compiled kernels compute in float32: ``CUDA_WKV_FLOAT32_MAX_T`` (an
    integer >= 1; read at every call) or :data:`FLOAT32_KERNEL_MAX_T`.  Raises
    :class:`nnunetv2_ext.env_options.EnvOptionError` (a ValueError) naming the variable for any
    other value."""
    return env_int(FLOAT32_MAX_T_ENV, FLOAT32_KERNEL_MAX_T, 1, 1 << 62)


if _assume_const is not None:  # torch.compile: evaluated eagerly, baked into the graph
    float32_max_t = _assume_const(float32_max_t)


def _kernel_dtype(compute_dtype: torch.dtype, T: int) -> torch.dtype:
    """The dtype the compiled kernel runs in for a call of length ``T`` whose inputs compute in
    ``compute_dtype``: float64 for float32 calls longer than :func:`float32_max_t`."""
    if compute_dtype == torch.float32 and T > float32_max_t():
        return torch.float64
    return compute_dtype


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


def _ext_for(t: torch.Tensor):
    ext = loader.load_extension(t.device.type)
    if ext is None:  # pragma: no cover - bi_wkv checks the backend first
        raise RuntimeError(f"cuda_wkv: the {t.device.type} kernel is not available: "
                           f"{loader.failure_reason(t.device.type)}")
    return ext


# Whether a profiler records (record_function costs ~5 us per call even when none does).
_profiling = getattr(torch._C._autograd, "_profiler_enabled", lambda: True)


def _named(name: str):
    """Names the kernel call in profiles (bench_wkv.py --profile reads these names)."""
    return torch.profiler.record_function(name) if _profiling() else contextlib.nullcontext()


def _kernel_forward(w, u, k, v) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _named("cuda_wkv::forward_kernel"):
        y, m, r = _ext_for(k).forward(w, u, k, v)
    return y, m, r


def _kernel_backward(w, u, k, v, y, m, r, gy) -> Tuple[torch.Tensor, ...]:
    with _named("cuda_wkv::backward_kernel"):
        gw, gu, gk, gv = _ext_for(k).backward(w, u, k, v, y, m, r, gy)
    return gw, gu, gk, gv


_NO_DOUBLE_BACKWARD = ("bi_wkv: the compiled kernels' backward is not differentiable (no double "
                       "backward, e.g. for a gradient penalty); set CUDA_WKV_BACKEND=torch to use "
                       "the PyTorch path, which is")


class _BiWKVGrad(torch.autograd.Function):
    """The kernels' closed-form backward as a node of a graph being built (``create_graph=True``):
    differentiating through it raises a clear error rather than silently giving no gradient."""

    @staticmethod
    def forward(ctx, w, u, k, v, y, m, r, gy):  # type: ignore[override]
        return _kernel_backward(w, u, k, v, y, m, r, gy)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        raise RuntimeError(_NO_DOUBLE_BACKWARD)


class _BiWKVFunction(torch.autograd.Function):
    """Autograd wrapper around the compiled kernel (forward + closed-form backward) for eager
    calls, whose Python cost is lower than the custom op's (docs/wkv.md, "Cost of a call").
    Traced calls take the custom op below (see :func:`kernel_bi_wkv`)."""

    @staticmethod
    def forward(ctx, w, u, k, v):  # type: ignore[override]
        y, m, r = _kernel_forward(w, u, k, v)
        ctx.save_for_backward(w, u, k, v, y, m, r)
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        saved = ctx.saved_tensors  # once: under activation checkpointing each access recomputes
        args = (*saved, gy.to(saved[2].dtype).contiguous())
        if torch.is_grad_enabled():  # create_graph=True: the gradients are differentiated again
            return _BiWKVGrad.apply(*args)
        return _kernel_backward(*args)


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
            return _kernel_forward(w, u, k, v)

        @fwd_op.register_fake
        def _(w, u, k, v):
            return torch.empty_like(k), torch.empty_like(k), torch.empty_like(k)

        @custom_op("cuda_wkv::bi_wkv_backward", mutates_args=())
        def bwd_op(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   y: torch.Tensor, m: torch.Tensor, r: torch.Tensor,
                   gy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
            return _kernel_backward(w, u, k, v, y, m, r, gy)

        @bwd_op.register_fake
        def _(w, u, k, v, y, m, r, gy):
            return (torch.empty_like(w), torch.empty_like(u), torch.empty_like(k),
                    torch.empty_like(k))

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs, *output)
            ctx.mark_non_differentiable(output[1], output[2])
            # m and r never get gradients: without this, autograd would fill two (B, T, C)
            # tensors with zeros for them before every backward (a fifth of its CPU time)
            ctx.set_materialize_grads(False)

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
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
# Python dispatch modes in force (make_fx, FakeTensorMode, export); unknown: assume some.
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _traced(*tensors: torch.Tensor) -> bool:
    """Whether this call is being traced rather than run: by dynamo (torch.compile), under a
    Python dispatch mode (make_fx, FakeTensorMode, export), by torch.jit.trace, or on tensor
    subclasses (fake, functional tensors)."""
    return (_is_compiling() or _dispatch_modes() > 0 or torch.jit.is_tracing()
            or any(type(t) not in _PLAIN for t in tensors))


def kernel_bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> torch.Tensor:
    """The compiled kernel of ``k``'s device on inputs already validated, of one dtype
    (float32 or float64) and contiguous; differentiable.  Raises RuntimeError when that
    kernel is not available (see :func:`kernel_backend`).  A traced call goes through the
    custom op ``cuda_wkv::bi_wkv_forward``, which every tracer records; an eager call through
    the lighter autograd Function (the same kernel calls)."""
    if _FWD_OP is not None and _traced(w, u, k, v):
        return _FWD_OP(w, u, k, v)[0]
    return _BiWKVFunction.apply(w, u, k, v)


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact bidirectional WKV.

    ``w, u``: ``(C,)``; ``k, v``: ``(B, T, C)``.  Returns ``y`` of shape ``(B, T, C)``
    in the promoted dtype of ``k`` and ``v``::

        y_t = (sum_{i!=t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t)
            / (sum_{i!=t} e^{-(|t-i|-1) w + k_i}     + e^{u + k_t})

    Differentiable w.r.t. all four inputs.  Computation happens in float32 (float64
    for float64 inputs); float16 / bfloat16 inputs (e.g. under AMP) are upcast
    internally and the result is cast back.  The compiled kernels compute calls longer
    than :func:`float32_max_t` (2^18 unless ``CUDA_WKV_FLOAT32_MAX_T`` says otherwise) in
    float64, whose values and gradients are then rounded (on a CPU about 3.1x the time and
    3.3x the memory of the float32 kernel; docs/wkv.md, "Longer still"): the float32
    kernel's ``gw`` would miss 1e-5 from about T = 2^20.  Backend: the C++ kernel for CPU tensors,
    the CUDA kernel for CUDA tensors, the PyTorch O(T) scan (:func:`bi_wkv_scan`) if the
    kernel cannot be built, if ``CUDA_WKV_BACKEND=torch``, or if the CUDA kernel failed
    its self-check (run on its first use per device and dtype, see
    :mod:`cuda_wkv.selfcheck`; one :class:`WKVSelfCheckWarning` then).
    """
    _validate(w, u, k, v)
    out_dtype = torch.promote_types(k.dtype, v.dtype)
    cd = _compute_dtype(w, u, k, v)
    if k.numel() == 0:
        zero = (w.to(cd) * 0 + u.to(cd) * 0)
        return (k.to(cd) * 0 + v.to(cd) * 0 + zero).to(out_dtype)
    kd = _kernel_dtype(cd, k.shape[1])
    if _select_for_call(str(k.device), kd) == "torch":
        return bi_wkv_scan(w, u, k, v)
    return kernel_bi_wkv(*(x.to(kd).contiguous() for x in (w, u, k, v))).to(out_dtype)

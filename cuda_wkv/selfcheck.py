"""Self-check of a compiled WKV kernel against the exact PyTorch path.

:func:`cuda_wkv.bi_wkv` runs :func:`compare_to_reference` once per process for each
(device, dtype) on which it first uses the CUDA kernel (``CUDA_WKV_SELFCHECK=0`` turns
this off).  A mismatch gives one :class:`WKVSelfCheckWarning` and the ``torch`` backend
for that device and dtype from then on.  To reproduce a failed check::

    python -m cuda_wkv.selfcheck --device cuda:0 --dtype float32
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Callable, List, Optional, Sequence

import torch

from .reference import bi_wkv_scan

__all__ = ["SELFCHECK_ENV", "WKVSelfCheckWarning", "compare_to_reference", "selfcheck_enabled",
           "reproduce_command", "main"]

SELFCHECK_ENV = "CUDA_WKV_SELFCHECK"

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# A small problem that still crosses channel blocks (C not a multiple of 32), several
# chunks of the kernels' scan and both signs of w.
_B, _T, _C = 2, 777, 37
# Max |error| allowed, relative to max(1, max |reference|) of each compared tensor.
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


class WKVSelfCheckWarning(RuntimeWarning):
    """A compiled kernel disagreed with the exact PyTorch path; cuda_wkv uses the latter."""


def selfcheck_enabled() -> bool:
    """``CUDA_WKV_SELFCHECK``: ``1`` (default) checks each kernel once per device and
    dtype, ``0`` skips the check.  Any other value raises ``ValueError``."""
    raw = os.environ.get(SELFCHECK_ENV, "1")
    val = raw.strip() or "1"
    if val not in ("0", "1"):
        raise ValueError(f"{SELFCHECK_ENV}={raw!r} is not valid; use 1 (default: check each "
                         f"kernel once per device and dtype) or 0 (skip the check)")
    return val == "1"


def reproduce_command(device: torch.device, dtype: torch.dtype) -> str:
    return f"python -m cuda_wkv.selfcheck --device {device} --dtype {str(dtype).split('.')[-1]}"


def _problem(dtype: torch.dtype) -> List[torch.Tensor]:
    """w, u, k, v, gy of the check on the CPU (fixed seed, drawn in float64, rounded to ``dtype``)."""
    g = torch.Generator().manual_seed(20240531)
    w = (torch.rand(_C, generator=g, dtype=torch.float64) * 2 - 1) * 8.0 / _T
    u = torch.randn(_C, generator=g, dtype=torch.float64)
    k = torch.randn(_B, _T, _C, generator=g, dtype=torch.float64) * 2.0
    v = torch.randn(_B, _T, _C, generator=g, dtype=torch.float64)
    gy = torch.randn(_B, _T, _C, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (w, u, k, v, gy)]


def _value_and_grads(fn: Kernel, args: Sequence[torch.Tensor],
                     gy: torch.Tensor) -> List[torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in args]
    with torch.autocast(device_type=gy.device.type, enabled=False):
        y = fn(*leaves)
        grads = torch.autograd.grad(y, leaves, gy)
    return [y.detach()] + list(grads)


def compare_to_reference(kernel: Kernel, device: torch.device,
                         dtype: torch.dtype) -> Optional[str]:
    """Run ``kernel(w, u, k, v)`` on a small random problem on ``device`` in ``dtype``
    (float32 or float64), values and the gradients of all four inputs, against
    :func:`bi_wkv_scan` in float64 on the CPU.

    Returns ``None`` if every compared tensor is within tolerance, else one line naming
    the worst tensor, its error and the tolerance (an exception raised by the kernel is
    reported the same way).  Works under ``torch.no_grad`` and ``torch.inference_mode``.
    """
    with torch.inference_mode(False), torch.enable_grad():
        # the kernel sees the inputs rounded to `dtype`; the reference gets the same values
        rounded = _problem(dtype)
        ref = _value_and_grads(bi_wkv_scan, [x.double() for x in rounded[:4]], rounded[4].double())
        try:
            got = _value_and_grads(kernel, [x.to(device) for x in rounded[:4]], rounded[4].to(device))
        except Exception as exc:  # noqa: BLE001 - any failure of the kernel is a failed check
            return f"the kernel raised {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    tol = _TOLERANCE[dtype]
    worst = None
    for name, g, r in zip(("y", "grad w", "grad u", "grad k", "grad v"), got, ref):
        if g.shape != r.shape:
            return f"{name} has shape {tuple(g.shape)}, expected {tuple(r.shape)}"
        err = (g.detach().double().cpu() - r).abs().max().item()
        rel = err / max(1.0, r.abs().max().item())
        if not rel <= tol and (worst is None or not rel <= worst[1]):  # NaN counts as worst
            worst = (name, rel)
    if worst is None:
        return None
    return (f"max |error| of {worst[0]} is {worst[1]:.3g} x max(1, |reference|) "
            f"(tolerance {tol:g}) on a ({_B}, {_T}, {_C}) problem")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cuda_wkv.selfcheck``: run the check of the kernel that ``bi_wkv`` uses
    for ``--device`` and print the result with the versions a bug report needs.
    Exit status 0 when it passes, 1 when it fails, 2 when no kernel serves the device."""
    parser = argparse.ArgumentParser(prog="python -m cuda_wkv.selfcheck",
                                     description=main.__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to check (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="computation dtype to check (default: float32)")
    args = parser.parse_args(argv)
    from . import __version__, dispatch  # late: dispatch imports this module

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    print(f"cuda_wkv {__version__}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"Python {platform.python_version()}, {platform.platform()}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device is available to this process", file=sys.stderr)
            return 2
        print(f"device {device}: {torch.cuda.get_device_name(device)}")
    backend = dispatch.kernel_backend(device)
    if backend is None:
        print(f"no compiled kernel serves {device} (bi_wkv uses the PyTorch path there)",
              file=sys.stderr)
        return 2
    problem = compare_to_reference(dispatch.kernel_bi_wkv, device, dtype)
    print(f"{backend} kernel on {device}, {args.dtype}: "
          f"{'OK' if problem is None else 'FAILED: ' + problem}")
    return 0 if problem is None else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""cuda_wkv -- exact bidirectional WKV (Vision-RWKV spatial mixing) for any B, T, C.

    y = cuda_wkv.bi_wkv(w, u, k, v)      # w, u: (C,); k, v: (B, T, C)

Backends (chosen per device, see :func:`backend_for`): a C++ CPU kernel and a CUDA
kernel, JIT-compiled on first use (importing this package compiles nothing), and a
pure-PyTorch O(T) fallback.  ``CUDA_WKV_BACKEND`` in {auto, cpu, cuda, torch} forces
one.  The CUDA kernel is checked against the PyTorch path on its first use per device
and dtype (``CUDA_WKV_SELFCHECK=0`` skips it; ``python -m cuda_wkv.selfcheck`` runs it).
References: :func:`bi_wkv_dense` (O(T^2) definition) and :func:`bi_wkv_scan` (the O(T)
fallback).  See docs/wkv.md.
"""
from .loader import VERSION as __version__
from .loader import WKVBuildWarning
from .dispatch import (BACKEND_ENV, FLOAT32_KERNEL_MAX_T, backend_for, bi_wkv, kernel_backend,
                       requested_backend)
from .reference import bi_wkv_dense, bi_wkv_scan


_LAZY = ("SELFCHECK_ENV", "WKVSelfCheckWarning")


def __getattr__(name: str):
    """The module :mod:`cuda_wkv.selfcheck` and its ``SELFCHECK_ENV`` and ``WKVSelfCheckWarning``, imported on first
    use so that ``python -m cuda_wkv.selfcheck`` runs a module the package has not imported yet."""
    if name == "selfcheck" or name in _LAZY:
        import importlib

        module = importlib.import_module(".selfcheck", __name__)
        return module if name == "selfcheck" else getattr(module, name)
    raise AttributeError(f"module 'cuda_wkv' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"selfcheck"})


__all__ = [
    "bi_wkv",
    "bi_wkv_dense",
    "bi_wkv_scan",
    "backend_for",
    "kernel_backend",
    "requested_backend",
    "BACKEND_ENV",
    "FLOAT32_KERNEL_MAX_T",
    "SELFCHECK_ENV",
    "WKVBuildWarning",
    "WKVSelfCheckWarning",
    "__version__",
]

"""Pure-PyTorch implementations of the exact bidirectional WKV.

Per batch ``b`` and channel ``c`` (``w, u``: ``(C,)``; ``k, v``: ``(B, T, C)``)::

    L_ti = k_i - (|t - i| - 1) * w      (i != t)
    L_tt = u + k_t
    y_t  = sum_i softmax_i(L_t.)_i * v_i

* :func:`bi_wkv_dense` -- the O(T^2) definition (softmax over a Toeplitz-biased
  score matrix), computed in row chunks so memory stays bounded.  Use it in float64
  as the ground truth.
* :func:`bi_wkv_scan` -- an exact O(T) formulation with ``torch.logcumsumexp``
  (forward and reverse prefix log-sum-exps).  Autograd goes through PyTorch ops.
  It is the ``torch`` fallback backend of :func:`cuda_wkv.bi_wkv`.

Both compute in ``float64`` for float64 inputs and in ``float32`` otherwise, and
return the promoted dtype of ``k`` and ``v``.
"""
from __future__ import annotations

import torch

__all__ = ["bi_wkv_dense", "bi_wkv_scan"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _out_dtype(k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    return torch.promote_types(k.dtype, v.dtype)


def bi_wkv_dense(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 max_chunk_elements: int = 1 << 25) -> torch.Tensor:
    """Dense O(T^2) reference: ``softmax_i(L_ti) @ v`` per (batch, channel).

    ``max_chunk_elements`` bounds the size of one score block (B*C*rows*T elements);
    rows of the T x T matrix are processed in chunks, so time is O(T^2) but memory is
    O(B*C*T*rows).  Differentiable through PyTorch autograd.
    """
    out_dtype = _out_dtype(k, v)
    cd = _compute_dtype(w, u, k, v)
    B, T, C = k.shape
    w = w.to(cd).reshape(C, 1, 1)
    u = u.to(cd).reshape(C, 1)
    kt = k.to(cd).permute(0, 2, 1)  # (B, C, T)
    vt = v.to(cd).permute(0, 2, 1).unsqueeze(-1)  # (B, C, T, 1)
    idx = torch.arange(T, device=k.device)
    rows = max(1, min(T, max_chunk_elements // max(1, B * C * T)))
    outs = []
    for t0 in range(0, T, rows):
        t = idx[t0:t0 + rows]
        dist = ((t[:, None] - idx[None, :]).abs() - 1).to(cd)  # (R, T)
        scores = kt.unsqueeze(2) - dist * w  # (B, C, R, T)
        diag = (u + kt[:, :, t0:t0 + rows]).unsqueeze(-1)  # (B, C, R, 1): u + k_t
        is_diag = (t[:, None] == idx[None, :])
        scores = torch.where(is_diag, diag, scores)
        p = torch.softmax(scores, dim=-1)
        outs.append(torch.matmul(p, vt).squeeze(-1))  # (B, C, R)
    y = torch.cat(outs, dim=-1) if outs else kt.new_zeros(B, C, 0)
    return y.permute(0, 2, 1).to(out_dtype)


def _excl_lcse(x: torch.Tensor, neg: float, reverse: bool) -> torch.Tensor:
    """Exclusive log-cum-sum-exp along dim 1 (forward or reverse)."""
    if reverse:
        x = x.flip(1)
    pad = x.new_full((x.shape[0], 1, x.shape[2]), neg)
    out = torch.cat([pad, torch.logcumsumexp(x[:, :-1], dim=1)], dim=1)
    return out.flip(1) if reverse else out


def bi_wkv_scan(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
    """Exact O(T) PyTorch formulation with ``logcumsumexp`` (the fallback backend).

    The left sum at t is ``e^{-(t-1) w} * sum_{i<t} e^{k_i + i w} v_i`` and the right
    sum ``e^{(t+1) w} * sum_{i>t} e^{k_i - i w} v_i``; both are evaluated in log space
    with (reverse) ``logcumsumexp``.  ``v`` is shifted by a detached per-(b, c)
    constant ``s = min(v) - 1`` so that ``log(v - s)`` is defined (the softmax weights
    sum to one, hence ``y = sum P (v - s) + s`` exactly).  Memory is O(B*T*C); the
    exponent ``k_i +- i w`` carries a rounding error ~eps*(|k| + |w| T), so accuracy
    degrades slowly for very large ``|w| * T`` (the C++/CUDA kernels do not have
    this limitation).
    """
    out_dtype = _out_dtype(k, v)
    cd = _compute_dtype(w, u, k, v)
    B, T, C = k.shape
    with torch.autocast(device_type=k.device.type, enabled=False):
        w = w.to(cd).reshape(1, 1, C)
        u = u.to(cd).reshape(1, 1, C)
        k = k.to(cd)
        v = v.to(cd)
        neg = -1e30 if cd == torch.float32 else -1e300
        i = torch.arange(T, device=k.device, dtype=cd).reshape(1, T, 1)
        s = v.detach().amin(dim=1, keepdim=True) - 1.0
        lv = torch.log(v - s)  # >= 0
        iw = i * w
        zf = k + iw  # left terms:  k_i - (t-1-i) w = (k_i + i w) - (t-1) w
        zb = k - iw  # right terms: k_i - (i-t-1) w = (k_i - i w) + (t+1) w
        left = (i - 1.0) * w
        right = (i + 1.0) * w
        num = torch.stack([
            _excl_lcse(zf + lv, neg, False) - left,
            _excl_lcse(zb + lv, neg, True) + right,
            u + k + lv,
        ]).logsumexp(0)
        den = torch.stack([
            _excl_lcse(zf, neg, False) - left,
            _excl_lcse(zb, neg, True) + right,
            u + k,
        ]).logsumexp(0)
        y = torch.exp(num - den) + s
    return y.to(out_dtype)

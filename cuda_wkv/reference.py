"""Pure-PyTorch implementations of the exact bidirectional WKV.

Per batch ``b`` and channel ``c`` (``w, u``: ``(C,)``; ``k, v``: ``(B, T, C)``)::

    L_ti = k_i - (|t - i| - 1) * w      (i != t)
    L_tt = u + k_t
    y_t  = sum_i softmax_i(L_t.)_i * v_i

* :func:`bi_wkv_dense` -- the O(T^2) definition (softmax over a Toeplitz-biased
  score matrix), computed in row chunks so memory stays bounded.  Use it in float64
  as the ground truth.
* :func:`bi_wkv_scan` -- an exact O(T) formulation: the two directional decayed sums
  as a work-efficient associative scan with exponents relative to local maxima.
  Autograd goes through PyTorch ops.  It is the ``torch`` fallback backend of
  :func:`cuda_wkv.bi_wkv`.

Both compute in ``float64`` for float64 inputs and in ``float32`` otherwise, and
return the promoted dtype of ``k`` and ``v``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

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


class _Sums(NamedTuple):
    """Decayed sums of a scan, scaled by ``e^{-m}``: the true values are ``d * e^m``
    (sum of weights) and ``n * e^m`` (sum of weights times ``v``).  ``m`` is the largest
    exponent among the terms (``-inf`` for an empty sum, then ``d = n = 0``)."""
    m: torch.Tensor
    d: torch.Tensor
    n: torch.Tensor


def _safe(m: torch.Tensor) -> torch.Tensor:
    """``m`` with ``-inf`` (an empty sum) replaced by 0, so that ``x - m`` stays defined."""
    return m.masked_fill(m == -math.inf, 0.0)


def _combine(a: _Sums, b: _Sums, decay: torch.Tensor) -> _Sums:
    """Sums of ``a`` carried ``decay`` steps' worth of ``w`` further, plus those of ``b``.

    Exponents are taken relative to the larger of the two maxima (``m`` is detached: it
    only fixes the scale, the value ``d * e^m`` does not depend on it).  An empty side
    (``m = -inf``, ``d = n = 0``) contributes exactly nothing.
    """
    ma = a.m - decay
    m = torch.maximum(ma.detach(), b.m)
    ms = _safe(m)
    ea = torch.exp(ma - ms)
    eb = torch.exp(b.m - ms)
    return _Sums(m, a.d * ea + b.d * eb, a.n * ea + b.n * eb)


def _empty_like(s: _Sums, length: int) -> _Sums:
    """``length`` empty sums shaped like the elements of ``s``."""
    shape = s.m.shape[:-2] + (length, s.m.shape[-1])
    zero = s.d.new_zeros(shape)
    return _Sums(s.m.new_full(shape, -math.inf), zero, zero)


def _cat(a: _Sums, b: _Sums) -> _Sums:
    return _Sums(*(torch.cat([x, y], dim=-2) for x, y in zip(a, b)))


def _shifted(s: _Sums) -> _Sums:
    """Element t of the result holds element t - 1 of ``s``; element 0 is empty."""
    return _cat(_empty_like(s, 1), _Sums(*(x[..., :-1, :] for x in s)))


def _inclusive_scan(s: _Sums, w: torch.Tensor, span: int = 1) -> _Sums:
    """Inclusive scan along dim -2 of ``x_t = e^{-w} x_{t-1} + term_t``.

    Each element of ``s`` summarises ``span`` consecutive positions (its state at the
    last one).  Work-efficient pairwise recursion (up-sweep, then down-sweep): the pairs
    halve the length at each level, so memory is O(length) in total and the depth is
    log2(length).  A carry over ``span`` positions costs ``span * w`` in the exponent, an
    exact integer times ``w``; exponents stay relative to local maxima, so with decay
    (``w > 0``) the rounding does not grow with the sequence length (with growth it does,
    mildly: see :func:`bi_wkv_scan`).
    """
    length = s.m.shape[-2]
    if length == 1:
        return s
    if length % 2:
        s = _cat(s, _empty_like(s, 1))
    even = _Sums(*(x[..., 0::2, :] for x in s))
    odd = _Sums(*(x[..., 1::2, :] for x in s))
    decay = span * w
    pairs = _inclusive_scan(_combine(even, odd, decay), w, 2 * span)
    evens = _combine(_shifted(pairs), even, decay)
    return _Sums(*(torch.stack([e, o], dim=-2).flatten(-3, -2)[..., :length, :]
                   for e, o in zip(evens, pairs)))


def _v_scale_exponent(v: torch.Tensor) -> torch.Tensor:
    """Per-(b, c) power of two ``s`` with ``max|v| / 2^s`` small enough that the scaled
    sums (at most ``2 T + 1`` terms of weight <= 1) cannot overflow; 0 unless ``|v|`` is
    near the top of the dtype's range.  Scaling by ``2^-s`` is exact."""
    T = v.shape[1]
    vmax = v.detach().abs().amax(dim=1, keepdim=True)
    exponent = torch.frexp(vmax).exponent  # vmax < 2^exponent
    limit = math.frexp(torch.finfo(v.dtype).max)[1] - math.ceil(math.log2(2 * T + 2)) - 1
    return (exponent - limit).clamp_min(0)


def bi_wkv_scan(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
    """Exact O(T) PyTorch formulation (the ``torch`` fallback backend of ``bi_wkv``).

    ``w, u``: ``(C,)``; ``k, v``: ``(B, T, C)``; returns ``(B, T, C)`` in the promoted
    dtype of ``k`` and ``v`` (float64 computation if any input is float64, else float32).

    The left sum at ``t`` is the state ``x_{t-1}`` of the recurrence
    ``x_t = e^{-w} x_{t-1} + e^{k_t} (1, v_t)`` (denominator, numerator), the right sum
    the same recurrence run backwards; ``y_t = (left + right + e^{u + k_t} (1, v_t))``
    as numerator / denominator.  The recurrences are evaluated together as one
    associative scan (log2(T) levels, O(B*T*C) memory) over sums kept relative to their
    largest exponent, so

    * the float32 rounding is a few ulp of ``sum_i P_ti |v_i|`` (``P`` = the softmax
      weights): an outlier in ``v`` only matters where its weight does; a carry over ``n``
      positions costs the exponent ``n * w``, never ``t * w`` anchored at ``t = 0``, so
      with decay (``w > 0``) the error does not grow with ``|w| * T``; with growth
      (``w < 0``), where far tokens dominate, the rounding of a long carry's ``n * w``
      does show: measured up to 7.2e-5 in ``y`` (at ``|w| * T = 1e4``) and 7.5e-3 of
      ``max |gw|`` (at ``1e5``) with ``|k| <= 30`` (docs/wkv.md, Accuracy; the C++ kernel
      stays at ~2e-6 there);
    * any finite ``w``, ``u``, ``k`` (``k = -inf`` is a zero weight) and finite ``v`` up
      to the dtype's maximum give finite outputs wherever the exact result is finite
      (``v`` is rescaled by an exact power of two when near the top of the range);
    * a position whose weights are all zero (every ``k`` of the lane and ``u + k_t``
      ``-inf``) gives NaN, like the definition (0 / 0) and :func:`bi_wkv_dense`.

    Autograd goes through the PyTorch ops.
    """
    out_dtype = _out_dtype(k, v)
    cd = _compute_dtype(w, u, k, v)
    if k.numel() == 0:
        return (k.to(cd) * 0 + v.to(cd) * 0).to(out_dtype)
    with torch.autocast(device_type=k.device.type, enabled=False):
        w, u, k, v = w.to(cd), u.to(cd), k.to(cd), v.to(cd)
        exponent = _v_scale_exponent(v)
        scale = torch.ldexp(torch.ones_like(exponent, dtype=cd), exponent)
        v = v / scale
        keys = torch.stack([k, k.flip(1)])  # (2, B, T, C): left-to-right and right-to-left
        vals = torch.stack([v, v.flip(1)])
        m0 = keys.detach()
        d0 = torch.exp(keys - _safe(m0))
        states = _inclusive_scan(_Sums(m0, d0, d0 * vals), w)
        before = _shifted(states)  # the sums over i < t (resp. i > t)
        left = _Sums(*(x[0] for x in before))
        right = _Sums(*(x[1].flip(1) for x in before))
        diag = u + k
        m = torch.maximum(torch.maximum(left.m, right.m), diag.detach())
        ms = _safe(m)
        el, er, ed = torch.exp(left.m - ms), torch.exp(right.m - ms), torch.exp(diag - ms)
        num = left.n * el + right.n * er + v * ed
        den = left.d * el + right.d * er + ed
        y = num / den * scale
    return y.to(out_dtype)

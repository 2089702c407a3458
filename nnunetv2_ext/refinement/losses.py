"""Auxiliary losses on encoder tokens (docs/enc_refine.md). Pure functions, 2-D/3-D agnostic, O(N) memory in tokens.

Notation: ``B`` batch, ``C`` channels, ``S`` a 2-D or 3-D token grid, ``N = prod(S)`` tokens,
``H`` heads, ``D`` head dim. Labels are nnU-Net integer label maps ``(B, 1, *S_full)`` (or ``(B, *S_full)``)
at any resolution; they are nearest-downsampled to the token grid (:func:`labels_to_grid`).

* :func:`linear_attention_mass` — column sums ``w_j = Σ_i A_ij`` of a linear-attention map in O(N).
* :func:`attention_distillation_loss` — ``KL(p ‖ w)``, ``p_i = ‖P_i‖ / Σ_k ‖P_k‖``, ``w`` detached.
* :func:`mask_contrastive_loss` — supervised InfoNCE on at most ``num_anchors`` sampled tokens.
* :func:`boundary_loss` — pulls boundary tokens towards their class's (detached) mean direction.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F


def _feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def linear_attention_mass(q: torch.Tensor, k: torch.Tensor, eps: float = 1e-6, apply_feature_map: bool = True,
                          reduce_heads: str = 'mean') -> torch.Tensor:
    """Total attention each key token receives under linear attention, in O(N·D) (no N×N map).

    With ``φ(x) = ELU(x) + 1`` (skipped if ``apply_feature_map=False``, i.e. ``q, k`` are already φ-mapped):

        A_ij = φ(q_i)·φ(k_j) / Z_i,      Z_i = φ(q_i)·Σ_j φ(k_j) + eps      (the normaliser GDLA uses)
        w_j  = Σ_i A_ij = φ(k_j) · Σ_i φ(q_i) / Z_i

    Args:
        q, k: ``(B, H, N, D)`` queries and keys (or ``(B, N, D)`` for one head).
        reduce_heads: ``'mean'`` (default; ``Σ_j w_j ≈ N`` like a single head) or ``'sum'`` over heads.
    Returns:
        ``(B, N)`` attention mass per key token, in (at least) float32.
    """
    if q.ndim == 3:
        q, k = q.unsqueeze(1), k.unsqueeze(1)
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.to(dtype), k.to(dtype)
        if apply_feature_map:
            q, k = _feature_map(q), _feature_map(k)
        z = q @ k.sum(dim=-2).unsqueeze(-1) + eps                # (B, H, N, 1)
        q_sum = (q / z).sum(dim=-2)                              # (B, H, D)
        w = (k @ q_sum.unsqueeze(-1)).squeeze(-1)                # (B, H, N)
    if reduce_heads == 'mean':
        return w.mean(dim=1)
    if reduce_heads == 'sum':
        return w.sum(dim=1)
    raise ValueError(f"reduce_heads must be 'mean' or 'sum', got {reduce_heads!r}")


def token_norms(token_features: torch.Tensor) -> torch.Tensor:
    """``‖P_i‖₂`` over channels: ``(B, C, *S)`` (a 2-D/3-D grid, ndim ≥ 4) or ``(B, N, C)`` (ndim 3) -> ``(B, N)``."""
    if token_features.ndim >= 4:
        return token_features.flatten(2).norm(dim=1)
    if token_features.ndim == 3:
        return token_features.norm(dim=-1)
    raise ValueError(f"token features must be (B, C, *S) with a 2-D/3-D grid or (B, N, C), got "
                     f"{tuple(token_features.shape)}")


def attention_distillation_loss(token_features: torch.Tensor, attention_mass: torch.Tensor,
                                eps: float = 1e-8) -> torch.Tensor:
    """``L_attn = mean_b KL(p_b ‖ w_b) = mean_b Σ_i p_i (log p_i − log w_i)``.

    ``p_i = ‖P_i‖ / Σ_k ‖P_k‖`` (softmax-free normalisation of the token norms, gradient flows into
    ``token_features``); ``w_i = m_i / Σ_k m_k`` with ``m = attention_mass.detach().clamp_min(0)``
    (no gradient ever reaches the decoder's attention through this loss).

    Args:
        token_features: ``(B, C, *S)`` or ``(B, N, C)`` encoder tokens.
        attention_mass: ``(B, N)`` (or ``(B, *S)``) non-negative decoder attention mass on the same tokens.
    Returns:
        scalar, ≥ 0, zero iff ``p == w``. Computed in float32.
    """
    norms = token_norms(token_features).float()
    mass = attention_mass.detach().float().flatten(1).clamp_min(0)
    if mass.shape != norms.shape:
        raise ValueError(f"attention mass {tuple(mass.shape)} does not match the {tuple(norms.shape)} tokens")
    p = norms / (norms.sum(dim=1, keepdim=True) + eps)
    w = mass / (mass.sum(dim=1, keepdim=True) + eps)
    kl = p * (torch.log(p + eps) - torch.log(w + eps))
    return kl.sum(dim=1).mean()


def labels_to_grid(labels: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Integer labels ``(B, 1, *S_full)`` or ``(B, *S_full)`` -> ``(B, *grid)`` long, nearest neighbour
    (``F.interpolate(mode='nearest')``, i.e. the voxel at ``floor(i · S_full / grid)``)."""
    grid = tuple(int(g) for g in grid)
    if labels.ndim == len(grid) + 1:
        labels = labels.unsqueeze(1)
    if labels.ndim != len(grid) + 2 or labels.shape[1] != 1:
        raise ValueError(f"labels {tuple(labels.shape)} are not (B, 1, *S) for a {len(grid)}-D grid")
    if tuple(labels.shape[2:]) != grid:
        labels = F.interpolate(labels.float(), size=grid, mode='nearest')
    return labels[:, 0].round().long()


def _sample_tokens(valid: torch.Tensor, num: int, generator: torch.Generator | None) -> torch.Tensor:
    """Flat indices of at most ``num`` distinct ``True`` entries of ``valid`` (uniformly without replacement)."""
    idx = valid.flatten().nonzero().squeeze(1)
    if idx.numel() > num:
        perm = torch.randperm(idx.numel(), generator=generator, device='cpu' if generator is None else
                              generator.device)[:num].to(idx.device)
        idx = idx[perm]
    return idx


def mask_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, num_anchors: int = 256,
                          temperature: float = 0.1, ignore_label: int | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask-aware supervised InfoNCE (SupCon) on sampled encoder tokens.

    Labels are nearest-downsampled to the token grid; tokens with ``ignore_label`` are never sampled.
    ``A ≤ num_anchors`` tokens are drawn uniformly over the whole batch (without replacement), their
    features L2-normalised to ``z``, ``s_ab = z_a·z_b / τ``, and

        L = mean_{a : |P(a)| > 0}  −1/|P(a)| Σ_{p ∈ P(a)} log( exp(s_ap) / Σ_{b ≠ a} exp(s_ab) )

    with ``P(a) = {p ≠ a : y_p = y_a}``. Memory O(N) for the label map and O(A² + A·C) for the loss
    (only the sampled tokens are gathered; no N×N matrix).

    Floor: if every class ``c`` maps to one unit vector and the class vectors are orthogonal, an anchor of
    a class with ``m_c`` samples has loss ``log((m_c − 1) + (A − m_c) e^{−1/τ})``: the loss is then at its
    minimum up to the ``e^{−1/τ}`` term (SupCon's floor ``log(m_c − 1)`` is not 0).

    Args:
        features: ``(B, C, *S)``; labels: ``(B, 1, *S_full)``/``(B, *S_full)`` integer map.
    Returns:
        scalar (0 with a graph into ``features`` when no sampled anchor has a positive).
    """
    grid = features.shape[2:]
    y = labels_to_grid(labels, grid).to(features.device)                    # (B, *S)
    valid = torch.ones_like(y, dtype=torch.bool) if ignore_label is None else y != ignore_label
    idx = _sample_tokens(valid, num_anchors, generator)
    n = y[0].numel()
    if idx.numel() < 2:
        return features.sum() * 0
    b, t = idx // n, idx % n
    z = F.normalize(features.flatten(2)[b, :, t].float(), dim=1)             # (A, C)
    ya = y.flatten()[idx]                                                    # (A,)
    logits = z @ z.t() / temperature                                         # (A, A)
    self_mask = torch.eye(idx.numel(), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float('-inf'))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (ya[:, None] == ya[None, :]) & ~self_mask
    num_pos = positives.sum(dim=1)
    has_pos = num_pos > 0
    if not bool(has_pos.any()):
        return features.sum() * 0
    per_anchor = -(log_prob.masked_fill(~positives, 0)).sum(dim=1) / num_pos.clamp_min(1)
    return per_anchor[has_pos].mean()


def boundary_tokens(y: torch.Tensor) -> torch.Tensor:
    """``(B, *S)`` integer labels -> ``(B, *S)`` bool: token ``i`` lies on the boundary of its class,
    i.e. ``i ∈ mask_c XOR erode(mask_c)`` for ``c = y_i`` with a 3×3(×3) erosion.

    ``erode(mask_c)`` = NOT dilate(NOT mask_c) = NOT maxpool(complement); it is computed for all classes at
    once: ``i`` is eroded away iff some neighbour in its 3×3(×3) window has another label, tested with a
    max-pool and a min-pool of the label map (padding does not count: the image border is no boundary).
    """
    pool = {2: F.max_pool2d, 3: F.max_pool3d}[y.ndim - 1]
    yf = y.unsqueeze(1).float()
    hi = pool(yf, 3, stride=1, padding=1)
    lo = -pool(-yf, 3, stride=1, padding=1)
    return ((hi != yf) | (lo != yf))[:, 0]


def boundary_loss(features: torch.Tensor, labels: torch.Tensor, ignore_label: int | None = None,
                  eps: float = 1e-6) -> torch.Tensor:
    """Boundary regularisation: boundary tokens of each class are pulled towards that class's mean direction.

    With ``z_i = P_i / ‖P_i‖`` (L2-normalised channels), per sample ``b`` and class ``c``
    ``μ_{b,c} = normalise(mean_{i : y_i = c} z_i)`` (over all tokens of the class, DETACHED), and
    ``∂`` the boundary tokens (:func:`boundary_tokens`, ignore-label tokens excluded):

        L = mean_{i ∈ ∂} ‖z_i − μ_{b, y_i}‖²          ∈ [0, 4]

    Zero when all tokens of each class share one direction (e.g. piecewise-constant features per class),
    whatever the boundary geometry; 0 (with a graph) when there is no boundary token. Memory O(N·C + B·K·C)
    for ``K`` labels (scatter-add, no per-class loop).

    Args:
        features: ``(B, C, *S)``; labels: ``(B, 1, *S_full)``/``(B, *S_full)`` integer map.
    """
    grid = features.shape[2:]
    y = labels_to_grid(labels, grid).to(features.device)                    # (B, *S)
    border = boundary_tokens(y)
    valid = torch.ones_like(y, dtype=torch.bool) if ignore_label is None else y != ignore_label
    border = border & valid
    if not bool(border.any()):
        return features.sum() * 0
    bsz, c = features.shape[:2]
    z = F.normalize(features.flatten(2).float(), dim=1, eps=eps)            # (B, C, N)
    yv = y.flatten(1).clamp_min(0)
    k = int(yv.max()) + 1
    with torch.no_grad():
        key = (torch.arange(bsz, device=y.device)[:, None] * k + yv)         # (B, N)
        w = valid.flatten(1).to(z.dtype)
        sums = torch.zeros(bsz * k, c, device=z.device, dtype=z.dtype)
        sums.index_add_(0, key.flatten(), (z * w[:, None]).transpose(1, 2).reshape(-1, c))
        mu = F.normalize(sums, dim=1, eps=eps)                              # (B·K, C)
    sel = border.flatten(1).nonzero()                                        # (M, 2): (b, token)
    zb = z[sel[:, 0], :, sel[:, 1]]                                          # (M, C)
    target = mu[key[sel[:, 0], sel[:, 1]]]
    return (zb - target).pow(2).sum(dim=1).mean()

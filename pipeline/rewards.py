"""SCORE rewards and advantages: pure tensor functions (docs/design.md).

Notation: ``B`` samples, ``G`` rollouts (masks) per sample, ``M`` visual tokens per sample
(``M = T*N``, flattened row-major over ``(t, gh, gw)``). A mask ``m[b, g, i]`` is True where token
``i`` is KEPT. ``valid[b, i]`` (optional, bool) marks real tokens when samples of different length
are padded to one ``M``; padded tokens are never kept and never counted.

The policy is a product of independent Bernoullis, ``p = sigmoid(z)``:
``log pi(m) = sum_i m_i log p_i + (1 - m_i) log(1 - p_i)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def token_logprob(logits: Tensor, masks: Tensor) -> Tensor:
    """Per-token Bernoulli log-prob of the decisions.

    ``logits[..., M]`` (broadcastable to ``masks``, e.g. ``[B, 1, M]`` against ``[B, G, M]``),
    ``masks[..., M]`` bool/0-1 -> ``[..., M]`` float: ``m log sigmoid(z) + (1-m) log sigmoid(-z)``,
    computed with ``logsigmoid`` (finite for any finite logit).
    """
    m = masks.to(logits.dtype)
    return m * F.logsigmoid(logits) + (1.0 - m) * F.logsigmoid(-logits)


def bernoulli_logprob(logits: Tensor, masks: Tensor, valid: Tensor | None = None) -> Tensor:
    """``log pi(m) = sum_i [m log p + (1-m) log(1-p)]`` over the last dim.

    ``logits[..., M]`` (broadcastable), ``masks[..., M]``, ``valid[..., M]`` bool or None
    (broadcastable; padded tokens contribute 0) -> ``[...]``.
    """
    lp = token_logprob(logits, masks)
    if valid is not None:
        lp = lp * valid.to(lp.dtype)
    return lp.sum(-1)


def bernoulli_entropy(logits: Tensor) -> Tensor:
    """Per-token entropy ``H(p) = -p log p - (1-p) log(1-p)`` (nats), ``[..., M] -> [..., M]``.

    Computed as ``sigmoid(z) softplus(-z) + sigmoid(-z) softplus(z)``: a sum of two non-negative
    terms, so no cancellation for large ``|z|``.
    """
    return torch.sigmoid(logits) * F.softplus(-logits) + torch.sigmoid(-logits) * F.softplus(logits)


def sample_masks(
    logits: Tensor,
    group_size: int,
    generator: torch.Generator | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Draw ``G = group_size`` keep masks per sample, ``m ~ Bernoulli(sigmoid(z))`` per token.

    ``logits[B, M]``, ``valid[B, M]`` bool or None -> ``masks[B, G, M]`` bool.

    Never empty: a mask that keeps no (valid) token gets the single highest-logit valid token
    (lowest index on ties). This moves the empty mask's probability mass onto that singleton, so the
    sampler differs from the product Bernoulli only on that event (probability ``prod_i (1-p_i)``,
    negligible unless M is tiny and p small). Log-probs are always computed for the mask actually
    used, with the product-Bernoulli formula, by the rollout and by the learner alike, so the
    importance ratio stays consistent. Uses ``torch.rand`` with ``generator``: deterministic for a
    seeded generator on a given device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, M], got {tuple(logits.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    b, m = logits.shape
    p = torch.sigmoid(logits.detach().float())
    u = torch.rand((b, group_size, m), generator=generator, device=logits.device, dtype=p.dtype)
    masks = u < p[:, None, :]
    z = logits.detach()
    if valid is not None:
        valid = valid.to(torch.bool)
        if not bool(valid.any(-1).all()):
            raise ValueError("every sample needs at least one valid token")
        masks &= valid[:, None, :]
        z = z.masked_fill(~valid, float("-inf"))
    # argmax returns the first maximal index -> ties go to the lowest index
    best = z.float().nan_to_num(nan=float("-inf")).argmax(-1)  # [B]
    empty = ~masks.any(-1)  # [B, G]
    if bool(empty.any()):
        fix = F.one_hot(best, m).to(torch.bool)[:, None, :] & empty[..., None]
        masks |= fix
    return masks


def budget_shift(logits: Tensor, kept: Tensor, iters: int = 60, valid: Tensor | None = None) -> Tensor:
    """Per-sample logit shift ``b`` with ``sum_i sigmoid(z_i + b) = kept`` (expected kept tokens).

    ``logits[B, M]``, ``kept[B]`` in ``(0, M)`` -> ``b[B]`` float32. Bisection in float64 (the sum is
    increasing in ``b``); ``iters`` halvings of a bracket of width ``range(z) + 80`` leave an error far
    below a token. A shift changes no ranking, so ``Bernoulli(sigmoid(z + b))`` rollouts keep about
    ``kept`` tokens while the policy still only decides WHICH ones: what top-K inference reads.
    ``valid[B, M]`` (padded batches): only valid tokens count, ``M`` is each sample's own count.
    """
    if logits.dim() != 2 or kept.shape != logits.shape[:1]:
        raise ValueError(f"logits [B, M] and kept [B] expected, got {tuple(logits.shape)} and {tuple(kept.shape)}")
    z = logits.detach().double()
    k = kept.detach().double().to(z.device)
    if valid is not None:
        v = valid.to(device=z.device, dtype=torch.bool)
        if v.shape != z.shape:
            raise ValueError(f"valid must be [B, M] = {tuple(z.shape)}, got {tuple(v.shape)}")
        z = z.masked_fill(~v, 0.0)  # finite filler; its sigmoid is multiplied by 0 below
    m = z.shape[1] if valid is None else v.sum(-1).double()
    if not bool(torch.isfinite(z).all()) or not bool(((k > 0) & (k < m)).all()):
        raise ValueError(f"budget_shift: needs finite logits and 0 < kept < M = {m if valid is None else m.tolist()}")
    lo = -(z if valid is None else z.masked_fill(~v, float("-inf"))).amax(-1) - 40.0
    hi = -(z if valid is None else z.masked_fill(~v, float("inf"))).amin(-1) + 40.0
    w = None if valid is None else v.double()
    for _ in range(iters):
        mid = (lo + hi) / 2
        p = torch.sigmoid(z + mid[:, None])
        over = (p if w is None else p * w).sum(-1) > k
        hi = torch.where(over, mid, hi)
        lo = torch.where(over, lo, mid)
    return ((lo + hi) / 2).float()


def sparsity(masks: Tensor, valid: Tensor | None = None) -> Tensor:
    """``rho = 1 - kept / M_visual`` per mask: ``masks[B, G, M]`` (+ ``valid[B, M]``) -> ``[B, G]``."""
    m = masks.to(torch.bool)
    if valid is None:
        return 1.0 - m.float().sum(-1) / m.shape[-1]
    v = valid.to(torch.bool)[:, None, :]
    return 1.0 - (m & v).float().sum(-1) / v.float().sum(-1)


def delta_ce(ce_full: Tensor, ce_masks: Tensor, tau_abs: float, tau_rel: float) -> Tensor:
    """Delta-CE reward ``dCE_g = CE_full + tau - CE_g`` with ``tau = tau_abs + tau_rel * CE_full``.

    ``ce_full[B]`` (all visual tokens), ``ce_masks[B, G]`` (kept tokens only) -> ``[B, G]``.
    ``dCE > 0`` is the safe zone.
    """
    full = ce_full[:, None]
    return full + (tau_abs + tau_rel * full) - ce_masks


def split_advantage(
    dce: Tensor, rho: Tensor, penalty: float, eps: float, scale_by_dce: bool = False
) -> Tensor:
    """Split advantage ``(dCE[B, G], rho[B, G]) -> A[B, G]`` (docs/design.md).

    * safe rollouts ``S = {g : dCE_g > 0}`` (strict; ``dCE == 0`` is a violation):
      ``A_g = (rho_g - mean_S rho) / (std_S rho + eps)``, with the POPULATION std over ``S``
      (so two safe rollouts get exactly -/+ ``1 - O(eps)``). ``|S| <= 1`` or zero spread
      (``max_S rho == min_S rho``, tested exactly) gives 0 to every safe rollout.
    * violating rollouts: ``A_g = -penalty * rho_g``, times ``|dCE_g|`` when ``scale_by_dce``.

    Invariants: within ``S`` the advantage is increasing in rho; violations are ``<= 0`` and
    non-increasing in rho. Raises ``ValueError`` on non-finite input.
    """
    if dce.shape != rho.shape or dce.dim() != 2:
        raise ValueError(f"dce and rho must both be [B, G], got {tuple(dce.shape)} and {tuple(rho.shape)}")
    if not (bool(torch.isfinite(dce).all()) and bool(torch.isfinite(rho).all())):
        raise ValueError("split_advantage: non-finite dCE or rho (quarantine the rollout upstream)")
    rho = rho.to(torch.promote_types(rho.dtype, torch.float32))
    safe = dce > 0
    w = safe.to(rho.dtype)
    n = w.sum(-1, keepdim=True)
    mean = (rho * w).sum(-1, keepdim=True) / n.clamp(min=1)
    var = ((rho - mean) ** 2 * w).sum(-1, keepdim=True) / n.clamp(min=1)
    hi = rho.masked_fill(~safe, float("-inf")).amax(-1, keepdim=True)
    lo = rho.masked_fill(~safe, float("inf")).amin(-1, keepdim=True)
    spread_ok = (n >= 2) & (hi > lo)
    a_safe = torch.where(spread_ok, (rho - mean) / (var.sqrt() + eps), torch.zeros_like(rho))
    a_viol = -penalty * rho
    if scale_by_dce:
        a_viol = a_viol * dce.abs().to(rho.dtype)
    return torch.where(safe, a_safe, a_viol)


class PackedMasks(NamedTuple):
    """Bit-packed boolean masks: ``bits[..., ceil(M/8)]`` uint8 (little bit order) + ``num_tokens = M``."""

    bits: Tensor
    num_tokens: int


def pack_masks(masks: Tensor) -> PackedMasks:
    """``masks[..., M]`` bool -> :class:`PackedMasks` (CPU uint8, 8x smaller) for rollout records."""
    m = masks.detach().to("cpu", torch.bool).numpy()
    bits = np.packbits(m, axis=-1, bitorder="little")
    return PackedMasks(torch.from_numpy(np.ascontiguousarray(bits)), int(m.shape[-1]))


def unpack_masks(packed: PackedMasks) -> Tensor:
    """Inverse of :func:`pack_masks`: -> ``[..., M]`` bool (CPU)."""
    bits, m = packed
    if bits.shape[-1] != math.ceil(m / 8):
        raise ValueError(f"packed masks: {bits.shape[-1]} bytes cannot hold exactly {m} tokens")
    out = np.unpackbits(bits.numpy(), axis=-1, count=m, bitorder="little").astype(bool)
    return torch.from_numpy(out)

"""SCORE policy loss: token-level PPO-style clipped surrogate over Bernoulli keep decisions.

Each visual token's keep/drop decision is one action. For rollout ``g`` of sample ``b`` and token
``i``, with new logits ``z`` (learner) and behaviour logits ``z_old`` (the policy version that drew
the masks, possibly several versions old):

    ratio_{b,g,i} = exp(log pi_new(m_{b,g,i}) - log pi_old(m_{b,g,i}))
    obj_{b,g,i}   = min(ratio * A_{b,g}, clip(ratio, 1 - clip, 1 + clip) * A_{b,g})
    pg_loss       = -mean over valid (b, g, i) of obj              (token-level mean)
    entropy       = mean over valid (b, i) of H(sigmoid(z_{b,i}))  (Bernoulli, nats)
    loss          = pg_loss - entropy_coef * entropy

No reference-model KL. At ``z == z_old`` the gradient of ``pg_loss`` is exactly the REINFORCE
gradient ``-mean(A * grad log pi_tok)``. The behaviour policy is passed as its logits, which every
rollout record can carry compactly (one ``[M]`` vector per sample, shared by its G masks).
"""

from __future__ import annotations

import torch

from pipeline.rewards import bernoulli_entropy, token_logprob

Tensor = torch.Tensor


def _masked_mean(x: Tensor, w: Tensor | None) -> Tensor:
    if w is None:
        return x.mean()
    w = w.to(x.dtype).expand_as(x)
    return (x * w).sum() / w.sum().clamp(min=1.0)


def clipped_surrogate_loss(
    logits: Tensor,
    masks: Tensor,
    old_logits: Tensor,
    advantages: Tensor,
    *,
    clip: float,
    entropy_coef: float,
    valid: Tensor | None = None,
) -> dict[str, Tensor]:
    """Token-level clipped surrogate + Bernoulli entropy bonus.

    Args:
        logits: ``[B, M]`` current policy logits (with grad).
        masks: ``[B, G, M]`` bool, the masks the rollouts actually used.
        old_logits: ``[B, M]`` or ``[B, G, M]`` behaviour-policy logits (no grad needed).
        advantages: ``[B, G]`` (e.g. from :func:`pipeline.rewards.split_advantage`), broadcast to
            every token of its rollout.
        clip: PPO clip range (``StageConfig.clip``).
        entropy_coef: beta (``StageConfig.entropy``).
        valid: ``[B, M]`` bool or None; padded tokens are excluded from every mean.

    Returns a dict of 0-d tensors: ``loss`` (with grad), and detached metrics ``pg_loss``,
    ``entropy``, ``clip_frac`` (share of tokens where the clipped term binds), ``approx_kl``
    (mean of ``(r - 1) - log r``, >= 0), ``ratio`` (mean) and ``keep_prob`` (mean sigmoid(z)).
    """
    if logits.dim() != 2 or masks.dim() != 3 or masks.shape[0] != logits.shape[0] or masks.shape[2] != logits.shape[1]:
        raise ValueError(f"logits [B, M] and masks [B, G, M] expected, got {tuple(logits.shape)}, {tuple(masks.shape)}")
    if advantages.shape != masks.shape[:2]:
        raise ValueError(f"advantages must be [B, G] = {tuple(masks.shape[:2])}, got {tuple(advantages.shape)}")
    old = old_logits.detach().to(logits.dtype)
    if old.dim() == 2:
        old = old[:, None, :]
    logp_new = token_logprob(logits[:, None, :], masks)  # [B, G, M]
    logp_old = token_logprob(old, masks)  # [B, G, M] (or broadcast)
    log_ratio = (logp_new - logp_old).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(logits.dtype)[..., None]  # [B, G, 1]
    surr1 = ratio * adv
    surr2 = ratio.clamp(1.0 - clip, 1.0 + clip) * adv
    obj = torch.minimum(surr1, surr2)
    w = None if valid is None else valid.to(torch.bool)[:, None, :]
    pg_loss = -_masked_mean(obj, w)
    ent = _masked_mean(bernoulli_entropy(logits), None if valid is None else valid.to(torch.bool))
    loss = pg_loss - entropy_coef * ent
    with torch.no_grad():
        clip_frac = _masked_mean((surr2 < surr1).to(logits.dtype), w)
        approx_kl = _masked_mean((ratio - 1.0) - log_ratio, w)
        ratio_mean = _masked_mean(ratio, w)
        keep = _masked_mean(torch.sigmoid(logits), None if valid is None else valid.to(torch.bool))
    return {
        "loss": loss,
        "pg_loss": pg_loss.detach(),
        "entropy": ent.detach(),
        "clip_frac": clip_frac,
        "approx_kl": approx_kl,
        "ratio": ratio_mean,
        "keep_prob": keep,
    }

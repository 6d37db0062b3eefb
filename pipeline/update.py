"""The policy update: one PPO-style step over a batch of rollouts, shared by the single-process
trainer (:func:`pipeline.trainer.train_step`) and the DeepSpeed learner (``actors/learner.py``).

:func:`ppo_update` is the whole learner side of a step: split advantages, ``ppo_epochs`` passes of
(surrogate, backward, gradient norm, optimizer step), a pass whose gradient norm is not finite
skipped and counted, and the metrics. What differs between the two callers is only how a loss is
turned into a weight update, behind the three-method :class:`Optimizer` interface:
:class:`TorchOptimizer` here (grad-norm clip + ``torch.optim``), ``DeepSpeedOptimizer`` in the
learner (the engine's backward/step, gradients all-reduced across ranks).

A batch whose samples differ in ``T'`` (``RolloutBatch.steps``) is updated as it was rolled out:
the policy scores each sample at its own length (:func:`pipeline.policy.padded_logits`, so the
ratio at unchanged weights is exactly 1 however Ray Data regrouped the records) and the loss,
entropy, ratio and KL are means over real tokens only (``RolloutBatch.token_valid``); the
advantages are per rollout and ``rho`` already counts each sample's own tokens. An equal-length
batch runs the plain operations (no mask anywhere).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from pipeline.config import StageConfig
from pipeline.loss import clipped_surrogate_loss
from pipeline.metrics import mean_metrics
from pipeline.policy import Question, padded_logits
from pipeline.rewards import split_advantage

if TYPE_CHECKING:
    from pipeline.trainer import RolloutBatch

Tensor = torch.Tensor

# metric names (TensorBoard tags) of a step, written by the trainer and the learner alike
REWARD = "reward"  # mean dCE over the batch's B*G rollouts
DCE_MEAN, DCE_MIN, SAFE_FRAC = "dce/mean", "dce/min", "dce/safe_frac"
RHO, KEPT = "sparsity/rho", "sparsity/kept_ratio"
CE_FULL, CE_MASKED = "ce/full", "ce/masked"
ADV_MEAN, ADV_STD, ADV_MIN, ADV_MAX = "adv/mean", "adv/std", "adv/min", "adv/max"
ENTROPY, CLIP_FRAC, APPROX_KL, KEEP_PROB = "policy/entropy", "policy/clip_frac", "policy/approx_kl", "policy/keep_prob"
GRAD_NORM, LOSS, PG_LOSS, RATIO, LR = "policy/grad_norm", "policy/loss", "policy/pg_loss", "policy/ratio", "policy/lr"
SKIPPED = "policy/skipped_steps"  # passes whose gradient norm was not finite (no optimizer step)
VERSION, VERSION_LAG = "policy/version", "policy/version_lag"
ROLLOUTS_PER_S = "rollouts/s"
OBJECTIVE = "objective/safe_sparsity"  # mean of rho * [dCE > 0]: sparsity earned inside the safe zone
SHIFT = "sparsity/logit_shift"  # mean logit shift b of budgeted rollouts (stage.rollout_budget)
FRAMES_MIN, FRAMES_MAX = "data/frames_min", "data/frames_max"  # frames per sample in the batch (data.sampling: fps varies)
SUMMARY_KEYS = (REWARD, DCE_MIN, SAFE_FRAC, KEPT, KEEP_PROB, ENTROPY, ROLLOUTS_PER_S)


def advantages(batch: RolloutBatch, stage_cfg: StageConfig) -> Tensor:
    """Split advantage ``[B, G]`` (float32, CPU) of a batch."""
    return split_advantage(batch.dce, batch.rho, stage_cfg.penalty, stage_cfg.adv_eps,
                           stage_cfg.penalty_scale_by_dce).float()


def batch_metrics(batch: RolloutBatch, adv: Tensor | None = None) -> dict[str, float]:
    """Reward-side metrics of a batch (what the rollouts measured)."""
    m = {
        REWARD: float(batch.dce.mean()),
        DCE_MEAN: float(batch.dce.mean()),
        DCE_MIN: float(batch.dce.min()),
        SAFE_FRAC: float((batch.dce > 0).float().mean()),
        RHO: float(batch.rho.mean()),
        KEPT: float((1.0 - batch.rho).mean()),
        CE_FULL: float(batch.ce_full.mean()),
        CE_MASKED: float(batch.ce.mean()),
        OBJECTIVE: float((batch.rho * (batch.dce > 0).float()).mean()),
    }
    if batch.shift is not None:
        m[SHIFT] = float(batch.shift.mean())
    if batch.num_frames is not None:
        m[FRAMES_MIN], m[FRAMES_MAX] = float(batch.num_frames.min()), float(batch.num_frames.max())
    if adv is not None:
        a = adv.float()
        m.update({ADV_MEAN: float(a.mean()), ADV_STD: float(a.std(unbiased=False)),
                  ADV_MIN: float(a.min()), ADV_MAX: float(a.max())})
    return m


def surrogate(policy: torch.nn.Module, X: Tensor, grid: tuple[int, int], masks: Tensor, old_logits: Tensor,
              adv: Tensor, stage_cfg: StageConfig, shift: Tensor | None = None, steps: Tensor | None = None,
              valid: Tensor | None = None, question: Question | None = None) -> dict[str, Tensor]:
    """Forward + clipped surrogate loss with entropy bonus (tensors already on the policy's device);
    ``policy`` may be a DeepSpeed engine. ``shift[B]``: the rollouts' logit shift (the same constant
    in the current policy, so the ratio compares like with like). ``steps[B]`` / ``valid[B, M]``:
    a padded batch's lengths and real tokens (module doc); None for an equal-length batch.
    ``question``: a question-aware policy's words (``RolloutBatch.question_input``). Returns
    :func:`~pipeline.loss.clipped_surrogate_loss`'s dict."""
    logits = padded_logits(policy, X, grid, steps, question)
    if shift is not None:
        logits = logits + shift.to(logits.device, logits.dtype)[:, None]
    return clipped_surrogate_loss(logits.float(), masks, old_logits, adv, clip=stage_cfg.clip,
                                  entropy_coef=stage_cfg.entropy, valid=valid)


class Optimizer(Protocol):
    """How a loss becomes a weight update. ``module`` is what the surrogate calls forward on."""

    module: torch.nn.Module

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> tuple[float, bool]:
        """Clip and apply the gradient unless its norm is not finite; ``(grad norm, stepped)``.
        The gradient is cleared either way."""
        ...

    def set_lr(self, lr: float) -> None: ...


class TorchOptimizer:
    """Single-process :class:`Optimizer`: ``clip_grad_norm_`` then ``torch.optim`` (AdamW)."""

    def __init__(self, policy: torch.nn.Module, stage_cfg: StageConfig, optimizer: torch.optim.Optimizer | None = None):
        self.module = policy
        self.max_grad_norm = stage_cfg.max_grad_norm
        self.optimizer = optimizer if optimizer is not None else make_optimizer(policy, stage_cfg)

    def backward(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> tuple[float, bool]:
        gn = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm))
        finite = gn == gn and abs(gn) != float("inf")
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gn, finite

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)


def ppo_update(opt: Optimizer, batch: RolloutBatch, stage_cfg: StageConfig, *, loss_scale: float = 1.0
               ) -> dict[str, float]:
    """``stage_cfg.ppo_epochs`` passes of the clipped surrogate over ``batch`` through ``opt``.

    ``loss_scale``: 0 runs the passes with a zero loss (a data-parallel rank whose whole batch was
    stale still joins the gradient all-reduce). A pass whose gradient norm is not finite is not
    applied and is counted in :data:`SKIPPED`. Returns the batch's reward metrics, the
    advantages' statistics and the policy metrics averaged over the passes."""
    dev = next(opt.module.parameters()).device
    adv = advantages(batch, stage_cfg)
    metrics = batch_metrics(batch, adv)
    X, masks = batch.X.to(dev), batch.unpacked_masks().to(dev)
    old, adv_d = batch.old_logits.to(dev), adv.to(dev)
    valid = batch.token_valid()
    valid = None if valid is None else valid.to(dev)
    question = batch.question_input()
    question = None if question is None else (question[0].to(dev), question[1].to(dev))
    opt.module.train()
    passes: list[dict[str, float]] = []
    skipped = 0
    for _ in range(stage_cfg.ppo_epochs):
        out = surrogate(opt.module, X, batch.grid, masks, old, adv_d, stage_cfg, batch.shift, batch.steps, valid, question)
        opt.backward(out["loss"] * loss_scale)
        grad_norm, stepped = opt.step()
        skipped += not stepped
        passes.append({
            LOSS: float(out["loss"].detach()), PG_LOSS: float(out["pg_loss"]), ENTROPY: float(out["entropy"]),
            CLIP_FRAC: float(out["clip_frac"]), APPROX_KL: float(out["approx_kl"]), RATIO: float(out["ratio"]),
            KEEP_PROB: float(out["keep_prob"]), GRAD_NORM: grad_norm,
        })
    metrics.update(mean_metrics(passes))
    metrics[SKIPPED] = float(skipped)
    return metrics


def make_optimizer(policy: torch.nn.Module, stage_cfg: StageConfig) -> torch.optim.Optimizer:
    """AdamW at the stage's lr and weight decay (the learner hands the same to DeepSpeed)."""
    return torch.optim.AdamW(policy.parameters(), lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)


def lr_at(step: int, stage_cfg: StageConfig) -> float:
    """Linear warmup over ``warmup`` steps (step 0 gets ``lr / warmup``), then constant ``lr``."""
    if stage_cfg.warmup <= 0:
        return stage_cfg.lr
    return stage_cfg.lr * min(1.0, (step + 1) / stage_cfg.warmup)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr

"""Inference selection: the budget, the selection context every selector reads, and the SCORE
policy's deterministic global top-K over its keep logits.

``K = ceil(r * T*N)`` (:func:`budget`) tokens with the highest logits over the
whole video, returned in original order (ascending flat index ``t*N + i``). Ties go to the lower
index. With ``min_per_frame = m`` the best ``m`` tokens of every frame are taken first, then the
remaining budget goes to the global top of the rest. Position ids are the kept tokens' ORIGINAL
ones; slicing them is the MLLM adapter's job.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor


def budget(retention: float, num_tokens: int) -> int:
    """``K = ceil(r * T*N)``, at least 1 and at most all tokens."""
    if not 0.0 < retention <= 1.0:
        raise ValueError(f"retention must be in (0, 1], got {retention}")
    return max(1, min(num_tokens, math.ceil(retention * num_tokens - 1e-9)))


@dataclass
class SelectionContext:
    """What a selector may look at besides X: the token grid, (oracle only) annotations, and
    (FastV only) the prompt and the MLLM adapter."""

    grid: tuple[int, int, int]  # (T, gh, gw)
    frame_hw: tuple[int, int] = (0, 0)  # source frame size that the annotation boxes refer to
    objects: list[dict[str, Any]] | None = None  # world annotations: [{id, boxes: [box|None per frame]}]
    question_objects: list[int] | None = None  # ids of the objects the question is about
    seed: int = 0
    prompt: str | None = None  # the text prompt (with the video placeholder): FastV reads its last token
    adapter: Any = None  # the frozen MLLM adapter (FastV runs its first layers); None for X-only methods
    side: dict | None = None  # the video's side features (encode_video_with_side), for FastV's forward


def _stable_desc(x: Tensor) -> Tensor:
    """argsort along the last dim, descending, ties -> lower index first."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices


def topk_keep(
    logits: Tensor,
    retention: float | None = None,
    *,
    k: int | None = None,
    grid: tuple[int, int, int] | None = None,
    min_per_frame: int = 0,
) -> Tensor:
    """Keep index of the top-K tokens.

    Args:
        logits: ``[M]`` or ``[B, M]`` keep logits (``M = T*N``, flattened row-major).
        retention: ratio ``r`` in (0, 1]; ``K = budget(r, M)``. Exactly one of ``retention``/``k``.
        k: explicit budget, ``1 <= k <= M``.
        grid: ``(T, gh, gw)``; required when ``min_per_frame > 0``.
        min_per_frame: best tokens forced per frame before the global top-K. The effective value is
            ``min(min_per_frame, K // T, N)``, so the budget is never exceeded (``K < T`` falls back
            to plain global top-K).

    Returns:
        ``LongTensor[K]`` (or ``[B, K]``), ascending, unique, on ``logits.device``. Deterministic;
        NaN logits raise ``ValueError``.
    """
    if (retention is None) == (k is None):
        raise ValueError("give exactly one of retention or k")
    squeeze = logits.dim() == 1
    z = logits.detach()[None] if squeeze else logits.detach()
    if z.dim() != 2:
        raise ValueError(f"logits must be [M] or [B, M], got {tuple(logits.shape)}")
    m = z.shape[-1]
    if k is None:
        k = budget(float(retention), m)
    if not 1 <= k <= m:
        raise ValueError(f"k must be in [1, {m}], got {k}")
    forced = None
    if min_per_frame > 0:
        if grid is None:
            raise ValueError("min_per_frame needs grid=(T, gh, gw)")
        t, gh, gw = grid
        n = gh * gw
        if t * n != m:
            raise ValueError(f"grid {grid} has {t * n} tokens, logits have {m}")
        per = min(min_per_frame, k // t, n)
        if per > 0:
            order = _stable_desc(z.reshape(-1, t, n))[..., :per]  # [B, T, per] frame-local
            forced = torch.zeros(z.shape[0], t, n, dtype=torch.bool, device=z.device)
            forced.scatter_(-1, order, True)
            forced = forced.reshape(z.shape[0], m)
    vals, order = torch.sort(z, dim=-1, descending=True, stable=True)  # by logit desc, index asc
    if bool(torch.isnan(vals[:, 0]).any()):  # sort puts NaN first: one element per row to check
        raise ValueError("topk_keep: NaN logits")
    if forced is not None:
        # second stable sort on the forced flag keeps the logit order inside each group
        rank = torch.gather(forced, -1, order).to(torch.int8)
        order = torch.gather(order, -1, _stable_desc(rank))
    keep = torch.sort(order[:, :k], dim=-1).values
    return keep[0] if squeeze else keep


def inference_forward(policy: torch.nn.Module, compile: bool = False) -> Callable[..., Tensor]:
    """``forward(X, grid[, question=...]) -> logits``: the policy itself, or with ``compile=True`` the policy through
    ``torch.compile`` (inductor fuses the small ops whose per-call cost dominates a tiny policy's
    forward; the first call per shape compiles, ~25 s here). Where compiling fails (no C++ compiler,
    an unsupported backend) it warns once and runs the policy eagerly from then on."""
    if not compile:
        return policy
    state = {"fn": torch.compile(policy, dynamic=None)}

    def forward(X: Tensor, grid: tuple[int, int], **kw: Any) -> Tensor:
        fn = state["fn"]
        if fn is policy:
            return policy(X, grid, **kw)
        try:
            return fn(X, grid, **kw)
        except Exception as e:  # noqa: BLE001  (any compile-time failure: fall back, said once)
            warnings.warn(f"torch.compile of the SCORE policy failed ({type(e).__name__}: {str(e)[:200]}); "
                          "running it eagerly", RuntimeWarning, stacklevel=2)
            state["fn"] = policy
            return policy(X, grid, **kw)

    return forward


def question_input(adapter: Any, prompt: str | None, device: Any = "cpu") -> tuple[Tensor, Tensor]:
    """One question as a question-aware policy reads it: ``(Q[L, D], mask[L])`` from the frozen
    MLLM's input embeddings of the prompt's words (ValueError without a prompt or adapter)."""
    if adapter is None or prompt is None:
        raise ValueError("a question-aware SCORE policy selects per question: it needs the prompt and the MLLM adapter")
    Q = adapter.question_embeddings(prompt)
    return Q.to(device), torch.ones(Q.shape[0], dtype=torch.bool, device=device)


def make_score_selector(policy: torch.nn.Module, min_per_frame: int = 0,
                        compile: bool = False) -> Callable[[Tensor, int, SelectionContext], Tensor]:
    """The trained compressor behind the baselines' selector interface:
    ``selector(X[T, N, D], k, ctx) -> LongTensor[k]`` (sorted), using ``ctx.grid = (T, gh, gw)``.
    ``policy`` is a :class:`pipeline.policy.ScorePolicy` (run in eval mode, no grad);
    ``compile``: see :func:`inference_forward`. A question-aware policy reads ``ctx.prompt``'s
    words through ``ctx.adapter`` (:func:`question_input`): top-K per question."""
    forward = inference_forward(policy, compile)
    asks = bool(policy.cfg.question_aware)

    @torch.inference_mode()
    def score_select(X: Tensor, k: int, ctx: SelectionContext) -> Tensor:
        t, gh, gw = ctx.grid
        was_training = policy.training
        if was_training:  # (eval() walks every submodule: skipped when already in eval mode)
            policy.eval()
        dev = next(policy.parameters()).device
        kw = {"question": question_input(ctx.adapter, ctx.prompt, dev)} if asks else {}
        try:
            z = forward(X.to(dev), (gh, gw), **kw)
        finally:
            if was_training:
                policy.train()
        return topk_keep(z, k=k, grid=ctx.grid, min_per_frame=min_per_frame).cpu()

    score_select.policy = policy  # what the evaluation costs (its FLOPs)
    return score_select

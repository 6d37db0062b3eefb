"""Token selectors behind one interface and an exact budget.

A selector maps one video's visual tokens ``X[T, N, D]`` (N = gh*gw tokens per frame, row-major)
and a budget K to a sorted keep index ``LongTensor[K]`` into the flattened ``T*N`` tokens.
Every method gets the same frozen MLLM and the same K, so accuracies are comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def budget(retention: float, num_tokens: int) -> int:
    """``K = ceil(r * T*N)``, at least 1 and at most all tokens."""
    if not 0.0 < retention <= 1.0:
        raise ValueError(f"retention must be in (0, 1], got {retention}")
    return max(1, min(num_tokens, math.ceil(retention * num_tokens - 1e-9)))


@dataclass
class SelectionContext:
    """What a selector may look at besides X: the token grid, and (oracle only) annotations."""

    grid: tuple[int, int, int]  # (T, gh, gw)
    frame_hw: tuple[int, int] = (0, 0)  # source frame size that the annotation boxes refer to
    objects: list[dict[str, Any]] | None = None  # world annotations: [{id, boxes: [box|None per frame]}]
    question_objects: list[int] | None = None  # ids of the objects the question is about
    seed: int = 0


def _index(sel: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.sort(sel).astype(np.int64))


def random_select(X: torch.Tensor, k: int, ctx: SelectionContext) -> torch.Tensor:
    """Random: K tokens uniformly without replacement (seeded)."""
    m = X.shape[0] * X.shape[1]
    return _index(np.random.default_rng(ctx.seed).choice(m, size=k, replace=False))


def uniform_temporal(X: torch.Tensor, k: int, ctx: SelectionContext) -> torch.Tensor:
    """Uniform temporal stride: whole frames evenly spaced in time; a partially used frame gives
    evenly spaced tokens (frame sampling, the default of most video LLMs)."""
    t, n = X.shape[0], X.shape[1]
    frames = np.unique(np.linspace(0, t - 1, math.ceil(k / n)).round().astype(int))
    cand = (frames[:, None] * n + np.arange(n)[None]).reshape(-1)
    pick = np.linspace(0, len(cand) - 1, k).round().astype(int)
    return _index(cand[pick])


def oracle_select(X: torch.Tensor, k: int, ctx: SelectionContext) -> torch.Tensor:
    """Oracle (upper reference, uses annotations): the tokens covering the question's objects,
    spread evenly over their visible frames when they exceed K, filled up to K at random."""
    if ctx.objects is None or ctx.question_objects is None:
        raise ValueError("oracle selection needs object annotations and the question's object ids")
    t, gh, gw = ctx.grid
    h, w = ctx.frame_hw
    if len(ctx.objects) and t != len(ctx.objects[0]["boxes"]):
        raise ValueError(f"oracle: {t} frames in X but {len(ctx.objects[0]['boxes'])} annotated frames")
    cover = np.zeros((t, gh, gw))
    ch, cw = h / gh, w / gw
    for o in ctx.objects:
        if o["id"] not in ctx.question_objects:
            continue
        for f, box in enumerate(o["boxes"]):
            if box is None:
                continue
            x0, y0, x1, y1 = box
            for gy in range(gh):
                iy = min(y1, (gy + 1) * ch) - max(y0, gy * ch)
                if iy <= 0:
                    continue
                for gx in range(gw):
                    ix = min(x1, (gx + 1) * cw) - max(x0, gx * cw)
                    if ix > 0:
                        cover[f, gy, gx] = max(cover[f, gy, gx], ix * iy)
    cover = cover.reshape(-1)
    obj = np.nonzero(cover > 0)[0]
    rng = np.random.default_rng(ctx.seed)
    if len(obj) >= k:
        # keep the best-covered token of each visible frame first, then spread the rest in time
        ranked = obj[np.lexsort((-cover[obj], obj // (gh * gw)))]
        sel = ranked[np.linspace(0, len(ranked) - 1, k).round().astype(int)]
        if len(np.unique(sel)) < k:  # rounding collisions: top up with the best-covered others
            rest = np.setdiff1d(obj[np.argsort(-cover[obj], kind="stable")], sel, assume_unique=False)
            sel = np.concatenate([np.unique(sel), rest[: k - len(np.unique(sel))]])
        return _index(sel)
    rest = np.setdiff1d(np.arange(len(cover)), obj)
    return _index(np.concatenate([obj, rng.choice(rest, size=k - len(obj), replace=False)]))


SELECTORS = {"random": random_select, "uniform": uniform_temporal, "oracle": oracle_select}

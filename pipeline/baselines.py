"""Token selectors behind one interface and an exact budget.

A selector maps one video's visual tokens ``X[T, N, D]`` (N = gh*gw tokens per frame, row-major)
and a budget K to a sorted keep index ``LongTensor[K]`` into the flattened ``T*N`` tokens.
Every method gets the same frozen MLLM and the same K, so accuracies are comparable.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from pipeline.select import SelectionContext, topk_keep


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


def object_cover(ctx: SelectionContext, ids: set[int]) -> np.ndarray:
    """``[T * gh * gw]`` float: the area (source pixels) of each token's cell that the objects
    ``ids`` cover in its frame, the largest over those objects; 0 off them."""
    t, gh, gw = ctx.grid
    h, w = ctx.frame_hw
    objects = ctx.objects or []
    if len(objects) and t != len(objects[0]["boxes"]):
        raise ValueError(f"annotations: {t} frames in X but {len(objects[0]['boxes'])} annotated frames")
    cover = np.zeros((t, gh, gw))
    ch, cw = h / gh, w / gw
    for o in objects:
        if o["id"] not in ids:
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
    return cover.reshape(-1)


def asked_share(keep: torch.Tensor, ctx: SelectionContext) -> float | None:
    """The share of the kept tokens that lie on the question's objects: whether a selection keeps
    what the question is about. None where it cannot tell (no annotations, boxes for another
    frame count than X's, a question about no object, or a video whose every object is asked
    about)."""
    if not ctx.objects or not ctx.question_objects or len(ctx.objects[0]["boxes"]) != ctx.grid[0]:
        return None
    asked = set(ctx.question_objects)
    if {o["id"] for o in ctx.objects} <= asked:
        return None
    on = object_cover(ctx, asked) > 0
    return float(on[keep.cpu().numpy()].mean()) if keep.numel() else None


def _objects_select(k: int, ctx: SelectionContext, ids: set[int]) -> torch.Tensor:
    """The tokens covering the objects ``ids``, spread evenly over their visible frames when they
    exceed K, filled up to K at random."""
    gh, gw = ctx.grid[1:]
    cover = object_cover(ctx, ids)
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


def oracle_select(X: torch.Tensor, k: int, ctx: SelectionContext) -> torch.Tensor:
    """Oracle (upper reference, uses annotations): the tokens covering the question's objects,
    spread evenly over their visible frames when they exceed K, filled up to K at random."""
    if ctx.objects is None or ctx.question_objects is None:
        raise ValueError("oracle selection needs object annotations and the question's object ids")
    return _objects_select(k, ctx, set(ctx.question_objects))


def objects_oracle_select(X: torch.Tensor, k: int, ctx: SelectionContext) -> torch.Tensor:
    """Question-agnostic oracle (uses annotations, not the question): the tokens covering every
    object, spread the same way. What a selection that finds every object but cannot know which
    one the question is about keeps: the reference for a question-agnostic compressor."""
    if ctx.objects is None:
        raise ValueError("oracle_objects selection needs object annotations")
    return _objects_select(k, ctx, {o["id"] for o in ctx.objects})


# ------------------------------------------------------------------------------------------------
# Published training-free baselines, re-implemented from the papers' descriptions as index
# selectors with the exact budget K (every method is compared on the same frozen MLLM and K).
# Merging methods (VisionZip, DyCoke) produce averaged tokens in their papers; a selector returns
# indices of real tokens, so "merge" becomes "keep one representative" (see each docstring).

_EPS = 1e-8


def _f32(X: torch.Tensor) -> np.ndarray:
    return X.detach().float().cpu().numpy()


def _unit(a: np.ndarray) -> np.ndarray:
    return a / (np.linalg.norm(a, axis=-1, keepdims=True) + _EPS)


def _order_desc(score: np.ndarray) -> np.ndarray:
    """Indices by score descending, ties -> lower index first."""
    return np.argsort(-score, kind="stable")


def _even_counts(k: int, t: int, cap: int) -> np.ndarray:
    """``k`` tokens over ``t`` frames as evenly as possible (each <= cap); the remainder goes to
    frames evenly spaced in time."""
    base = np.full(t, k // t)
    extra = k - base.sum()
    if extra:
        base[np.round(np.linspace(0, t - 1, extra)).astype(int)] += 1
    assert base.max() <= cap and base.sum() == k
    return base


def allocate(weights: np.ndarray, k: int, cap: int) -> np.ndarray:
    """Integer per-frame budgets ``c[t] <= cap`` summing to exactly ``k``, proportional to
    ``weights`` (water-filling over the cap, then largest remainder; ties -> earlier frame)."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    t = len(w)
    if not 0 <= k <= t * cap:
        raise ValueError(f"cannot place {k} tokens in {t} frames of {cap}")
    counts = np.zeros(t, dtype=np.int64)
    free = np.ones(t, dtype=bool)
    while True:
        rem = k - counts.sum()
        ideal = np.zeros(t)
        ws = w[free].sum()
        ideal[free] = rem * w[free] / ws if ws > 0 else rem / free.sum()
        over = free & (ideal >= cap)
        if not over.any():
            break
        counts[over] = cap
        free &= ~over
        if not free.any() or counts.sum() == k:
            return counts
    counts[free] = np.floor(ideal[free]).astype(np.int64)
    left = int(k - counts.sum())
    if left:
        frac = np.where(free, ideal - np.floor(ideal), -1.0)
        counts[_order_desc(frac)[:left]] += 1
    assert counts.sum() == k and counts.max() <= cap
    return counts


def _per_frame_top(score: np.ndarray, counts: np.ndarray) -> torch.Tensor:
    """``score[T, N]``, ``counts[T]`` -> the top ``counts[t]`` tokens of every frame (flat, sorted)."""
    n = score.shape[1]
    sel = [t * n + _order_desc(score[t])[:c] for t, c in enumerate(counts) if c]
    return _index(np.concatenate(sel))


def _spread_positions(c: int, gh: int, gw: int) -> np.ndarray:
    """``c`` grid positions (row-major flat indices) on an even 2-D lattice: ``r x q`` evenly spaced
    rows/cols (r ~ sqrt(c*gh/gw)), ``c`` of them taken evenly spaced; rounding collisions are filled
    by farthest-point sampling over the rest of the grid."""
    n = gh * gw
    if c >= n:
        return np.arange(n)
    r = int(min(gh, max(1, round(math.sqrt(c * gh / gw)))))
    q = int(min(gw, math.ceil(c / r)))
    while r * q < c:  # the lattice must hold c points
        r, q = min(gh, r + 1), min(gw, q + 1)
    rows = np.round(np.linspace(0, gh - 1, r) if r > 1 else np.array([(gh - 1) / 2])).astype(int)
    cols = np.round(np.linspace(0, gw - 1, q) if q > 1 else np.array([(gw - 1) / 2])).astype(int)
    lattice = (rows[:, None] * gw + cols[None, :]).reshape(-1)
    pick = np.unique(lattice[np.round(np.linspace(0, len(lattice) - 1, c)).astype(int)])
    if len(pick) < c:
        yx = np.stack(np.divmod(np.arange(n), gw), axis=1).astype(float)
        chosen = list(pick)
        d = np.min(((yx[:, None] - yx[chosen][None]) ** 2).sum(-1), axis=1)
        while len(chosen) < c:
            j = int(np.argmax(d))  # farthest from the chosen ones (ties -> lower index)
            chosen.append(j)
            d = np.minimum(d, ((yx - yx[j]) ** 2).sum(-1))
        pick = np.sort(np.array(chosen))
    return pick


def uniform_spatial(X: torch.Tensor, k: int, ctx: SelectionContext) -> torch.Tensor:
    """Uniform spatial stride (grid down-sampling as in spatial-pooling video LLMs, e.g. LLaVA-OneVision's
    2x2 video pooling, Li et al. 2024): every frame keeps the same evenly spaced grid positions
    (K/T per frame, the remainder on frames evenly spaced in time)."""
    t, n = X.shape[0], X.shape[1]
    _, gh, gw = ctx.grid
    if gh * gw != n:
        raise ValueError(f"grid {ctx.grid} does not match N={n}")
    counts = _even_counts(k, t, n)
    sel = [f * n + _spread_positions(int(c), gh, gw) for f, c in enumerate(counts) if c]
    return _index(np.concatenate(sel))


def visionzip_select(X: torch.Tensor, k: int, ctx: SelectionContext, dominant_ratio: float = 54 / 64) -> torch.Tensor:
    """VisionZip-style (Yang et al. 2024, "VisionZip: Longer is Better but Not Necessary in VLMs"):
    per frame, dominant tokens (most attended) plus contextual tokens from merging the rest.

    Simplifications: the paper reads [CLS]/mean attention inside the vision encoder; here a
    parameter-free proxy, the mean softmax(x_i . x_j / sqrt(D)) attention each token receives
    within its frame. The paper merges the remaining tokens into evenly spaced target tokens by
    similarity and feeds the averages; a selector returns indices, so each cluster contributes
    the real token closest to its mean. Budget: K split evenly over frames; per frame 54:10
    dominant:contextual (the paper's default ratio)."""
    x = _f32(X)
    t, n, d = x.shape
    counts = _even_counts(k, t, n)
    sel = []
    for f, c in enumerate(counts):
        c = int(c)
        if not c:
            continue
        xf = x[f]
        logits = xf @ xf.T / math.sqrt(d)
        att = np.exp(logits - logits.max(1, keepdims=True))
        att /= att.sum(1, keepdims=True)
        dom_n = min(c, max(1, int(round(dominant_ratio * c))))
        dom = _order_desc(att.mean(0))[:dom_n]
        ctx_n = c - dom_n
        keep = list(dom)
        if ctx_n:
            rest = np.setdiff1d(np.arange(n), dom)  # ascending
            targets = rest[np.round(np.linspace(0, len(rest) - 1, ctx_n)).astype(int)]
            u = _unit(xf)
            assign = np.argmax(u[rest] @ u[targets].T, axis=1)  # ties -> first target
            assign[np.searchsorted(rest, targets)] = np.arange(ctx_n)  # a target is its own cluster
            for g in range(ctx_n):
                members = rest[assign == g]
                centre = _unit(xf[members].mean(0))
                keep.append(int(members[int(np.argmax(u[members] @ centre))]))
        sel.append(f * n + np.array(keep))
    return _index(np.concatenate(sel))


def dycoke_select(X: torch.Tensor, k: int, ctx: SelectionContext, dup_similarity: float = 0.95) -> torch.Tensor:
    """DyCoke-style temporal token merging (Tao et al. 2025, "DyCoke: Dynamic Compression of Tokens
    for Fast Video LLMs", its TTM stage): a token whose cosine similarity to the same grid position
    in the previous KEPT frame is >= ``dup_similarity`` is redundant (merged into that earlier
    token, which stays the reference); the others become the new reference.

    Ranking for the exact budget: non-redundant tokens first, by dissimilarity to their reference
    (1 - cos; first-frame tokens, which have no reference, by 1 - cos to their frame's mean
    token), then redundant ones by dissimilarity. Simplifications: no 4-frame windows and no
    decoding-time KV-cache pruning (the paper's second stage); merging keeps the earlier token."""
    x = _f32(X)
    t, n, _ = x.shape
    u = _unit(x)
    score = np.zeros((t, n))
    redundant = np.zeros((t, n), dtype=bool)
    score[0] = 1.0 - u[0] @ _unit(x[0].mean(0))
    ref = u[0].copy()
    for f in range(1, t):
        sim = (u[f] * ref).sum(-1)
        redundant[f] = sim >= dup_similarity
        score[f] = 1.0 - sim
        ref[~redundant[f]] = u[f][~redundant[f]]
    flat_score = score.reshape(-1)
    # primary key: not redundant; secondary: dissimilarity desc; ties -> lower index
    order = np.lexsort((np.arange(t * n), -flat_score, redundant.reshape(-1)))
    return _index(order[:k])


def fastvid_select(X: torch.Tensor, k: int, ctx: SelectionContext) -> torch.Tensor:
    """FastVID/VidCom2-style frame-uniqueness budget (Liu et al. 2025, "Video Compression Commander",
    frame compression adjustment; cf. Shen et al. 2025 "FastVID"): frame uniqueness = 1 - cos(frame
    mean token, video mean token); per-frame budgets proportional to softmax of the standardised
    uniqueness (exact integer split, capped at N); within a frame the most distinctive tokens,
    distinctiveness = (1 - cos to the frame mean) + (1 - cos to the video mean).
    Simplification: no FastVID temporal segmentation / density clustering, no token merging."""
    x = _f32(X)
    t, n, _ = x.shape
    fm = x.mean(1)  # [T, D]
    vm = fm.mean(0)
    uniq = 1.0 - _unit(fm) @ _unit(vm)
    z = (uniq - uniq.mean()) / (uniq.std() + 1e-6)
    w = np.exp(z - z.max())
    counts = allocate(w, k, n)
    u = _unit(x)
    distinct = (1.0 - (u * _unit(fm)[:, None, :]).sum(-1)) + (1.0 - u @ _unit(vm))
    return _per_frame_top(distinct, counts)


# ------------------------------------------------------------------------------------------------
# FastV needs the frozen MLLM itself (attention inside the language model)


class _StopForward(Exception):
    pass


def _decoder_layers(lm: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(lm, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    for name, mod in lm.named_modules():
        if name.endswith("layers") and isinstance(mod, torch.nn.ModuleList):
            return mod
    raise ValueError(f"{type(lm).__name__}: no decoder layer list found")


def last_token_attention(adapter: Any, X: torch.Tensor, prompt: Any, layer: int = 2,
                         side: dict | None = None) -> torch.Tensor:
    """Attention of the last prompt token to every visual token at decoder layer ``layer`` (0-based,
    clamped to the last layer), averaged over heads, with ALL visual tokens in the sequence
    -> float32 ``[T*N]`` (index ``t*N + i``).

    Runs the language model over the full sequence only up to that layer: the layer's attention
    is computed with the eager kernel (which returns its weights) and the forward stops there.
    The last row of the attention matrix sees every position, so it is exact whatever causal
    mask format the other kernels use."""
    T, N = X.shape[0], X.shape[1]
    lm = adapter.language_model
    layers = _decoder_layers(lm)
    li = max(0, min(int(layer), len(layers) - 1))
    attn = layers[li].self_attn
    cfg = attn.config
    prev_impl = cfg._attn_implementation
    captured: list[torch.Tensor] = []

    def pre(_mod, _args):
        cfg._attn_implementation = "eager"

    def post(_mod, _args, out):
        cfg._attn_implementation = prev_impl
        captured.append(out[1] if isinstance(out, tuple) else None)
        raise _StopForward

    template = adapter._template(prompt, None, T, N)
    slot = template.slot
    vis = (slot >= 0) & (slot < T * N)
    pos_of = torch.empty(T * N, dtype=torch.long)
    pos_of[slot[vis]] = torch.nonzero(vis).squeeze(1)
    h1, h2 = attn.register_forward_pre_hook(pre), attn.register_forward_hook(post)
    try:
        with torch.inference_mode():
            keep = torch.ones(1, 1, T * N, dtype=torch.bool)
            batch = adapter._masked_batch(X[None], keep, [prompt], None,
                                          side={k: v[None] for k, v in (side or {}).items()})
            try:
                adapter._lm(batch)
            except _StopForward:
                pass
    finally:
        h1.remove()
        h2.remove()
        cfg._attn_implementation = prev_impl
    if not captured or captured[0] is None:
        raise RuntimeError(f"{type(attn).__name__} returned no attention weights under the eager kernel")
    w = captured[0]  # [1, H, L, L]
    last = int(batch.lengths[0]) - 1
    row = w[0, :, last, :].float().mean(0)
    return row[pos_of.to(row.device)].cpu().clone()


def fastv_select(X: torch.Tensor, k: int, ctx: SelectionContext, layer: int = 2) -> torch.Tensor:
    """FastV-style (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2"): the K visual
    tokens with the highest attention from the last text token at an early LLM layer (default
    layer index 2, heads averaged). Needs ``ctx.adapter`` and ``ctx.prompt``. Unlike FastV, which
    keeps every token in the layers before the pruning layer, the evaluation feeds only the K kept
    tokens to all layers (the same setting as every other selector); the selection itself costs a
    forward of the first ``layer + 1`` layers over the full sequence."""
    if ctx.adapter is None or ctx.prompt is None:
        raise ValueError("fastv selection needs the MLLM adapter and the prompt (SelectionContext.adapter/.prompt)")

    att = last_token_attention(ctx.adapter, X, ctx.prompt, layer, ctx.side)
    return topk_keep(att, k=k).cpu()


def make_fastv(adapter: Any = None, layer: int = 2) -> Callable:
    """A FastV selector bound to ``adapter`` (else it uses ``ctx.adapter``) and ``layer``."""

    def select(X: torch.Tensor, k: int, ctx: SelectionContext) -> torch.Tensor:
        if adapter is not None and ctx.adapter is None:
            ctx = replace(ctx, adapter=adapter)
        return fastv_select(X, k, ctx, layer)

    select.__doc__ = fastv_select.__doc__
    select.layer = layer  # type: ignore[attr-defined]
    return select


SELECTORS = {
    "random": random_select,
    "uniform": uniform_temporal,
    "uniform_spatial": uniform_spatial,
    "visionzip": visionzip_select,
    "dycoke": dycoke_select,
    "fastvid": fastvid_select,
    "oracle": oracle_select,
    "oracle_objects": objects_oracle_select,
}
"""Selectors that need only X and the grid (the oracles also need annotations). FastV needs the
MLLM: :func:`make_fastv` / :data:`ADAPTER_SELECTORS`."""

ORACLES = ("oracle", "oracle_objects")
"""The annotation-based references (the question's objects; every object): never rivals of a method."""

ADAPTER_SELECTORS = {"fastv": make_fastv}
"""Factories ``(adapter, **kw) -> selector`` for methods that run the frozen MLLM."""

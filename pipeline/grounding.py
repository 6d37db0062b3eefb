"""Grounding warm start: a question-aware policy learns which tokens a question is about from
object annotations, before reinforcement learning.

The reward of G masks per sample is too weak a teacher for reading the question on its own
(docs/generalization.md). Where videos carry object boxes and each question names the objects it
is about (the shapes world; grounded video datasets), a short supervised pass first teaches the
question-aware policy to rank tokens; stage 2 then trains it with the rollouts and the split
advantage as usual.

Per (video, question) pair, over the video's ``M = T' * N`` tokens:

* ``asked[M]``: the token's cell overlaps an object the question is about (in that frame);
* ``background[M]``: no object overlaps it.

Loss (listwise, two levels), for the policy's logits ``z[M]``::

    L = - mean_{i in asked} log softmax(z)_i                      asked tokens first
        - mean_{i in background} log softmax(z[~asked])_i         then background before other objects

The second level matters because top-K at a budget beyond the asked tokens fills up with the
next-ranked tokens: without it those are the other objects (they look like objects), and a
distractor costs the frozen model more than background does (measured: EXPERIMENTS.md).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipeline.baselines import object_cover
from pipeline.config import Config, GroundingConfig
from pipeline.data.prompts import qa_prompt
from pipeline.select import SelectionContext

Tensor = torch.Tensor


@dataclass
class GroundingPair:
    """One (video, question) target. ``X[T', N, D]``, ``question[L, D]`` (the MLLM's word
    embeddings), ``asked`` / ``background`` ``[T'*N]`` bool, ``grid`` ``(gh, gw)``."""

    X: Tensor
    question: Tensor
    asked: Tensor
    background: Tensor
    grid: tuple[int, int]


def grounding_targets(objects: list[dict], question_objects: list[int], grid: tuple[int, int, int],
                      frame_hw: tuple[int, int]) -> tuple[Tensor, Tensor] | str:
    """``(asked[M], background[M])`` bool for a question about ``question_objects``, or the reason
    there is no target (a counted skip): ``no_annotations``, ``no_question_objects``,
    ``frame_mismatch`` (boxes for another frame count than the tokens'), ``asked_not_visible``."""
    if not objects:
        return "no_annotations"
    if not question_objects:
        return "no_question_objects"
    if len(objects[0]["boxes"]) != grid[0]:
        return "frame_mismatch"
    ctx = SelectionContext(grid=grid, frame_hw=frame_hw, objects=objects)
    asked = object_cover(ctx, set(question_objects)) > 0
    if not asked.any():
        return "asked_not_visible"
    anywhere = object_cover(ctx, {o["id"] for o in objects}) > 0
    return torch.from_numpy(asked), torch.from_numpy(~anywhere)


def grounding_loss(z: Tensor, asked: Tensor, background: Tensor) -> Tensor:
    """The two-level listwise loss of one pair (module doc): ``z[M]`` float, ``asked[M]`` and
    ``background[M]`` bool -> scalar. The second level is skipped where the video has no
    background token or no other object."""
    loss = -torch.log_softmax(z, -1)[asked].mean()
    rest = ~asked
    if bool(background.any()) and bool((rest & ~background).any()):
        loss = loss - torch.log_softmax(z[rest], -1)[background[rest]].mean()
    return loss


def precision_at_asked(z: Tensor, asked: Tensor) -> float:
    """The share of the top-``|asked|`` tokens by ``z`` that are asked tokens (1.0: ranked first)."""
    k = int(asked.sum())
    return float(asked[torch.topk(z, k).indices].float().mean())


def grounding_pairs(adapter: Any, cfg: Config, *, quarantine: Counter | None = None,
                    log: Callable[[str], Any] | None = print) -> Iterator[GroundingPair]:
    """Every usable (video, question) pair of ``data.video_shards`` (the stage-2 videos), encoded by
    the frozen MLLM, up to ``grounding.videos`` videos. Videos that cannot be read and questions
    without a target are counted in ``quarantine`` by reason, never a crash."""
    from pipeline.data import readers
    from pipeline.data.quarantine import BadSample
    from pipeline.data.video import FrameSampling
    from pipeline.trainer import parse_qa

    d = cfg.data
    sampling = FrameSampling.from_config(d, adapter._frames_for(1))
    q = quarantine if quarantine is not None else Counter()
    seen = 0
    for ann in readers.list_video_annotations(d.video_shards, d.s3):
        try:
            entries = readers.read_video_index(ann, d.s3)
        except BadSample as e:
            q[e.reason] += 1
            continue
        for rec in entries:
            if cfg.grounding.videos and seen >= cfg.grounding.videos:
                return
            if isinstance(rec, BadSample):
                q[rec.reason] += 1
                continue
            try:
                v = readers.load_video(rec, sampling, d.frame_size, d.max_caption_words, d.s3)
                objects = json.loads(rec["objects"]) if isinstance(rec.get("objects"), str) else rec.get("objects")
            except BadSample as e:
                q[e.reason] += 1
                continue
            except (TypeError, ValueError):
                q["bad_annotation"] += 1
                continue
            seen += 1
            with torch.no_grad():
                X, _ = adapter.encode_video_with_side(v["frames"])
            X = X.float().cpu()
            t = int(X.shape[0])
            grid = (t, *adapter.visual_grid(t)[1:])
            hw = tuple(rec.get("hw") or (d.frame_size, d.frame_size))
            for qa in parse_qa(v["qa"]):
                target = grounding_targets(objects or [], qa.get("objects") or [], grid, hw)
                if isinstance(target, str):
                    q[target] += 1
                    continue
                words = adapter.question_embeddings(qa_prompt(str(qa["question"])))
                yield GroundingPair(X, words, target[0], target[1], grid[1:])
    if log is not None and q:
        log(f"[grounding] skipped: {dict(q)}")


def _require_question_aware(policy: torch.nn.Module) -> None:
    if not getattr(policy, "cfg").question_aware:
        raise ValueError("grounding: the policy is question-agnostic (set policy.question_aware: true)")


def warm_start(policy: torch.nn.Module, pairs: list[GroundingPair], gcfg: GroundingConfig, seed: int,
               log: Callable[[str], Any] | None = print) -> dict[str, Any]:
    """``gcfg.epochs`` passes of the two-level loss over ``pairs`` (shuffled per epoch from
    ``seed``; AdamW, ``gcfg.batch_size`` pairs per step), in place. Logs one line per epoch: the
    mean loss, the share of each pair's top-``|asked|`` tokens that are asked tokens, the time.
    Returns ``{pairs, epochs: [{loss, precision, seconds}]}``."""
    _require_question_aware(policy)
    if not pairs:
        raise ValueError("grounding: no (video, question) pair with object annotations under data.video_shards")
    device = next(policy.parameters()).device
    opt = torch.optim.AdamW(policy.parameters(), lr=gcfg.lr)
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    history = []
    policy.train()
    for epoch in range(gcfg.epochs):
        t0 = time.perf_counter()
        rng.shuffle(order)
        losses, precisions = [], []
        for s in range(0, len(order), gcfg.batch_size):
            batch = [pairs[i] for i in order[s: s + gcfg.batch_size]]
            loss = torch.zeros((), device=device)
            for p in batch:
                words = p.question.to(device)[None]
                z = policy(p.X.to(device)[None], p.grid,
                           question=(words, torch.ones(1, words.shape[1], dtype=torch.bool, device=device)))[0].float().cpu()
                one = grounding_loss(z, p.asked, p.background)
                loss = loss + one.to(device)
                losses.append(float(one.detach()))
                precisions.append(precision_at_asked(z.detach(), p.asked))
            opt.zero_grad(set_to_none=True)
            (loss / len(batch)).backward()
            opt.step()
        row = {"loss": round(float(np.mean(losses)), 4), "precision": round(float(np.mean(precisions)), 4),
               "seconds": round(time.perf_counter() - t0, 1)}
        history.append(row)
        if log is not None:
            log(f"[grounding] epoch {epoch + 1}/{gcfg.epochs}: loss {row['loss']:.4f}, "
                f"top-|asked| precision {row['precision']:.3f}, {len(pairs)} pairs in {row['seconds']:.1f} s")
    policy.eval()
    return {"pairs": len(pairs), "epochs": history}


def ground_policy(cfg: Config, adapter: Any, policy: torch.nn.Module, *,
                  log: Callable[[str], Any] | None = print) -> dict[str, Any]:
    """The warm start of a curriculum: pairs from the stage-2 videos, then :func:`warm_start`."""
    _require_question_aware(policy)  # before encoding every video
    q: Counter = Counter()
    t0 = time.perf_counter()
    pairs = list(grounding_pairs(adapter, cfg, quarantine=q, log=log))
    if log is not None:
        log(f"[grounding] {len(pairs)} (video, question) pairs encoded in {time.perf_counter() - t0:.1f} s")
    summary = warm_start(policy, pairs, cfg.grounding, int(cfg.run.seed), log=log)
    summary["skipped"] = dict(q)
    return summary


__all__ = ["GroundingPair", "grounding_targets", "grounding_loss", "precision_at_asked", "grounding_pairs",
           "warm_start", "ground_policy"]

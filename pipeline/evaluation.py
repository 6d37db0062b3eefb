"""QA evaluation of a frozen MLLM under a token selector and a retention ratio.

Accuracy is the exact match of the greedy answer (first generated word) with the reference;
option accuracy picks the multiple-choice option with the highest log-likelihood. Both use the
sample's primary question (``qa[0]``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from pipeline.baselines import SelectionContext, budget
from pipeline.data import readers
from pipeline.data.prompts import qa_prompt
from pipeline.mllm.base import MLLMAdapter


@dataclass
class EvalVideo:
    """A held-out video with its encoded tokens (encoded once, reused by every method)."""

    id: str
    X: torch.Tensor  # [T', N, D]
    qa: dict
    objects: list[dict]
    frame_hw: tuple[int, int]


def load_eval_videos(adapter: MLLMAdapter, video_root: str, limit: int, num_frames: int, size: int,
                     max_words: int = 64) -> list[EvalVideo]:
    """Decode (PyAV) and encode up to ``limit`` annotated videos from ``video_root``'s shards."""
    out: list[EvalVideo] = []
    for ann in readers.list_video_annotations(video_root):
        for rec in readers.read_video_index(ann):
            if isinstance(rec, Exception):
                raise rec
            qa = json.loads(rec["qa"])
            if not qa:
                continue
            v = readers.load_video(rec, num_frames, size, max_words)
            out.append(EvalVideo(rec["id"], adapter.encode_video(v["frames"]), qa[0], json.loads(rec["objects"]),
                                 tuple(rec["hw"] or (size, size))))
            if len(out) >= limit:
                return out
    return out


def answer_word(text: str) -> str:
    """The first word of a generated answer, without trailing punctuation ("green. a" -> "green")."""
    m = re.search(r"[\w-]+", text)
    return m.group(0).lower() if m else ""


@torch.no_grad()
def evaluate_qa(adapter: MLLMAdapter, videos: Iterable[EvalVideo],
                selector: Callable | None = None, retention: float = 1.0, seed: int = 0) -> dict:
    """``{accuracy, option_accuracy, per_type: {type: accuracy}, n}`` with ``selector`` keeping
    ``ceil(retention * T'*N)`` tokens per video (``selector=None``: all tokens)."""
    hits, opt_hits, per_type = [], [], {}
    for i, v in enumerate(videos):
        t, n = v.X.shape[:2]
        if selector is None:
            keep = torch.arange(t * n)
        else:
            grid = (t, *adapter.visual_grid(t)[1:])  # (gh, gw) do not depend on the frame count
            ctx = SelectionContext(grid=grid, frame_hw=v.frame_hw, objects=v.objects,
                                   question_objects=v.qa.get("objects"), seed=seed * 100_003 + i)
            keep = selector(v.X, budget(retention, t * n), ctx)
        prompt = qa_prompt(v.qa["question"])
        ok = answer_word(adapter.generate(v.X, keep, prompt, max_new_tokens=2)) == v.qa["answer"]
        options = v.qa.get("options") or [v.qa["answer"]]
        lp = adapter.option_logprobs(v.X, keep, prompt, options)
        opt_ok = options[int(torch.argmax(lp))] == v.qa["answer"]
        hits.append(ok)
        opt_hits.append(opt_ok)
        per_type.setdefault(v.qa.get("type", "qa"), []).append(ok)
    return {
        "accuracy": float(np.mean(hits)) if hits else 0.0,
        "option_accuracy": float(np.mean(opt_hits)) if opt_hits else 0.0,
        "per_type": {k: round(float(np.mean(x)), 4) for k, x in sorted(per_type.items())},
        "n": len(hits),
    }

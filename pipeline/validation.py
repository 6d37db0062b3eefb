"""Choosing the run's final policy on validation videos (model selection, not evaluation).

RL against a frozen MLLM can end worse than it was mid-run (a Ray run of the demo config once saw its
stage-2 safe fraction fall from 0.82 to 0.69 and end 20 points below its twin; EXPERIMENTS.md). So the final policy is chosen, not assumed: the candidates are a stage's kept
checkpoints (``checkpoint.keep_every``), each scored by greedy QA accuracy at top-K on the
validation split. The evaluation never reads that split, so the figures it reports stay unbiased.

Picking the best of a dozen checkpoints on validation also picks up its noise: late checkpoints
differ by 2-4 videos in 1,000, and a trunk-less Ray run chose one that scored 0.896 at 10% on the
test set where its neighbours scored up to 0.909 (EXPERIMENTS.md). With
``validation.average_last = k`` the final policy is instead the weight average of the stage's last
``k`` checkpoints on the ``keep_every`` grid (checkpoint averaging, as Vaswani et al. 2017 averaged
their last checkpoints): no choice, so no selection noise; validation scores it for the record.
``jobs/select_policy.py`` fans the candidates out over Ray actors; this module is the math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from pipeline import storage
from pipeline.config import S3Config


@dataclass(frozen=True)
class Candidate:
    step: int  # 0-based learner step of the checkpoint
    checkpoint: str  # the checkpoint directory (its policy/ in save_pretrained layout), local or s3://
    averaged: tuple[int, ...] = ()  # a weight average: the steps it averages (``step`` is the last)


def stage_candidates(stage_dir: str, s3: S3Config | None = None) -> list[Candidate]:
    """Every committed checkpoint of a stage, oldest first, as a :class:`Candidate`; raises
    ``FileNotFoundError`` when the stage has none (it always saves at its end)."""
    from pipeline.checkpoint import list_committed

    root = storage.join(stage_dir, "checkpoints")
    out = [Candidate(step, path) for step, path in list_committed(root, s3)]
    if not out:
        raise FileNotFoundError(f"no committed checkpoints under {root}: nothing to choose from")
    return out


def score_policy(adapter: Any, policy: Any, videos: Sequence[Any], retentions: Sequence[float]) -> dict[str, float]:
    """``{"<r>": accuracy at retention r, ..., "score": their mean}``: greedy QA accuracy with the
    policy's global top-K (:func:`pipeline.select.make_score_selector`) on ``videos``
    (:class:`~pipeline.evaluation.EvalVideo`, encoded once by the caller)."""
    from pipeline.evaluation import evaluate_qa
    from pipeline.select import make_score_selector

    if not videos:
        raise ValueError("no validation videos")
    select = make_score_selector(policy)
    acc = {f"{r:g}": evaluate_qa(adapter, videos, select, float(r), options=False)["accuracy"] for r in retentions}
    return acc | {"score": float(np.mean(list(acc.values())))}


def choose(scored: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the highest ``score``; a tie goes to the later ``step`` (more training
    for the same validation accuracy). ``scored``: dicts with ``step`` and ``score``."""
    if not scored:
        raise ValueError("no scored candidates to choose from")
    return max(scored, key=lambda c: (c["score"], c["step"]))


def describe(scored: Mapping[str, Any]) -> str:
    """A scored candidate (or ``selection.json``'s entry) in log lines, steps 1-based: ``"step 800"``
    or ``"the average of steps 800, 900"``."""
    if scored.get("averaged"):
        return f"the average of steps {', '.join(str(s + 1) for s in scored['averaged'])}"
    return f"step {scored['step'] + 1}"


def averaging_window(cands: Sequence[Candidate], k: int, every: int) -> list[Candidate]:
    """The checkpoints :func:`average_state_dicts` averages, oldest first: the stage's last
    checkpoint and the ``k - 1`` before it at multiples of ``every`` steps (``every=0``: simply
    the ``k - 1`` before it). Fewer when the stage kept fewer; the caller says so."""
    if k < 1:
        raise ValueError(f"average over k >= 1 checkpoints, got {k}")
    if not cands:
        raise ValueError("no candidates to average")
    *earlier, last = sorted(cands, key=lambda c: c.step)
    if every > 0:
        earlier = [c for c in earlier if (c.step + 1) % every == 0]
    return earlier[max(0, len(earlier) - (k - 1)):] + [last]


def average_state_dicts(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of ``n >= 1`` state dicts with the same keys and shapes; floating tensors
    are averaged in float64 and cast back to their dtype, others must be equal in all. Raises
    ``ValueError`` on a key, shape or dtype mismatch or a non-finite mean."""
    if not states:
        raise ValueError("no state dicts to average")
    keys = list(states[0])
    out: dict[str, torch.Tensor] = {}
    for i, sd in enumerate(states[1:], 1):
        if list(sd) != keys:
            raise ValueError(f"state dict {i} has keys {sorted(set(sd) ^ set(keys))[:4]} the first does not (or the reverse)")
    for key in keys:
        ts = [sd[key] for sd in states]
        if any(t.shape != ts[0].shape or t.dtype != ts[0].dtype for t in ts):
            raise ValueError(f"{key}: shapes/dtypes differ across checkpoints: {sorted({(tuple(t.shape), str(t.dtype)) for t in ts})}")
        if ts[0].is_floating_point():
            mean = torch.stack([t.detach().to(torch.float64) for t in ts]).mean(0)
            if not bool(torch.isfinite(mean).all()):
                raise ValueError(f"{key}: the average is not finite (a checkpoint holds NaN/inf)")
            out[key] = mean.to(ts[0].dtype)
        elif all(torch.equal(t, ts[0]) for t in ts):
            out[key] = ts[0].clone()
        else:
            raise ValueError(f"{key}: a non-float tensor differs across checkpoints; it cannot be averaged")
    return out

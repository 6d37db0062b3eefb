"""Choosing the run's final policy on validation videos (model selection, not evaluation).

RL against a frozen MLLM can end worse than it was mid-run: one Ray run of the demo config saw its
stage-2 safe fraction fall from 0.82 to 0.69 and ended 20 points below its twin (EXPERIMENTS.md,
session 6). So the final policy is chosen, not assumed: the candidates are a stage's kept
checkpoints (``checkpoint.keep_every``), each scored by greedy QA accuracy at top-K on the
validation split. The evaluation never reads that split, so the figures it reports stay unbiased.
``jobs/select_policy.py`` fans the candidates out over Ray actors; this module is the math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline import storage
from pipeline.config import S3Config


@dataclass(frozen=True)
class Candidate:
    step: int  # 0-based learner step of the checkpoint
    checkpoint: str  # the checkpoint directory (its policy/ in save_pretrained layout), local or s3://


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

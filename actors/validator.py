"""Validator actors: frozen-MLLM replicas that score candidate policies on the validation videos.

Each actor loads the MLLM once (``load_mllm(cfg.mllm)``, the resources of a rollout replica:
``rollout.num_cpus`` / ``rollout.num_gpus``), decodes and encodes the first ``validation.videos``
videos of ``validation.video_shards`` once, then scores whatever candidates it is handed
(:func:`pipeline.validation.score_policy`). :func:`score_candidates` spreads the candidates over
up to ``rollout.max_actors`` of them with :class:`ray.util.ActorPool`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import ray

from pipeline.config import Config
from pipeline.validation import Candidate


@ray.remote
class Validator:
    def __init__(self, cfg: Config):
        from pipeline.data.video import FrameSampling
        from pipeline.evaluation import load_eval_videos
        from pipeline.mllm.loader import load_mllm

        self.cfg = cfg
        self.adapter = load_mllm(cfg.mllm, s3=cfg.data.s3)
        v, d = cfg.validation, cfg.data
        # the training stream's frame sampling (fps: each video its own length, scored on its own)
        sampling = FrameSampling.from_config(d, self.adapter._frames_for(1))
        self.videos = load_eval_videos(self.adapter, v.video_shards, v.videos, sampling, d.frame_size,
                                       d.max_caption_words, d.s3)

    def num_videos(self) -> int:
        return len(self.videos)

    def full_accuracy(self) -> float:
        """Greedy QA accuracy with every token: the reference the candidates' scores read against."""
        from pipeline.evaluation import evaluate_qa

        return evaluate_qa(self.adapter, self.videos, None, 1.0, options=False)["accuracy"]

    def score(self, cand: Candidate) -> dict[str, Any]:
        """``{step, checkpoint, "<r>": accuracy, ..., score, videos, seconds}`` of one candidate."""
        from pipeline.checkpoint import load_policy
        from pipeline.validation import score_policy

        t0 = time.perf_counter()
        policy = load_policy(cand.checkpoint, self.cfg.data.s3)
        out = score_policy(self.adapter, policy, self.videos, self.cfg.validation.retentions)
        return {"step": cand.step, "checkpoint": cand.checkpoint, **({"averaged": list(cand.averaged)} if cand.averaged else {}),
                **out, "videos": len(self.videos), "seconds": round(time.perf_counter() - t0, 3)}


def score_candidates(cfg: Config, cands: Sequence[Candidate],
                     on_result: Callable[[dict[str, Any]], Any] | None = None) -> tuple[list[dict[str, Any]], float]:
    """Score every candidate on a pool of :class:`Validator` actors: ``(results in step order (an
    average after the single checkpoint of its last step), full-token accuracy on the same videos)``."""
    from ray.util import ActorPool

    n = max(1, min(len(cands), cfg.rollout.max_actors))
    actors = [Validator.options(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus).remote(cfg)
              for _ in range(n)]
    try:
        if min(ray.get([a.num_videos.remote() for a in actors], timeout=cfg.run.job_timeout_s)) == 0:
            raise ValueError(f"no annotated videos under validation.video_shards={cfg.validation.video_shards!r}")
        full = actors[-1].full_accuracy.remote()  # queued behind that actor's first candidate
        results = []
        for r in ActorPool(actors).map_unordered(lambda a, c: a.score.remote(c), list(cands)):
            results.append(r)
            if on_result:
                on_result(r)
        return sorted(results, key=lambda r: (r["step"], "averaged" in r)), float(ray.get(full, timeout=cfg.run.job_timeout_s))
    finally:
        for a in actors:
            ray.kill(a)

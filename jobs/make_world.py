"""Generate the shapes world: image-caption parquet shards and mp4 video shards with QA.

    python jobs/make_world.py --out runs/world --images 256 --videos 128 --seed 0 \
        [--size 64] [--frames 16 | 8-16] [--objects 1-3] [--grid 4] [--background texture,plain] \
        [--motion static,linear,appear] [--pan 0-0.1] [--noise 0-0.02] [--format native|llava|webdataset]

Same seed and knobs, same bytes. The world's config is written to ``<out>/world.json``.
``--format`` writes ``images/`` and ``videos/`` as LLaVA JSON arrays + a YAML mixture
(point data.*_shards at ``images/mixture.yaml`` / ``videos/mixture.yaml``) or WebDataset tar
shards (pipeline/data/world_formats.py); the held-out and validation videos stay native.
"""

from __future__ import annotations

import argparse
import json
import time

import _bootstrap  # noqa: F401

from pipeline.config import ConfigError, add_config_args, load_config
from pipeline.data.world import generate_world
from pipeline.data.world_formats import WORLD_FORMATS


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--images", type=int)
    ap.add_argument("--videos", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--heldout-videos", dest="heldout_videos", type=int, help="evaluation videos (eval split)")
    ap.add_argument("--val-videos", dest="val_videos", type=int, help="validation videos (val split, for choosing the final policy)")
    ap.add_argument("--frames", help="frames per video, or MIN-MAX: videos of different durations, e.g. 8-16")
    ap.add_argument("--objects", help="MIN-MAX objects per scene, e.g. 1-3")
    ap.add_argument("--grid", type=int, help="cells per side that objects sit in (the MLLM's token grid)")
    ap.add_argument("--background", help="plain | gradient | texture | photo, or a comma list drawn per sample")
    ap.add_argument("--motion", help="comma list of: static,linear,bounce,appear,disappear,color_change")
    ap.add_argument("--pan", help="camera pan (fraction of the frame), or LO-HI drawn per video, e.g. 0-0.15")
    ap.add_argument("--noise", help="pixel noise std (0..1 scale), or LO-HI drawn per sample, e.g. 0-0.03")
    ap.add_argument("--format", default="native", choices=WORLD_FORMATS, help="layout of images/ and videos/ (docs/data.md)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    overrides = list(args.overrides)
    for key in ("images", "videos", "heldout_videos", "val_videos", "seed", "size", "grid"):
        if getattr(args, key) is not None:
            overrides.append(f"world.{key}={getattr(args, key)}")
    if args.background:
        overrides.append(f"world.background=[{args.background}]" if "," in args.background else f"world.background={args.background}")
    for key in ("pan", "noise"):
        lo, sep, hi = (getattr(args, key) or "").partition("-")
        if lo:
            overrides.append(f"world.{key}=[{lo}, {hi}]" if sep else f"world.{key}={lo}")
    if args.motion:
        overrides.append(f"world.motion=[{args.motion}]")
    if args.objects:
        lo, _, hi = args.objects.partition("-")
        overrides += [f"world.min_objects={lo}", f"world.max_objects={hi or lo}"]
    if args.frames:
        lo, _, hi = args.frames.partition("-")
        overrides += [f"world.frames={lo}"] + ([f"world.frames_max={hi}"] if hi else [])
    try:
        cfg = load_config(args.config, overrides).world
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None

    t0 = time.perf_counter()
    summary = generate_world(cfg, args.out, progress=not args.quiet, fmt=args.format)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["out"] = args.out
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

"""Build score-tiny, the embedded frozen MLLM: pre-train a tiny LLaVA-OneVision on the shapes world.

    python jobs/build_reference_mllm.py --world runs/world --out .cache/score-tiny [--set reference.steps=3000]

The world's knobs come from ``<world>/world.json`` (training draws fresh samples from the same
generator, never the held-out shards); held-out accuracy is measured on ``<world>/heldout/videos``.
With ``reference.select_videos`` the saved weights are the best of the checkpoints every
``reference.eval_every`` steps on that many ``<world>/val/videos``.
Cached by config hash: a second run with the same spec only re-reads the result. Ends with a
calibration table (random / uniform / oracle selection at 25/10/5% retention) and a JSON line
``{"qa_accuracy", "option_accuracy", "build_seconds", "calibration", ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401

from pipeline.baselines import SELECTORS
from pipeline.data.world import VAL, heldout_videos
from pipeline.config import ConfigError, WorldConfig, add_config_args, load_config
from pipeline.data.video import FrameSampling
from pipeline.evaluation import evaluate_qa, load_eval_videos, reencode
from pipeline.mllm.reference import cached_build, pretrain

RETENTIONS = (0.25, 0.10, 0.05)
CALIBRATION = ("random", "uniform", "oracle")  # issue 3: blind selectors vs the question's own tokens


def calibration(adapter, videos, seed: int = 0) -> dict:
    """Accuracy of random / uniform / oracle selection at each retention (same videos, same K)."""
    table = {}
    for r in RETENTIONS:
        table[str(r)] = {n: evaluate_qa(adapter, videos, SELECTORS[n], r, seed=seed)["accuracy"] for n in CALIBRATION}
    return table


def format_table(full: float, table: dict) -> str:
    names = list(CALIBRATION)
    lines = ["| retention | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines.append(f"| 100% (full: {full:.3f}) | " + " | ".join(f"{full:.3f}" for _ in names) + " |")
    for r, row in table.items():
        lines.append(f"| {float(r):.0%} | " + " | ".join(f"{row[n]:.3f} ({row[n] - full:+.3f})" for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--world", required=True, help="world directory written by jobs/make_world.py")
    ap.add_argument("--out", required=True, help="output model directory (save_pretrained layout)")
    ap.add_argument("--force", action="store_true", help="rebuild even if a cached build matches")
    ap.add_argument("--no-calibration", action="store_true")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        world_json = Path(args.world) / "world.json"
        if not world_json.is_file():
            raise ConfigError(f"--world {args.world}: no world.json (generate it with jobs/make_world.py)")
        wcfg = WorldConfig.model_validate_json(world_json.read_text())
        heldout_videos(args.world)
        if cfg.reference.select_videos and not (Path(args.world) / VAL).is_dir():
            raise ConfigError(f"reference.select_videos: {args.world} has no validation videos ({VAL}/): "
                              f"regenerate it with python jobs/make_world.py --out {args.world}")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    rcfg = cfg.reference

    from pipeline.mllm.loader import load_mllm
    from pipeline.config import MLLMConfig

    def held_out(adapter, root=None, limit=None, keep_frames=0):
        # a world of several durations: each video at its own length (the oracle reads every frame's boxes)
        sampling = wcfg.frames if wcfg.frames_max is None else \
            FrameSampling.at_fps(wcfg.fps, adapter._frames_for(1))
        return load_eval_videos(adapter, str(root or heldout_videos(args.world)), limit or rcfg.eval_videos, sampling, wcfg.size,
                                keep_frames=keep_frames)

    t0 = time.perf_counter()
    summary = None if args.force else cached_build(args.out, rcfg, wcfg)
    cached = summary is not None
    if not cached:
        cache: dict = {}

        def probe_videos(adapter, root, limit):
            """Decoded once; encoded at every probe by the vision tower as it is then (it trains too)."""
            cache[root] = reencode(adapter, cache[root]) if root in cache else \
                held_out(adapter, root, limit, keep_frames=limit)
            return cache[root]

        def evaluate(adapter):
            return evaluate_qa(adapter, probe_videos(adapter, heldout_videos(args.world), rcfg.eval_videos))

        def select(adapter):
            return evaluate_qa(adapter, probe_videos(adapter, Path(args.world) / VAL, rcfg.select_videos))

        summary = pretrain(rcfg, wcfg, args.out, evaluate=evaluate, select=select if rcfg.select_videos else None)
    build_seconds = round(time.perf_counter() - t0, 1) if not cached else summary["train_seconds"]
    # Measured on the saved model as it loads from disk (the same path every user takes).
    adapter = load_mllm(MLLMConfig(path=args.out, dtype="float32"))
    videos = held_out(adapter)
    full = evaluate_qa(adapter, videos)
    result = {
        "qa_accuracy": full["accuracy"], "option_accuracy": full["option_accuracy"],
        "per_type": full["per_type"], "eval_videos": full["n"],
        "build_seconds": build_seconds, "cached": cached, "out": args.out,
        "selected_step": summary.get("selected_step", rcfg.steps),
    }
    if not args.no_calibration:
        table = calibration(adapter, videos, seed=rcfg.seed)
        print(format_table(result["qa_accuracy"], table))
        result["calibration"] = table
    print(json.dumps(result))
    if result["qa_accuracy"] < rcfg.min_qa_accuracy:
        print(f"error: held-out QA accuracy {result['qa_accuracy']:.3f} < reference.min_qa_accuracy "
              f"{rcfg.min_qa_accuracy}", file=sys.stderr)
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()

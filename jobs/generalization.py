"""The generalization protocol: both SCORE variants and every baseline on the training world's own
held-out videos AND on shifted worlds it never saw, in one table.

    python jobs/generalization.py --config configs/generalization.yaml --mllm .cache/score-tiny-random \
        --world runs/world-random --compressor runs/gen-agnostic/final/policy \
        --compressor-qa runs/gen-aware/final/policy --out runs/generalization [--videos 1000] \
        [--retention 0.05,0.1] [--methods ...] [--fps 8]

Worlds: ``in-distribution`` (``--world``'s ``heldout/videos``, the config's world) and every
``evaluation.shifts`` entry: the config's world with those settings over it, its held-out videos
generated under ``<out>/worlds/<name>`` (reused when its ``world.json`` matches). Methods: ``score``
(``--compressor``, question-agnostic), ``score_qa`` (``--compressor-qa``, question-aware), the
baselines and two oracles (``oracle``: the question's objects; ``oracle_objects``: every object,
the reference for a question-agnostic selection), each at every retention on the same videos and
the same K. Writes
``<out>/results.json`` (every world's full evaluation), ``<out>/results.md`` (one table: method x
world x retention, accuracy and % of full; then the share of each method's kept tokens on the
question's objects, and each method's cost) and per-world plots; prints
the table and, per world and retention, whether the better SCORE variant is ahead of every
baseline. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401

from pipeline.config import ConfigError, WorldConfig, add_config_args, load_config
from pipeline.evaluation import BASELINE_ORDER, ORACLES, parse_retentions

IN_DISTRIBUTION = "in-distribution"
VARIANTS = ("score", "score_qa")


def shifted_world(base: WorldConfig, shift: dict, videos: int) -> WorldConfig:
    """The protocol's shifted world: ``shift`` over ``base``, held-out videos only."""
    return WorldConfig.model_validate({**base.model_dump(), **shift, "images": 0, "videos": 0,
                                       "heldout_videos": videos, "val_videos": 0})


def outside_ranges(base: WorldConfig, shifted: WorldConfig) -> list[str]:
    """The knobs of ``shifted`` that leave ``base``'s training ranges (what the shift tests)."""
    def span(v):
        return (min(v), max(v)) if isinstance(v, (tuple, list)) and v and not isinstance(v[0], str) else (v, v)

    out = []
    for key in ("noise", "pan"):
        (lo, hi), (slo, shi) = span(getattr(base, key)), span(getattr(shifted, key))
        if slo < lo or shi > hi:
            out.append(key)
    if shifted.min_objects < base.min_objects or shifted.max_objects > base.max_objects:
        out.append("objects")
    bf, sf = (base.frames, base.frames_max or base.frames), (shifted.frames, shifted.frames_max or shifted.frames)
    if sf[0] < bf[0] or sf[1] > bf[1]:
        out.append("frames")
    kinds = set([base.background] if isinstance(base.background, str) else base.background)
    if set([shifted.background] if isinstance(shifted.background, str) else shifted.background) - kinds:
        out.append("background")
    if set(shifted.motion) - set(base.motion):
        out.append("motion")
    for key in ("size", "grid", "object_size", "jitter"):
        if getattr(shifted, key) != getattr(base, key):
            out.append(key)
    return out


def _world_table(results: dict[str, dict], retentions: list[float], cell, first: list[str] = ()) -> str:
    """A markdown table with a row per method and a column per world x retention; ``cell(row)``
    formats one method's row at one world and retention (None where it did not run)."""
    worlds = list(results)
    lines = ["| method | " + " | ".join(f"{w} {r:.0%}" for w in worlds for r in retentions) + " |",
             "|---|" + "---|" * (len(worlds) * len(retentions)), *first]
    for m in dict.fromkeys(row["method"] for w in worlds for row in results[w]["rows"]):
        rows = [next((x for x in results[w]["rows"] if x["method"] == m and x["retention"] == r), None)
                for w in worlds for r in retentions]
        lines.append(f"| {m} | " + " | ".join(cell(row) for row in rows) + " |")
    return "\n".join(lines)


def protocol_table(results: dict[str, dict], retentions: list[float]) -> str:
    """One markdown table: a row per method, a column per world x retention (accuracy, % of full)."""
    def cell(row: dict | None) -> str:
        pct = "" if row is None or row["pct_of_full"] is None else f" ({row['pct_of_full']:.1f}%)"
        return "-" if row is None else f"{row['accuracy']:.3f}{pct}"

    full = "| full tokens | " + " | ".join(f"{results[w]['full']['accuracy']:.3f}" for w in results for _ in retentions) + " |"
    return _world_table(results, retentions, cell, [full])


def asked_table(results: dict[str, dict], retentions: list[float]) -> str:
    """Per method, world and retention: the share of the kept tokens on the question's objects
    (videos where the question leaves some object out). Whether a selection reads the question:
    a question-agnostic one can only find the objects, the question oracle keeps the asked ones."""
    return _world_table(results, retentions,
                        lambda row: "-" if row is None or row.get("asked_share") is None else f"{row['asked_share']:.3f}")


def cost_table(results: dict[str, dict]) -> str:
    """Each SCORE variant's (and FastV's) own selection cost, in-distribution, per retention."""
    res = next(iter(results.values()))
    lines = ["| method | retention | select FLOPs % of full prefill | select time % of full prefill | prefill speedup |",
             "|---|---|---|---|---|"]
    for row in res["rows"]:
        if row["method"] in (*VARIANTS, "fastv"):
            fl = "-" if row["select_flops_pct"] is None else f"{row['select_flops_pct']:.2f}%"
            lines.append(f"| {row['method']} | {row['retention']:.0%} | {fl} | {row['select_pct_of_full_prefill_time']:.1f}% "
                         f"| x{row['speedup']} |")
    return "\n".join(lines)


def verdicts(results: dict[str, dict], retentions: list[float]) -> dict[str, dict[str, dict]]:
    """Per world and retention: the better SCORE variant, its % of full, the best baseline, and
    whether the variant is ahead of every baseline."""
    out: dict[str, dict[str, dict]] = {}
    for w, res in results.items():
        out[w] = {}
        for r in retentions:
            rows = {x["method"]: x for x in res["rows"] if x["retention"] == r}
            ours = [m for m in VARIANTS if m in rows]
            base = [m for m in rows if m not in (*VARIANTS, *ORACLES)]
            if not ours or not base:
                continue
            best = max(ours, key=lambda m: rows[m]["accuracy"])
            rival = max(base, key=lambda m: rows[m]["accuracy"])
            out[w][str(r)] = {"score": best, "accuracy": rows[best]["accuracy"], "pct_of_full": rows[best]["pct_of_full"],
                              "best_baseline": rival, "baseline_accuracy": rows[rival]["accuracy"],
                              "ahead": rows[best]["accuracy"] > rows[rival]["accuracy"]}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--mllm", required=True, help="frozen MLLM directory (save_pretrained layout, or s3://)")
    ap.add_argument("--world", required=True, help="the training world's directory (its heldout/videos: in-distribution)")
    ap.add_argument("--compressor", default=None, help="question-agnostic SCORE policy (method score)")
    ap.add_argument("--compressor-qa", default=None, help="question-aware SCORE policy (method score_qa)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--videos", type=int, default=None, help="held-out videos per world (default: evaluation.videos)")
    ap.add_argument("--retention", default=None, help="comma-separated ratios (default: evaluation.retentions)")
    ap.add_argument("--methods", default=None, help=f"baselines to run (default: all of {','.join((*BASELINE_ORDER, *ORACLES))})")
    ap.add_argument("--fps", type=float, default=None, help="sample each video at this rate (videos of different lengths)")
    ap.add_argument("--options", action="store_true", help="also score option-likelihood accuracy (twice the time)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        E = cfg.evaluation
        videos = args.videos or E.videos
        retentions = parse_retentions(args.retention) if args.retention else sorted(E.retentions)
        world = Path(args.world)
        if not (world / "world.json").is_file():
            raise ConfigError(f"--world {args.world}: no world.json (generate it with jobs/make_world.py)")
        base = WorldConfig.model_validate_json((world / "world.json").read_text())
        if not E.shifts:
            raise ConfigError("evaluation.shifts is empty: name at least one shifted world in the config")
        if not (args.compressor or args.compressor_qa):
            raise ConfigError("give --compressor and/or --compressor-qa")
        baselines = [*BASELINE_ORDER, *ORACLES] if not args.methods else [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in baselines if m not in (*BASELINE_ORDER, *ORACLES)]
        if bad:
            raise ConfigError(f"--methods: unknown {bad}; known: {[*BASELINE_ORDER, *ORACLES]}")
        shifts = {name: shifted_world(base, s, videos) for name, s in E.shifts.items()}
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

    from pipeline.data.video import FrameSampling
    from pipeline.data.world import generate_world, heldout_videos
    from pipeline.evaluation import load_eval_videos, method_selectors, run_evaluation
    from pipeline.mllm.loader import load_mllm
    from pipeline.plots import plot_accuracy_vs_retention
    from pipeline.policy import ScorePolicy
    from pipeline.select import make_score_selector

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = load_mllm(cfg.mllm.model_copy(update={"path": args.mllm}))
    selectors = {}
    for name, path in (("score", args.compressor), ("score_qa", args.compressor_qa)):
        if path:
            pol = ScorePolicy.from_pretrained(path, map_location=adapter.device, s3=cfg.data.s3).eval()
            if pol.embed_dim != adapter.hidden_size:
                raise SystemExit(f"error: {path} reads {pol.embed_dim}-wide tokens, the MLLM's width is {adapter.hidden_size}")
            selectors[name] = make_score_selector(pol, min_per_frame=pol.cfg.min_per_frame)
    selectors |= method_selectors(adapter, None, baselines, fastv_layer=E.fastv_layer)

    worlds = {IN_DISTRIBUTION: heldout_videos(world)}
    for name, wcfg in shifts.items():
        wdir = out / "worlds" / name
        meta = wdir / "world.json"
        if not (meta.is_file() and WorldConfig.model_validate_json(meta.read_text()) == wcfg):
            print(f"[generalization] generating {name}: {videos} videos, outside the training ranges in "
                  f"{outside_ranges(base, wcfg) or 'nothing (not a shift!)'}", flush=True)
            generate_world(wcfg, wdir, progress=False)
        worlds[name] = heldout_videos(wdir)

    sampling = base.frames
    if args.fps is not None:
        sampling = FrameSampling.at_fps(args.fps, adapter._frames_for(1))
    results = {}
    for name, root in worlds.items():
        t0 = time.perf_counter()
        vids = load_eval_videos(adapter, str(root), videos, sampling, base.size)
        print(f"[generalization] {name}: {len(vids)} videos, {len(selectors)} methods x {len(retentions)} retentions", flush=True)
        res = run_evaluation(adapter, vids, selectors, retentions, seed=E.seed, timing_videos=E.timing_videos,
                             timing_repeats=E.timing_repeats, options=args.options,
                             log=lambda m, n=name: print(f"[generalization] {n}: {m.strip()}", flush=True))
        res["setup"]["world_dir"] = str(root)
        res["setup"]["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        plot_accuracy_vs_retention(res, out / f"accuracy_{name}.png", title=f"{name} ({len(vids)} videos)")

    table, costs, asked = protocol_table(results, retentions), cost_table(results), asked_table(results, retentions)
    verdict = verdicts(results, retentions)
    command = " ".join(["python", "jobs/generalization.py", *(argv if argv is not None else sys.argv[1:])])
    (out / "results.json").write_text(json.dumps({"command": command, "worlds": results, "verdicts": verdict,
                                                  "shifts": {n: {"settings": E.shifts[n], "outside": outside_ranges(base, w)}
                                                             for n, w in shifts.items()}}, indent=2) + "\n")
    (out / "results.md").write_text(f"# Generalization\n\n`{command}`\n\n{table}\n\n"
                                    f"Share of the kept tokens on the question's objects (videos where the question "
                                    f"leaves some object out):\n\n{asked}\n\nCost (in-distribution):\n\n{costs}\n")
    print(table, flush=True)
    print(asked, flush=True)
    print(costs, flush=True)
    for w, per in verdict.items():
        for r, v in per.items():
            print(f"[generalization] {w} {float(r):.0%}: {v['score']} {v['accuracy']:.3f} ({v['pct_of_full']}% of full) vs "
                  f"{v['best_baseline']} {v['baseline_accuracy']:.3f}: {'ahead' if v['ahead'] else 'NOT ahead'}", flush=True)
    summary = {"out": str(out), "videos": {w: r["setup"]["videos"] for w, r in results.items()},
               "full": {w: r["full"]["accuracy"] for w, r in results.items()}, "verdicts": verdict,
               "seconds": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()

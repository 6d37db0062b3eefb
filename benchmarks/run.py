"""Benchmark: prefill speedup, rollout scoring, data ingest and the Ray stage, side by side.

    python jobs/benchmark.py [--quick] [--out BENCHMARKS.md] [--sections prefill,scoring,...]
        [--lms qwen2-0.5b,qwen2-7b] [--families qwen3-vl-8b,internvl3.5-8b] [--layers auto|N]
        [--frames 32] [--tokens-per-frame 196] [--family-frames 32]

Everything is a ratio measured in one run on one machine (absolute times depend on the machine):

1. ``prefill``: pruned-prefill speedup at 100/50/25/10/5% retention for score-tiny (its own grid) and
   for LLaVA-OneVision-class models whose LM has the real shape of Qwen2-0.5B / Qwen2-7B (random
   weights, ``--frames`` x ``--tokens-per-frame`` visual tokens; fewer layers on a CPU, full depth on
   a GPU), next to the FLOPs-ratio limit; the compressor's own cost (policy forward + top-K) as % of
   the full-token prefill (measured, extrapolated to full depth, and in FLOPs). ``--families``: the
   same for Qwen3-VL-8B- and InternVL3.5-8B-shaped models built from their real ``transformers``
   classes through the project's adapters (``--family-frames`` video frames at each family's own
   token grid and template; Qwen3-VL's DeepStack features ride along and count in the FLOPs).
2. ``scoring``: masked sequences/s of ``adapter.score`` (the rollout's one padded batch with the
   ``CE_full`` row) against a bare language-model forward over the same padded batch, at several keep
   ratios, and of the padding-aware path (:func:`pipeline.trainer.score_packed`, with and without a
   ``CE_full`` cache); the whole rollout (encode + policy + masks + score), with and without the
   vision-feature cache.
3. ``actors``: the same rollout batches through 1 and 2 ``RolloutWorker`` Ray actors (throughput
   ratio), and per-actor throughput against the in-process rollout.
4. ``weight_sync``: PolicyStore publish and pull per policy version (policy sizes of score-tiny's
   demo policy and of the default policy on 0.5B/7B widths), and the state bytes a rollout record
   carries through the object store.
5. ``data``: clips/s of pseudo-video synthesis and of video decode, in-process and as Ray Data
   streams, against what one rollout actor consumes.
6. ``stage``: one short ``run_stage`` (Ray Data -> rollout actor pool -> DeepSpeed learner): share of
   learner step time spent waiting for rollouts, share of rollout-actor time idle, learner step time,
   weight sync per version, end-to-end rollouts/s and steps/s.
7. ``serving`` (not by default; alone, in the serving venv: ``.venv-serve/bin/python jobs/benchmark.py
   --sections serving --out BENCHMARKS-serving.md``): vLLM with every video token, with vLLM's EVS and
   with the SCORE compressor at the same retention: TTFT and requests/s at concurrency 1 and 8, the
   policy's share of TTFT (:mod:`benchmarks.serving`).

Prints progress and the tables; writes them (with the exact command and the machine) to ``--out``
(text after a ``<!-- benchmark:end -->`` line in an existing file is kept: hand-written analysis
survives a re-run); the last stdout line is one JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("prefill", "scoring", "actors", "weight_sync", "data", "stage")
#: runs alone, in the serving venv (.venv-serve: vLLM), never by default: benchmarks/serving.py
SERVING = "serving"
END_MARK = "<!-- benchmark:end -->"
STATS_ACTOR = "score-bench-stats"


def demo_policy():
    """configs/demo.yaml's policy for score-tiny (its only home), validated: a ``PolicyConfig``."""
    from pipeline.config import load_config

    return load_config(ROOT / "configs" / "demo.yaml").policy

INIT_KEEP = 1.0 / (1.0 + math.exp(-2.0))  # keep prob of a fresh policy (init_keep_logit = 2)


def say(msg: str) -> None:
    print(msg, flush=True)


class section_timer:
    """``with section_timer(res, name):`` records the section's wall seconds in ``res["section_seconds"]``."""

    def __init__(self, res: dict, name: str):
        self.res, self.name = res, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.res.setdefault("section_seconds", {})[self.name] = round(time.perf_counter() - self.t0, 1)
        return False


# =============================================================================================
# settings


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes of every section (``--quick``: what the test runs, well under 2 minutes on 2 cores)."""
    q = args.quick
    s = {
        "lms": names(args.lms, "qwen2-0.5b" if q else "qwen2-0.5b,qwen2-7b"),
        "families": names(args.families, "" if q else "qwen3-vl-8b,internvl3.5-8b"),  # quick: its own test
        "frames": args.frames or (8 if q else 32),
        "family_frames": args.family_frames or (2 if q else None),  # None: auto (family_frames)
        "tokens_per_frame": args.tokens_per_frame,
        "retentions": [float(r) for r in args.retentions.split(",")],
        "repeats": args.repeats or (1 if q else 3),
        "compile_policy": bool(args.compile_policy),
        "prefill_budget_s": 15.0 if q else 90.0,  # per model: rounds stop after this much timing
        "B": 4 if q else 8, "G": 4 if q else 8,
        "keep_ratios": [round(INIT_KEEP, 3), 0.25] if q else [round(INIT_KEEP, 3), 0.25, 0.1],
        "actor_batches": 2 if q else 8,
        "world_images": 32 if q else 128, "world_videos": 8 if q else 32,
        "stage_steps": args.stage_steps or (3 if q else 30), "stage_B": 2 if q else 4, "stage_G": 4,
        "ws_widths": [128, 896] if q else [128, 896, 3584],
    }
    return s


def names(arg: str | None, default: str) -> list[str]:
    """A comma list option: ``None`` (not given) -> ``default``; ``""`` -> none."""
    return [x for x in (default if arg is None else arg).split(",") if x]


def layers_for(shape, device: str, arg: str) -> int:
    """``--layers auto``: full depth on a GPU; on a CPU 2 layers (1 for a 7B-wide LM, whose layer
    alone takes ~35 s at 6.3k tokens on one core). Measured ratios do not depend on depth."""
    if arg != "auto":
        return max(1, min(int(arg), shape.layers))
    if device == "cuda":
        return shape.layers
    return 1 if shape.hidden >= 2048 else 2


FAMILY_FRAMES = 32  # the real-family rows' video length
CPU_VISUAL_TOKENS = 4096  # --family-frames auto on a CPU: a 1-layer 8B-wide prefill of ~4.2k tokens takes ~20 s


def family_frames(ad, device: str, arg: int | None) -> int:
    """``--family-frames``, or auto (``None``): 32 frames on a GPU; on a CPU 32 halved until the
    family's own grid gives at most ``CPU_VISUAL_TOKENS`` visual tokens (Qwen3-VL-8B: 32 frames =
    16 steps x 256; InternVL3.5-8B: 16 frames x 256, where 32 would take ~50 s per full prefill)."""
    if arg:
        return int(arg)
    n = FAMILY_FRAMES
    while device != "cuda" and n > 1 and math.prod(ad.visual_grid(n)) > CPU_VISUAL_TOKENS:
        n //= 2
    return n


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__, "python": platform.python_version(), "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


# =============================================================================================
# shared assets: score-tiny (random weights: timing depends on shapes only) and a small world


def score_tiny(device: str):
    """``(adapter, tokenizer)``: score-tiny's architecture (default ReferenceConfig/WorldConfig),
    random weights."""
    import torch

    from pipeline.config import ReferenceConfig, WorldConfig
    from pipeline.mllm import reference
    from pipeline.mllm.loader import adapter_for

    tok = reference.build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        model = reference.build_model(ReferenceConfig(), WorldConfig(), tok)
    return adapter_for(model.to(device).eval(), tok), tok


def world_samples(n: int, frames: int = 16) -> list[dict]:
    """``n`` stage-2 samples (16 frames of 64 px) generated in-process from the world's train split."""
    from pipeline.config import DataConfig, WorldConfig
    from pipeline.trainer import iter_world_videos

    it = iter_world_videos(WorldConfig(), DataConfig(video_frames=frames))
    return [next(it) for _ in range(n)]


def make_assets(work: Path, s: dict) -> dict[str, Any]:
    """``work/mllm`` (score-tiny, random weights, save_pretrained) and ``work/world`` (shards)."""
    from pipeline.config import WorldConfig
    from pipeline.data.world import generate_world

    out: dict[str, Any] = {"mllm": str(work / "mllm"), "world": str(work / "world")}
    if not (work / "mllm" / "config.json").is_file():
        ad, tok = score_tiny("cpu")
        ad.model.save_pretrained(work / "mllm")
        tok.save_pretrained(work / "mllm")
    if not (work / "world" / "world.json").is_file():
        wcfg = WorldConfig(images=s["world_images"], videos=s["world_videos"])
        t0 = time.perf_counter()
        generate_world(wcfg, work / "world", progress=False)
        out["world_seconds"] = time.perf_counter() - t0
    return out


def base_config(assets: dict, s: dict, work: Path, stage_steps: int | None = None):
    """A Config over the assets: score-tiny replica per actor, demo policy, small stages."""
    from pipeline.config import Config

    stage = {"steps": stage_steps or s["stage_steps"], "batch_size": s["stage_B"], "group_size": s["stage_G"],
             "lr": 1e-3}
    return Config.model_validate({
        "run": {"name": "bench", "storage": str(work / "runs"), "seed": 0, "call_timeout_s": 300},
        "data": {"image_shards": str(Path(assets["world"]) / "images"),
                 "video_shards": str(Path(assets["world"]) / "videos"), "batch_size": s["stage_B"]},
        "mllm": {"path": assets["mllm"]},
        "policy": demo_policy().model_dump(),
        "stage": {"pseudo_video": stage, "real_video": dict(stage, batch_size=s["B"], group_size=s["G"])},
        "rollout": {"min_actors": 1, "max_actors": 2, "num_cpus": 0.5, "max_staleness": 2},
        "learner": {"num_workers": 1, "cpus_per_worker": 0.5, "zero_stage": 1, "fit_timeout_s": 1200},
    })


# =============================================================================================
# 1. prefill


def bench_prefill(s: dict, device: str, layers_arg: str) -> dict[str, Any]:
    import torch

    from benchmarks.shapes import (FAMILY_SHAPES, LM_SHAPES, FamilyShape, build_family_mllm, build_shaped_mllm,
                                   interleaved_times, lm_dims_of, mllm_prefill_flops, prefill_rows)
    from pipeline.config import PolicyConfig
    from pipeline.data.prompts import qa_prompt
    from pipeline.evaluation import lm_dims
    from pipeline.metrics import sync as device_sync
    from pipeline.select import inference_forward, topk_keep
    from pipeline.trainer import init_policy

    prompt = qa_prompt("what color is the circle ?")
    out: dict[str, Any] = {}
    models: list[tuple[str, Callable[[], Any], Any, PolicyConfig]] = []
    models.append(("score-tiny", lambda: score_tiny(device)[0], None, demo_policy()))
    for name in s["lms"]:
        if name not in LM_SHAPES:
            raise SystemExit(f"error: --lms: unknown LM shape {name!r}; known: {sorted(LM_SHAPES)}")
        shape = LM_SHAPES[name]
        models.append((name, None, shape, PolicyConfig()))
    for name in s["families"]:
        if name not in FAMILY_SHAPES:
            raise SystemExit(f"error: --families: unknown MLLM shape {name!r}; known: {sorted(FAMILY_SHAPES)}")
        models.append((name, None, FAMILY_SHAPES[name], PolicyConfig()))
    from pipeline.mllm import reference

    tok = reference.build_tokenizer()
    for name, make, shape, pcfg in models:
        t0 = time.perf_counter()
        side, frames = None, None  # side features (Qwen3-VL's DeepStack); video frames where X has T' steps
        if shape is None:
            ad = make()
            X = ad.encode_video(world_samples(1)[0]["frames"])  # [16, 16, 128]: its own grid
            full_layers = layers = lm_dims(ad)["layers"]
        else:
            lm = shape.lm if isinstance(shape, FamilyShape) else shape
            layers = layers_for(lm, device, layers_arg)
            full_layers = lm.layers
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            g = torch.Generator().manual_seed(0)

            def rand(*size: int) -> torch.Tensor:  # stands in for the vision tower's output (not timed)
                return (torch.randn(*size, generator=g) * 0.5).to(device, dtype)

            if isinstance(shape, FamilyShape):  # the family's own grid, template and side features
                ad = build_family_mllm(shape, layers, device=device, dtype=dtype)
                frames = family_frames(ad, device, s["family_frames"])
                t_steps, gh, gw = ad.visual_grid(frames)
                X = rand(t_steps, gh * gw, lm.hidden)
                if getattr(ad, "deepstack_levels", 0):
                    side = {"deepstack": rand(t_steps, gh * gw, ad.deepstack_levels, lm.hidden)}
                say(f"[prefill] {name}: {shape.note}")
            else:
                ad = build_shaped_mllm(shape, layers, tok, s["tokens_per_frame"], device=device, dtype=dtype)
                X = rand(s["frames"], s["tokens_per_frame"], shape.hidden)
        T, N = int(X.shape[0]), int(X.shape[1])
        M = T * N
        levels = getattr(ad, "deepstack_levels", 0) if side else 0
        capped = bool(frames) and not s["family_frames"] and frames < FAMILY_FRAMES
        dims = {**lm_dims(ad), **({"deepstack_levels": levels} if levels else {})}
        L_full = int(ad._template(prompt, None, T, N).ids.numel())
        gh, gw = ad.visual_grid(T)[1:]
        policy = init_policy(ad.hidden_size, pcfg, 0).to(device).eval()
        with torch.no_grad():
            z = policy(X.float() if device == "cpu" else X.to(torch.float32), (gh, gw)).float()
        keeps = {r: (torch.arange(M) if r >= 1.0 else topk_keep(z.cpu(), retention=r)) for r in s["retentions"]}
        keeps.setdefault(1.0, torch.arange(M))

        @torch.no_grad()
        def compressor(forward=policy):
            return topk_keep(forward(X.float(), (gh, gw)), retention=0.1)

        say(f"[prefill] {name}: {layers}/{full_layers} layers, D={ad.hidden_size}, "
            f"{f'{frames} frames -> ' if frames else ''}{T}x{N}={M} visual tokens, L_full={L_full}"
            f"{f' ({FAMILY_FRAMES} frames capped to {frames} on a CPU, same grid per frame)' if capped else ''}"
            f"{f', DeepStack {levels} level(s)' if levels else ''} (built in {time.perf_counter() - t0:.1f}s)")
        # warm-up: the cheapest prefill and the compressor (a full-length warm-up would double the
        # cost of the 7B shape); then round-robin rounds over the retentions
        ad.prefill(X, keeps[min(keeps)], prompt, side=side)
        compressor()
        fns = {f"r{r}": (lambda kk=keeps[r]: ad.prefill(X, kk, prompt, side=side)) for r in sorted(keeps, reverse=True)}
        fns["compressor"] = compressor
        if s["compile_policy"] and shape is None:  # score-tiny: where per-op cost dominates the policy
            compiled = inference_forward(policy, compile=True)
            compressor(compiled)  # compiles (~25 s), outside the timed rounds
            fns["compressor_compiled"] = lambda: compressor(compiled)
        times = interleaved_times(fns, repeats=s["repeats"], warmup=0, budget_s=s["prefill_budget_s"],
                                  sync=lambda: device_sync(ad.device), clock=s["clock"])
        by_r = {r: times[f"r{r}"] for r in keeps}
        rows = prefill_rows(by_r, dims, L_full, M)
        t_full, t_comp = by_r[1.0], times["compressor"]
        full_dims = dims if shape is None else lm_dims_of(lm, deepstack_levels=getattr(shape, "deepstack_levels", 0))
        f_full = mllm_prefill_flops(full_dims, L_full, M)
        scale = full_layers / layers  # per-layer cost is uniform: time at full depth ~ t * scale
        t10 = by_r.get(0.1)
        res = {
            "layers": layers, "full_layers": full_layers, "hidden": ad.hidden_size, "frames": T,
            "tokens_per_frame": N, "visual_tokens": M, "full_length": L_full, "lm_params_measured": dims["params"],
            "lm_params_full_depth": full_dims["params"], "policy": pcfg.model_dump(include={"hidden", "layers", "factorized"}),
            "rows": rows, "full_prefill_ms": round(1e3 * t_full, 3), "compressor_ms": round(1e3 * t_comp, 3),
            "compressor_pct_measured": round(100 * t_comp / t_full, 3),
            "compressor_pct_full_depth": round(100 * t_comp / (t_full * scale), 3),
            "compressor_flops_pct": round(100 * policy.flops(T, N) / f_full, 3),
            "speedup_10pct_with_compressor_full_depth": (round(t_full * scale / (t10 * scale + t_comp), 3)
                                                         if t10 else None),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if frames:  # a family shape: its own grid from `frames` video frames, its DeepStack levels
            res.update(video_frames=frames, frames_capped=capped,
                       kind=shape.kind, deepstack_levels=levels,
                       deepstack_levels_full_depth=full_dims.get("deepstack_levels", 0), note=shape.note)
        if "compressor_compiled" in times:
            res["compressor_compiled_ms"] = round(1e3 * times["compressor_compiled"], 3)
            res["compressor_compiled_pct_measured"] = round(100 * times["compressor_compiled"] / t_full, 3)
        out[name] = res
        for r in rows:
            say(f"[prefill] {name} r={r['retention']:<5g} {r['prefill_ms']:10.1f} ms  x{r['speedup']:<7.2f} "
                f"(FLOPs limit x{r['flops_limit']:.2f}, efficiency {r['efficiency']:.2f})")
        say(f"[prefill] {name} compressor {1e3 * t_comp:.1f} ms = {res['compressor_pct_measured']:.2f}% of the "
            f"{layers}-layer prefill, ~{res['compressor_pct_full_depth']:.2f}% at full depth "
            f"({res['compressor_flops_pct']:.2f}% in FLOPs)")
        if "compressor_compiled_ms" in res:
            say(f"[prefill] {name} compressor through torch.compile {res['compressor_compiled_ms']:.2f} ms = "
                f"{res['compressor_compiled_pct_measured']:.2f}% of the prefill")
        del ad, policy, X, side
    return out


# =============================================================================================
# 2. scoring (in-process)


def bench_scoring(s: dict, device: str) -> dict[str, Any]:
    import torch

    from benchmarks.shapes import interleaved_times, padding_stats
    from pipeline.trainer import score_packed
    from pipeline.config import StageConfig
    from pipeline.metrics import sync as device_sync
    from pipeline.trainer import init_policy, rollout, select_target, step_generator

    ad, _ = score_tiny(device)
    B, G = s["B"], s["G"]
    samples = world_samples(B)
    X = torch.stack([ad.encode_video(x["frames"]) for x in samples])
    _, T, N, D = X.shape
    M = T * N
    pt = [select_target(x, 0) for x in samples]
    prompts, targets = [p for p, _ in pt], [t for _, t in pt]
    sync = lambda: device_sync(ad.device)  # noqa: E731

    def bare(batch):
        with torch.inference_mode():
            ad._lm(batch)

    rows = []
    gen = torch.Generator().manual_seed(0)
    for p in s["keep_ratios"]:
        masks = torch.rand(B, G, M, generator=gen) < p
        masks[..., 0] |= ~masks.any(-1)  # never empty
        keep = torch.cat([torch.ones(B, 1, M, dtype=torch.bool), masks], 1)
        batch = ad.masked_batch(X, keep, prompts, targets)
        ce_full, _, pst = score_packed(ad, X, masks, prompts, targets)
        masked_only = ad.masked_batch(X, masks, prompts, targets)
        fns = {
            "score": lambda: ad.score(X, keep, prompts, targets),
            "bare": lambda: bare(batch),
            "build": lambda: ad.masked_batch(X, keep, prompts, targets),
            "packed": lambda: score_packed(ad, X, masks, prompts, targets),
            "packed_cached": lambda: score_packed(ad, X, masks, prompts, targets, ce_full=ce_full),
            "bare_masked_only": lambda: bare(masked_only),
        }
        t = interleaved_times(fns, repeats=s["repeats"] + 2, warmup=1, sync=sync, clock=s["clock"])
        n = B * G
        row = {
            "keep_ratio": p, "rows": B * (G + 1), **{f"pad_{k}": v for k, v in padding_stats(batch.lengths).items()
                                                      if k in ("max_len", "waste")},
            "pad_waste_packed": round(1 - pst["real_visual_tokens"] / max(pst["padded_visual_tokens"], 1), 4),
            **{f"{k}_ms": round(1e3 * v, 2) for k, v in t.items()},
            "score_seq_s": round(n / t["score"], 1), "bare_seq_s": round(n / t["bare"], 1),
            "packed_seq_s": round(n / t["packed"], 1), "packed_cached_seq_s": round(n / t["packed_cached"], 1),
            "overhead_vs_bare": round(t["score"] / t["bare"] - 1, 4),
            "packed_cached_overhead_vs_its_bare": round(t["packed_cached"] / t["bare_masked_only"] - 1, 4),
            "speedup_packed": round(t["score"] / t["packed"], 3),
            "speedup_packed_cached": round(t["score"] / t["packed_cached"], 3),
        }
        rows.append(row)
        say(f"[scoring] keep {p:.2f}: score {row['score_ms']:.0f} ms ({row['score_seq_s']:.0f} seq/s) vs bare forward "
            f"{row['bare_ms']:.0f} ms -> overhead {100 * row['overhead_vs_bare']:+.1f}%; padding waste "
            f"{100 * row['pad_waste']:.0f}%; padding-aware x{row['speedup_packed']:.2f}, + CE_full cache "
            f"x{row['speedup_packed_cached']:.2f}")

    # whole rollout at the initial policy (keep ~0.88), with and without the vision-feature cache
    policy = init_policy(D, demo_policy(), 0).to(ad.device)
    scfg = StageConfig(batch_size=B, group_size=G)
    cache: dict = {}
    rb = rollout(ad, policy, samples, scfg, step_generator(0, 0), 0, cache=cache)
    keep = torch.cat([torch.ones(B, 1, M, dtype=torch.bool), rb.unpacked_masks()], 1)
    batch = ad.masked_batch(X, keep, prompts, targets)
    t = interleaved_times({
        "rollout": lambda: rollout(ad, policy, samples, scfg, step_generator(0, 0), 0),
        "rollout_cached_X": lambda: rollout(ad, policy, samples, scfg, step_generator(0, 0), 0, cache=cache),
        "encode": lambda: [ad.encode_video(x["frames"]) for x in samples],
        "bare": lambda: bare(batch),
    }, repeats=s["repeats"] + 2, warmup=1, sync=sync, clock=s["clock"])
    n = B * G
    roll = {
        "B": B, "G": G, "kept_ratio": round(float(1 - rb.rho.mean()), 3), **{f"{k}_ms": round(1e3 * v, 2) for k, v in t.items()},
        "rollout_seq_s": round(n / t["rollout"], 1), "bare_seq_s": round(n / t["bare"], 1),
        "overhead_vs_bare": round(t["rollout"] / t["bare"] - 1, 4),
        "overhead_vs_bare_cached_X": round(t["rollout_cached_X"] / t["bare"] - 1, 4),
        "samples_per_s": round(B / t["rollout"], 2),
    }
    say(f"[scoring] rollout (B={B}, G={G}, kept {roll['kept_ratio']:.2f}): {roll['rollout_ms']:.0f} ms "
        f"({roll['rollout_seq_s']:.0f} masked seq/s) vs bare forward {roll['bare_ms']:.0f} ms -> overhead "
        f"{100 * roll['overhead_vs_bare']:+.1f}% ({100 * roll['overhead_vs_bare_cached_X']:+.1f}% with X cached)")
    return {"model": "score-tiny", "frames": T, "tokens_per_frame": N, "B": B, "G": G, "rows": rows, "rollout": roll}


# =============================================================================================
# 3. actors (Ray)


def _rollout_batches(n: int, B: int) -> list[dict]:
    from actors.rollout import records_to_columns

    samples = world_samples(n * B)
    return [records_to_columns(samples[i * B:(i + 1) * B]) for i in range(n)]


def bench_actors(s: dict, cfg, in_process_seq_s: float | None) -> dict[str, Any]:
    import ray

    from actors.policy_store import create_store

    @ray.remote(num_cpus=cfg.rollout.num_cpus)
    class BenchRolloutActor:
        def __init__(self, cfg_dump: dict, store: str):
            from actors.rollout import RolloutWorker

            self.w = RolloutWorker(cfg_dump, "real_video", store, seed=0)

        def run(self, *batches: dict, cold: bool = True) -> tuple[int, float, float]:  # refs arrive resolved
            if cold:  # as on a sample's first epoch
                self.w.cache.clear()
            t0, c0 = time.perf_counter(), time.process_time()
            n = 0
            for b in batches:
                for out in self.w(b):
                    n += len(out["sample_id"])
            return n, time.perf_counter() - t0, time.process_time() - c0

    B, G, nb = s["B"], s["G"], s["actor_batches"]
    nb += nb % 2
    batches = [ray.put(b) for b in _rollout_batches(nb, B)]
    warm = ray.put(_rollout_batches(1, B)[0])
    store = create_store("score-bench-store")
    actors = []
    try:
        t0 = time.perf_counter()
        # no learner publishes here, so the staleness gate would hold every batch past the first
        # few until it fails open (2 x run.call_timeout_s): this section measures throughput only
        free = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"max_staleness": 10**6})})
        actors = [BenchRolloutActor.remote(free.model_dump(), "score-bench-store") for _ in range(2)]
        ray.get([a.run.remote(warm) for a in actors], timeout=600)  # model load + first batch
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n1, busy1, cpu1 = ray.get(actors[0].run.remote(*batches), timeout=1200)
        t1 = time.perf_counter() - t0
        # the same batches again (a second data epoch): X and CE_full come from the actor's LRU
        _, busy_warm, cpu_warm = ray.get(actors[0].run.remote(*batches, cold=False), timeout=1200)
        t0 = time.perf_counter()
        res = ray.get([actors[0].run.remote(*batches[: nb // 2]), actors[1].run.remote(*batches[nb // 2:])], timeout=1200)
        t2 = time.perf_counter() - t0
    finally:
        for a in actors:
            ray.kill(a)
        ray.kill(store)
    seqs = nb * B * G
    out = {
        "batches": nb, "B": B, "G": G, "startup_s": round(start_s, 2),
        "one_actor_seq_s": round(seqs / t1, 1), "two_actors_seq_s": round(seqs / t2, 1),
        "scaling_2_vs_1": round(t1 / t2, 3), "one_actor_busy_s": round(busy1, 2), "one_actor_cpu_s": round(cpu1, 2),
        "one_actor_seq_per_cpu_s_cached": round(n1 * G / cpu_warm, 1),
        "cache_gain_cpu": round(cpu1 / cpu_warm, 3), "cache_gain_wall": round(busy1 / busy_warm, 3),
        "per_actor_seq_s_in_ray": round(n1 * G / busy1, 1), "per_actor_seq_per_cpu_s": round(n1 * G / cpu1, 1),
        # like for like: the actor's CPU time against the in-process rollout's (CPU-clock) time
        "actor_overhead_vs_in_process": (round(in_process_seq_s / (n1 * G / cpu1) - 1, 4)
                                         if in_process_seq_s else None),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    ov = out["actor_overhead_vs_in_process"]
    ov_s = "-" if ov is None else f"{100 * ov:+.1f}%"
    say(f"[actors] 1 actor {out['one_actor_seq_s']:.0f} seq/s, 2 actors {out['two_actors_seq_s']:.0f} seq/s "
        f"(x{out['scaling_2_vs_1']:.2f}); actor vs in-process rollout {ov_s}; second epoch from the actor's "
        f"X/CE_full cache x{out['cache_gain_cpu']:.2f} (CPU time); start-up (model load + first batch) {start_s:.1f}s")
    return out


# =============================================================================================
# 4. weight sync + state bytes


def bench_weight_sync(s: dict, lm_widths: dict[str, int]) -> dict[str, Any]:
    import numpy as np
    import ray
    import torch

    from actors.policy_store import create_store, to_torch_state
    from pipeline.config import PolicyConfig
    from pipeline.trainer import init_policy

    store = create_store("score-bench-ws")
    rows = []
    version = 0
    try:
        for D in s["ws_widths"]:
            pcfg = demo_policy() if D == 128 else PolicyConfig()
            pol = init_policy(D, pcfg, 0)
            replica = init_policy(D, pcfg, 1)
            sd = pol.state_dict()
            mb = sum(v.numel() * v.element_size() for v in sd.values()) / 2**20
            pubs, calls, pulls = [], [], []
            for _ in range(max(3, s["repeats"] + 2)):
                version += 1
                t0 = time.perf_counter()
                ref = store.publish.remote(version, sd)
                calls.append(time.perf_counter() - t0)  # what the learner's step now waits for
                ray.get(ref, timeout=120)
                pubs.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                v, state = ray.get(store.latest_if_newer.remote(version - 1), timeout=120)
                with torch.no_grad():
                    replica.load_state_dict(to_torch_state(state))
                pulls.append(time.perf_counter() - t0)
            name = "score-tiny demo policy" if D == 128 else f"default policy, D={D}"
            rows.append({"policy": name, "D": D, "params": pol.num_params(), "mb": round(mb, 2),
                         "publish_ms": round(1e3 * float(np.median(pubs)), 2),
                         "publish_call_ms": round(1e3 * float(np.median(calls)), 2),
                         "pull_ms": round(1e3 * float(np.median(pulls)), 2)})
            say(f"[weight_sync] {name}: {mb:.2f} MB, publish {rows[-1]['publish_ms']:.1f} ms (the call alone "
                f"{rows[-1]['publish_call_ms']:.1f} ms), pull+load "
                f"{rows[-1]['pull_ms']:.1f} ms per version")
        # the state X one rollout record carries through the object store, as the records encode
        # it (pipeline.trainer.state_to_numpy): float32, or a bf16 MLLM's own dtype
        from pipeline.trainer import state_from_numpy, state_to_numpy

        D0 = min(lm_widths.values()) if lm_widths else 128
        X = torch.randn(32, 196, D0)
        transfer: dict[str, float] = {}
        for dt in (torch.float32, torch.bfloat16):
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                arr, name = state_to_numpy(X.to(dt))
                back = state_from_numpy(np.array(ray.get(ray.put(arr))), name)
                times.append(time.perf_counter() - t0)
            assert back.dtype == dt
            transfer[name] = round(1e3 * float(np.median(times)), 1)
        state = {"score-tiny (16x16x128)": 16 * 16 * 128}
        for name, D in lm_widths.items():
            state[f"{name} (32x196x{D})"] = 32 * 196 * D
        state_mb = {k: {"float32": round(4 * v / 2**20, 3), "bfloat16": round(2 * v / 2**20, 3)} for k, v in state.items()}
    finally:
        ray.kill(store)
    say(f"[weight_sync] X per rollout record (float32 / bfloat16): "
        + ", ".join(f"{k} {v['float32']} / {v['bfloat16']} MB" for k, v in state_mb.items())
        + f"; encode + put + get + decode of a 32x196x{D0} state: float32 {transfer['float32']} ms, "
        f"bfloat16 {transfer['bfloat16']} ms")
    return {"rows": rows, "state_mb_per_record": state_mb, "state_transfer_ms": transfer, "state_transfer_D": D0}


# =============================================================================================
# 5. data ingest


def _rate(it, limit: int | None = None) -> dict[str, Any]:
    """Iterate; ``{clips, seconds, clips_s, first_s, second_half_clips_s}``: overall rate (start-up
    included), time to the first clip, and the rate over the second half of the clips (past the
    start-up; sources that decode a whole shard before their first clip pay that inside it too)."""
    t0, c0 = time.perf_counter(), time.process_time()
    stamps: list[float] = []
    for _ in it:
        stamps.append(time.perf_counter() - t0)
        if limit is not None and len(stamps) >= limit:
            break
    sec = time.perf_counter() - t0
    cpu = time.process_time() - c0
    n = len(stamps)
    half = None
    if n >= 4:
        h = n // 2
        span = stamps[-1] - stamps[h - 1]
        half = (n - h) / span if span > 0 else None
    return {"clips": n, "seconds": round(sec, 3), "clips_s": round(n / sec, 2) if sec > 0 else None,
            "first_s": round(stamps[0], 3) if stamps else None,
            "second_half_clips_s": round(half, 2) if half else None,
            "clips_per_cpu_s": round(n / cpu, 2) if cpu > 0 else None}


def bench_data(s: dict, cfg, assets: dict, consume_samples_s: float | None) -> dict[str, Any]:
    from pipeline.config import WorldConfig
    from actors import data_stream as stream
    from pipeline.trainer import iter_pseudo_videos_local, iter_videos_local, iter_world_pseudo_videos, iter_world_videos

    d = cfg.data
    n_synth = 16 if s["stage_steps"] <= 3 else 48
    out: dict[str, Any] = {}
    out["world_synthesis_in_process"] = _rate(iter_world_pseudo_videos(WorldConfig(), d), n_synth)
    out["world_video_synthesis_in_process"] = _rate(iter_world_videos(WorldConfig(), d), n_synth)
    out["pseudo_from_shards_in_process"] = _rate(iter_pseudo_videos_local(d, 0, epochs=1))
    out["video_decode_in_process"] = _rate(iter_videos_local(d, epochs=1))
    out["pseudo_ray_data"] = _rate(stream.iter_samples(stream.pseudo_video_dataset(cfg, 0), batch_size=d.batch_size))
    out["video_ray_data"] = _rate(stream.iter_samples(stream.video_dataset(cfg), batch_size=d.batch_size))
    if assets.get("world_seconds"):
        out["world_generation_s"] = round(assets["world_seconds"], 2)
    out["rollout_consumes_samples_s"] = consume_samples_s
    for k, v in out.items():
        if isinstance(v, dict):
            hr = (f", {v['clips_s'] / consume_samples_s:.1f}x one actor's demand"
                  if consume_samples_s and v.get("clips_s") else "")
            say(f"[data] {k}: {v['clips']} clips, {v['clips_s']} clips/s (first after {v['first_s']}s, second half "
                f"{v['second_half_clips_s']} clips/s){hr}")
    return out


# =============================================================================================
# 6. one Ray stage: waits, step times, weight sync, end-to-end throughput


def _make_timed_worker():
    import ray

    from actors.rollout import RolloutWorker

    @ray.remote(num_cpus=0)
    class BenchStats:
        def __init__(self):
            self.calls: list = []

        def add(self, actor: str, t0: float, t1: float, n: int) -> None:
            self.calls.append((actor, t0, t1, n))

        def get(self) -> list:
            return list(self.calls)

    class TimedRolloutWorker(RolloutWorker):
        """RolloutWorker that reports when each batch call starts and ends (idle time between calls)."""

        def __call__(self, batch):
            t0 = time.time()
            n = 0
            for out in RolloutWorker.__call__(self, batch):
                n += len(out["sample_id"])
                yield out
            try:
                ray.get_actor(STATS_ACTOR).add.remote(self.actor, t0, time.time(), n)
            except ValueError:
                pass

    return BenchStats, TimedRolloutWorker


def _scalars(logdir: str) -> dict[str, list[tuple[float, int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {t: [(e.wall_time, e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def bench_stage(s: dict, cfg) -> dict[str, Any]:
    import numpy as np
    import ray

    import actors.rollout as rollout_mod
    from benchmarks.shapes import idle_fractions, wait_fractions

    from actors.stage import run_stage

    BenchStats, Timed = _make_timed_worker()
    stats = BenchStats.options(name=STATS_ACTOR).remote()
    original = rollout_mod.RolloutWorker
    rollout_mod.RolloutWorker = Timed  # rollout_dataset looks the class up at call time
    tag = "stage"
    try:
        summary = run_stage(cfg, "pseudo_video", log=lambda m: say(f"[{tag}] {m}"))
    finally:
        rollout_mod.RolloutWorker = original
    calls = ray.get(stats.get.remote(), timeout=60)
    ray.kill(stats)
    sc = _scalars(summary["tensorboard"])

    def series(tag: str) -> list[float]:
        return [v for _, _, v in sorted(sc.get(tag, []), key=lambda e: e[1])]

    walls = [w for w, _, _ in sorted(sc.get("timing/data", []), key=lambda e: e[1])]
    steps = len(walls)
    seconds = float(summary.get("seconds", 0.0))
    step_wall = ([max(seconds - (walls[-1] - walls[0]), 0.0)] + list(np.diff(walls))) if steps else []
    data, learn, sync = series("timing/data"), series("timing/learn"), series("timing/weight_sync")
    scfg = cfg.stage.pseudo_video
    steady_span = walls[-1] - walls[0] if steps > 1 else 0.0
    records = series("rollout/records")
    steady_rollouts = sum(records[1:]) * scfg.group_size if records else 0.0
    half = steps // 2
    produced = sum(n for *_, n in calls)
    late = [c for c in calls if walls and c[2] >= walls[half - 1]] if steps >= 4 else []
    prod_span = (max(c[2] for c in late) - min(c[1] for c in late)) if len(late) > 1 else 0.0
    out = {
        "steps": steps, "B": scfg.batch_size, "G": scfg.group_size, "stage_seconds": summary.get("stage_seconds"),
        "records_produced": produced, "records_used": int(sum(records)),
        "dropped_stale": int(summary.get("dropped_stale", 0)),
        "wasted_rollout_fraction": round(int(summary.get("dropped_stale", 0)) / produced, 4) if produced else None,
        "learner_data_wait_second_half": wait_fractions(data[half:], step_wall[half:], skip_first=0)["all"] if steps >= 4 else None,
        "rollouts_per_s_second_half": (round(sum(records[half:]) * scfg.group_size / (walls[-1] - walls[half - 1]), 2)
                                       if steps >= 4 and walls[-1] > walls[half - 1] else None),
        "steps_per_s_second_half": (round((steps - half) / (walls[-1] - walls[half - 1]), 3)
                                    if steps >= 4 and walls[-1] > walls[half - 1] else None),
        "learner_seconds": seconds,
        "learner_data_wait": wait_fractions(data, step_wall),
        "rollout_actor_idle": idle_fractions([(a, t0, t1) for a, t0, t1, _ in calls]),
        "rollout_actors_used": len({a for a, *_ in calls}),
        "learner_step_ms_median": round(1e3 * float(np.median(learn)), 2) if learn else None,
        "weight_sync_ms_median": round(1e3 * float(np.median(sync)), 2) if sync else None,
        "rollout_batch_ms_median": round(1e3 * float(np.median(series("timing/rollout"))), 1) if steps else None,
        "step_wall_ms_median_steady": round(1e3 * float(np.median(step_wall[1:])), 1) if steps > 1 else None,
        "first_step_s": round(step_wall[0], 2) if steps else None,
        "rollouts_per_s_end_to_end": round(float(summary.get("rollouts_per_s", 0.0)), 2),
        "steps_per_s_end_to_end": round(steps / seconds, 3) if seconds else None,
        "rollouts_per_s_steady": round(steady_rollouts / steady_span, 2) if steady_span else None,
        "steps_per_s_steady": round((steps - 1) / steady_span, 3) if steady_span else None,
    }
    w, i = out["learner_data_wait"], out["rollout_actor_idle"]
    say(f"[{tag}] {steps} steps: learner waits for rollouts {w['steady']} of its step time after step 0 "
        f"({out['learner_data_wait_second_half']} over the second half, {w['all']} incl. start-up), rollout actors "
        f"idle {i['mean']}; {out['dropped_stale']} of {produced} rollout records dropped as stale; learner step "
        f"{out['learner_step_ms_median']} ms, weight sync {out['weight_sync_ms_median']} ms; second half "
        f"{out['rollouts_per_s_second_half']} rollouts/s, {out['steps_per_s_second_half']} steps/s "
        f"({out['rollouts_per_s_end_to_end']} / {out['steps_per_s_end_to_end']} end to end)")
    return out


# =============================================================================================
# report


def headline(res: dict) -> dict[str, Any]:
    h: dict[str, Any] = {}
    for r in (res.get(SERVING) or {}).get("rows", []):
        if r["mode"] != "none":
            h[f"serving_ttft_speedup/{r['mode']}/c{r['concurrency']}"] = r["ttft_speedup"]
            h[f"serving_req_s_ratio/{r['mode']}/c{r['concurrency']}"] = r["req_s_ratio"]
    if res.get(SERVING):
        h["serving_policy_share_of_ttft"] = res[SERVING]["policy_share_of_ttft"]
    for name, m in (res.get("prefill") or {}).items():
        for r in m["rows"]:
            if r["retention"] in (0.1, 0.05):
                pct = int(round(100 * r["retention"]))
                h[f"prefill_speedup_{pct}pct/{name}"] = r["speedup"]
                h[f"prefill_flops_limit_{pct}pct/{name}"] = r["flops_limit"]
        h[f"compressor_pct_full_depth/{name}"] = m["compressor_pct_full_depth"]
    sc = res.get("scoring")
    if sc:
        h["scoring_overhead_vs_bare"] = sc["rows"][0]["overhead_vs_bare"]
        h["rollout_overhead_vs_bare"] = sc["rollout"]["overhead_vs_bare"]
        h["scoring_speedup_padding_aware_cached"] = {str(r["keep_ratio"]): r["speedup_packed_cached"] for r in sc["rows"]}
    if res.get("actors"):
        h["actors_scaling_2_vs_1"] = res["actors"]["scaling_2_vs_1"]
        h["actor_cache_gain_2nd_epoch"] = res["actors"]["cache_gain_cpu"]
    if res.get("stage"):
        st = res["stage"]
        h["learner_data_wait_steady"] = st["learner_data_wait"]["steady"]
        h["rollout_actor_idle"] = st["rollout_actor_idle"]["mean"]
        h["rollouts_per_s_steady"] = st["rollouts_per_s_steady"]
        h["steps_per_s_steady"] = st["steps_per_s_steady"]
        h["weight_sync_ms"] = st["weight_sync_ms_median"]
        h["learner_step_ms"] = st["learner_step_ms_median"]
        h["wasted_rollout_fraction"] = st.get("wasted_rollout_fraction")

    if res.get("data"):
        d = res["data"]
        h["pseudo_video_clips_s"] = d["pseudo_ray_data"]["clips_s"]
        h["video_decode_clips_s"] = d["video_ray_data"]["clips_s"]
    return h


def markdown(res: dict, command: str, s: dict) -> str:
    if any(res.get(k) for k in SECTIONS):  # (not for the serving section alone: .venv-serve lacks pipeline.evaluation's deps)
        from benchmarks.shapes import fmt, md_table

    m = res["machine"]
    L = [
        "# Benchmarks", "",
        "Written by `jobs/benchmark.py`; every figure below comes from one run of:", "",
        "```bash", command, "```", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('mem_gib', '?')} GiB, device {m['device']}"
        f"{' (' + m['gpu'] + ')' if m.get('gpu') else ''}; torch {m['torch']} with {m['torch_threads']} thread(s) "
        f"(OMP_NUM_THREADS={m['omp_num_threads']}); load average at start {m['load_avg_start']}. "
        f"Run took {res['seconds']:.0f} s. Ratios carry over between machines far better than absolute times. "
        f"In-process timings (sections 1-2) use {s['clock_name']}"
        + (" (the machine is shared with other jobs: wall time would count their load; Ray sections 3-6 are wall "
           "time and noisier)." if s["clock_name"].startswith("process") else "; sections 3-6 are wall time."),
        "",
    ]
    if res.get("prefill"):
        L += ["## 1. Prefill speedup vs retention", "",
              f"Measured: median {s['clock_name']} of the adapter's pruned prefill (kept tokens = top-K of the compressor's "
              "logits, original positions) vs all tokens. Limit: `1 / FLOPs ratio` "
              "(`pipeline.evaluation.prefill_flops`, plus Qwen3-VL's DeepStack adds: `benchmarks.shapes.mllm_prefill_flops`; "
              "independent of depth). Efficiency = measured / limit.", ""]
        hdr = ["model (layers run / full)", "retention", "K", "length", "prefill ms", "speedup", "FLOPs limit", "efficiency"]
        rows = []
        for name, p in res["prefill"].items():
            frames = f", {p['video_frames']} frames" if "video_frames" in p else ""
            for r in p["rows"]:
                rows.append([f"{name} ({p['layers']}/{p['full_layers']}, {p['frames']}x{p['tokens_per_frame']}{frames})",
                             f"{r['retention']:.0%}", r["k"], r["length"], fmt(r["prefill_ms"], ".1f"),
                             fmt(r["speedup"], ".2f"), fmt(r["flops_limit"], ".2f"), fmt(r["efficiency"], ".2f")])
        L += [md_table(hdr, rows), ""]
        L += [f"{name}: {p['note']}. `T'xN` visual tokens from {p['video_frames']} frames"
              + (f" (of the real {FAMILY_FRAMES}: `--family-frames` auto caps a CPU run at {CPU_VISUAL_TOKENS} visual "
                 "tokens; same per-frame grid)" if p.get("frames_capped") else "")
              + "; the length includes the family's per-step/per-frame text"
              + (f"; DeepStack levels run: {p['deepstack_levels']} of {p['deepstack_levels_full_depth']} (level l is added "
                 f"after layer l), counted in the FLOPs" if p["deepstack_levels_full_depth"] else "") + ".\n"
              for name, p in res["prefill"].items() if "video_frames" in p]
        L += ["Compressor (policy forward + top-K at 10%) as a share of the full-token prefill:", ""]
        rows = [[name, f"{p['policy']['hidden']} x {p['policy']['layers']}", fmt(p["compressor_ms"], ".1f"),
                 f"{p['compressor_pct_measured']:.2f}%", f"{p['compressor_pct_full_depth']:.2f}%",
                 f"{p['compressor_flops_pct']:.2f}%", fmt(p["speedup_10pct_with_compressor_full_depth"], ".2f")]
                for name, p in res["prefill"].items()]
        L += [md_table(["model", "policy (hidden x layers)", "compressor ms", "% of measured prefill",
                        "% at full depth (time, extrapolated)", "% in FLOPs (full depth)",
                        "speedup at 10% incl. compressor (full depth)"], rows), ""]
        L += [f"{name}: the compressor through `torch.compile` (`--compile-policy`) takes "
              f"{p['compressor_compiled_ms']:.2f} ms = {p['compressor_compiled_pct_measured']:.2f}% of the prefill, "
              f"measured in the same rounds.\n" for name, p in res["prefill"].items() if "compressor_compiled_ms" in p]
    sc = res.get("scoring")
    if sc:
        L += [f"## 2. Rollout scoring throughput ({sc['model']}, {sc['frames']}x{sc['tokens_per_frame']} tokens, "
              f"B={sc['B']}, G={sc['G']})", "",
              "`score`: today's rollout path, ONE `adapter.score` call over B x (G+1) rows (row 0 = all tokens, "
              "CE_full). `bare`: the language model alone over the very same padded batch (target: `score` at "
              "most 15% above it). `padding-aware`: `pipeline.trainer.score_packed` (CE_full in its own batch, masked "
              "rows padded only to their own max); `+ cache`: CE_full from a per-sample cache. Throughput in masked "
              "sequences/s (B*G per call).", ""]
        rows = [[f"{r['keep_ratio']:.2f}", f"{100 * r['pad_waste']:.0f}%", f"{100 * r['pad_waste_packed']:.0f}%",
                 fmt(r["score_seq_s"], ".0f"), fmt(r["bare_seq_s"], ".0f"), f"{100 * r['overhead_vs_bare']:+.1f}%",
                 fmt(r["build_ms"], ".1f"), fmt(r["packed_seq_s"], ".0f"), fmt(r["packed_cached_seq_s"], ".0f"),
                 f"x{r['speedup_packed_cached']:.2f}"] for r in sc["rows"]]
        L += [md_table(["keep ratio", "padding waste (one batch)", "padding waste (padding-aware)", "score seq/s",
                        "bare forward seq/s", "score overhead vs bare", "batch build ms", "padding-aware seq/s",
                        "+ CE_full cache seq/s", "gain (before -> after)"], rows), ""]
        r = sc["rollout"]
        L += [f"Whole rollout (encode + policy + G masks + score, fresh policy, kept {r['kept_ratio']:.2f}): "
              f"{r['rollout_seq_s']:.0f} masked seq/s vs bare forward {r['bare_seq_s']:.0f} -> overhead "
              f"{100 * r['overhead_vs_bare']:+.1f}% ({100 * r['overhead_vs_bare_cached_X']:+.1f}% with the vision "
              f"features cached; encode alone {r['encode_ms']:.1f} ms of {r['rollout_ms']:.0f} ms).", ""]
    a = res.get("actors")
    if a:
        ov = a["actor_overhead_vs_in_process"]
        L += ["## 3. Rollout actors (Ray, `RolloutWorker`)", "",
              "Wall time (the two actors share the machine's cores with everything else running; load average "
              f"at the end of this section: {a.get('load_avg')}). Per CPU-second: masked sequences per second of the "
              "actor process's own CPU time, compared with the in-process rollout of section 2 (same B, G, model).", "",
              md_table(["batches (B x G)", "1 actor seq/s", "2 actors seq/s", "2 vs 1", "per-actor seq/s (busy, wall)",
                        "per-actor seq per CPU-second", "same, 2nd epoch (X / CE_full cached)",
                        "actor vs in-process rollout (CPU time)", "start-up s"],
                       [[f"{a['batches']} ({a['B']} x {a['G']})", fmt(a["one_actor_seq_s"], ".0f"),
                         fmt(a["two_actors_seq_s"], ".0f"), f"x{a['scaling_2_vs_1']:.2f}",
                         fmt(a["per_actor_seq_s_in_ray"], ".0f"), fmt(a.get("per_actor_seq_per_cpu_s"), ".0f"),
                         f"{fmt(a.get('one_actor_seq_per_cpu_s_cached'), '.0f')} (x{a['cache_gain_cpu']:.2f})",
                         "-" if ov is None else f"{100 * ov:+.1f}%", fmt(a["startup_s"], ".1f")]]), ""]
    ws = res.get("weight_sync")
    if ws:
        L += ["## 4. Weight sync and state bytes", "",
              "`publish ms`: the call and the store's reply; `publish call ms`: the call alone, which is what the "
              "learner's step waits for now that the reply is awaited only before the next publish.", "",
              md_table(["policy", "params", "MB", "publish ms", "publish call ms", "pull + load ms"],
                       [[r["policy"], r["params"], fmt(r["mb"], ".2f"), fmt(r["publish_ms"], ".1f"),
                         fmt(r.get("publish_call_ms"), ".1f"), fmt(r["pull_ms"], ".1f")] for r in ws["rows"]]), "",
              "Visual-token state `X` each rollout record carries through the object store (`rollout.state_dtype`: "
              "float32, or bfloat16 - the default for a bf16 MLLM, whose features are bf16 already): "
              + ", ".join(f"{k}: {v['float32']} / {v['bfloat16']} MB" for k, v in ws["state_mb_per_record"].items())
              + f". Encode + `ray.put` + `ray.get` + decode of one 32x196x{ws['state_transfer_D']} state: float32 "
              f"{ws['state_transfer_ms']['float32']} ms, bfloat16 {ws['state_transfer_ms']['bfloat16']} ms.", ""]
    d = res.get("data")
    if d:
        need = d.get("rollout_consumes_samples_s")
        rows = []
        for k in ("world_synthesis_in_process", "world_video_synthesis_in_process", "pseudo_from_shards_in_process",
                  "video_decode_in_process", "pseudo_ray_data", "video_ray_data"):
            v = d[k]
            in_proc = "in_process" in k
            rows.append([k, v["clips"], fmt(v["clips_s"], ".1f"), fmt(v["first_s"], ".2f"), fmt(v["second_half_clips_s"], ".1f"),
                         fmt(v.get("clips_per_cpu_s"), ".1f") if in_proc else "-",
                         f"{v['clips_s'] / need:.1f}x" if need and v["clips_s"] else "-"])
        L += ["## 5. Data ingest", "",
              f"One rollout actor consumes {fmt(need, '.2f')} samples/s (scoring section's rollout). Clips of 16 frames, 64 px.", "",
              md_table(["source", "clips", "clips/s (wall, incl. start-up)", "first clip s", "clips/s (second half)",
                       "clips per CPU-second (in-process)", "overall rate vs one actor's demand"], rows), ""]
    st = res.get("stage")
    if st:
        runs = [("value", st)]
        spec = [
            ("learner time waiting for rollouts: after step 0 / second half / incl. start-up",
             lambda r: f"{fmt(r['learner_data_wait']['steady'])} / {fmt(r.get('learner_data_wait_second_half'))} / "
                       f"{fmt(r['learner_data_wait']['all'])}"),
            ("rollout records produced / used / dropped as stale (wasted share)",
             lambda r: f"{r.get('records_produced')} / {r.get('records_used')} / {r.get('dropped_stale')} "
                       f"({fmt(r.get('wasted_rollout_fraction'))})"),
            ("rollout-actor time idle between batches (mean over actors)", lambda r: fmt(r["rollout_actor_idle"]["mean"])),
            ("rollout actors used", lambda r: str(r.get("rollout_actors_used"))),
            ("learner step (DeepSpeed fwd+bwd+step), median ms", lambda r: fmt(r["learner_step_ms_median"], ".1f")),
            ("weight sync per policy version (publish), median ms", lambda r: fmt(r["weight_sync_ms_median"], ".1f")),
            ("rollout batch on an actor, median ms", lambda r: fmt(r["rollout_batch_ms_median"], ".0f")),
            ("learner step wall after step 0, median ms", lambda r: fmt(r["step_wall_ms_median_steady"], ".0f")),
            ("first step (actors start, model load) s", lambda r: fmt(r["first_step_s"], ".1f")),
            ("used rollouts/s, steps/s after step 0",
             lambda r: f"{fmt(r['rollouts_per_s_steady'])}, {fmt(r['steps_per_s_steady'])}"),
            ("used rollouts/s, steps/s over the second half",
             lambda r: f"{fmt(r.get('rollouts_per_s_second_half'))}, {fmt(r.get('steps_per_s_second_half'))}"),
            ("used rollouts/s, steps/s end to end (learner span)",
             lambda r: f"{fmt(r['rollouts_per_s_end_to_end'])}, {fmt(r['steps_per_s_end_to_end'])}"),
            ("stage wall s (incl. Ray Train set-up)", lambda r: fmt(r["stage_seconds"], ".1f")),
        ]
        L += [f"## 6. One Ray stage (`run_stage`, pseudo_video, {st['steps']} steps, B={st['B']}, G={st['G']}, "
              f"rollout pool 1..2 actors)", "",
              "Per-step figures from the stage's TensorBoard scalars; rollout-actor idle time from the start/end of "
              "every batch call (a `RolloutWorker` subclass reporting to a stats actor).", "",
              md_table(["figure"] + [name for name, _ in runs], [[label] + [f(r) for _, r in runs] for label, f in spec]), ""]
    if res.get(SERVING):
        from benchmarks.serving import markdown as serving_markdown

        L += serving_markdown(res[SERVING])
    L += ["## Summary (JSON)", "", "```json", json.dumps(res["headline"], indent=1, sort_keys=True), "```", "", END_MARK, ""]
    return "\n".join(L)


def write_report(path: Path, text: str) -> None:
    """Write ``text``; hand-written notes after the end marker of an existing file are kept."""
    tail = ""
    if path.is_file():
        old = path.read_text()
        if END_MARK in old:
            tail = old.split(END_MARK, 1)[1].lstrip("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + ("\n" + tail if tail else ""))


# =============================================================================================
# main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (the test; well under 2 minutes on 2 cores)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown report path")
    p.add_argument("--json-out", default=None, help="also write the full results as JSON here")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    p.add_argument("--lms", default=None, help="LM shapes for the prefill section (default qwen2-0.5b,qwen2-7b; quick: "
                                               "qwen2-0.5b; '' for none)")
    p.add_argument("--families", default=None,
                   help="real-family MLLM shapes for the prefill section (default qwen3-vl-8b,internvl3.5-8b; quick: none; "
                        "'' for none)")
    p.add_argument("--layers", default="auto", help="decoder layers of the shaped LMs: auto (CPU 2, or 1 for 7B; GPU full) or N")
    p.add_argument("--frames", type=int, default=None, help="frames of the shaped-LM prefill (default 32; quick 8)")
    p.add_argument("--tokens-per-frame", type=int, default=196)
    p.add_argument("--family-frames", type=int, default=None,
                   help="video frames of the --families prefill, at each family's own grid (default auto: 32 on a GPU, "
                        f"on a CPU at most {CPU_VISUAL_TOKENS} visual tokens per model; quick 2)")
    p.add_argument("--retentions", default="1,0.5,0.25,0.1,0.05")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds (median; default 3, quick 1)")
    p.add_argument("--stage-steps", type=int, default=None, help="learner steps of the Ray stage (default 30; quick 3)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--clock", default="auto", choices=("auto", "cpu", "wall"),
                   help="in-process timings (prefill, scoring): auto = this process's CPU time on a CPU with one "
                        "torch thread (robust on a shared machine), else wall time (GPU: synchronized)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--compile-policy", action="store_true",
                   help="prefill section: also time score-tiny's compressor through torch.compile (compiles ~25 s)")
    args = p.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    sections = [x for x in args.sections.split(",") if x]
    bad = [x for x in sections if x not in (*SECTIONS, SERVING)]
    if bad:
        p.error(f"--sections: unknown {bad}; known: {[*SECTIONS, SERVING]}")
    if SERVING in sections and len(sections) > 1:
        p.error("--sections serving runs alone, in the serving venv: .venv-serve/bin/python jobs/benchmark.py --sections serving")
    s = settings(args)
    cpu_clock = args.clock == "cpu" or (args.clock == "auto" and device == "cpu" and torch.get_num_threads() == 1)
    s["clock"] = time.process_time if cpu_clock else time.perf_counter
    s["clock_name"] = "process CPU time" if cpu_clock else "wall time"
    if 1.0 not in s["retentions"]:
        s["retentions"] = [1.0] + s["retentions"]
    command = "OMP_NUM_THREADS=" + os.environ["OMP_NUM_THREADS"] + " python " + " ".join(
        shlex.quote(a) for a in ["jobs/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    t_start = time.perf_counter()
    res: dict[str, Any] = {"machine": machine_info(device), "command": command,
                           "settings": {k: v for k, v in s.items() if k != "clock"}}
    say(f"benchmark: {command}\nmachine: {json.dumps(res['machine'])}")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="score-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ray_started = False
    try:
        if SERVING in sections:
            from benchmarks.serving import bench_serving

            with section_timer(res, SERVING):
                res[SERVING] = bench_serving(work, args.quick, device, say)
        if "prefill" in sections:
            with section_timer(res, "prefill"):
                res["prefill"] = bench_prefill(s, device, args.layers)
        if "scoring" in sections:
            with section_timer(res, "scoring"):
                res["scoring"] = bench_scoring(s, device)
        ray_secs = [x for x in sections if x in ("actors", "weight_sync", "data", "stage")]
        if ray_secs:
            import ray

            from actors.ray_utils import ensure_ray

            with section_timer(res, "assets"):
                assets = make_assets(work, s)
            cfg = base_config(assets, s, work)
            with section_timer(res, "ray_start"):
                ensure_ray(None, num_cpus=os.cpu_count(), include_dashboard=True,
                           object_store_memory=768 * 1024**2, log_to_driver=False)
            ray_started = True
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            roll = (res.get("scoring") or {}).get("rollout") or {}
            if "weight_sync" in sections:
                from benchmarks.shapes import LM_SHAPES

                with section_timer(res, "weight_sync"):
                    res["weight_sync"] = bench_weight_sync(s, {n: LM_SHAPES[n].hidden for n in s["lms"] if n in LM_SHAPES})
            if "actors" in sections:
                with section_timer(res, "actors"):
                    in_proc = roll.get("rollout_seq_s") if s["clock_name"].startswith("process") else None
                    res["actors"] = bench_actors(s, cfg, in_proc)
            if "data" in sections:
                with section_timer(res, "data"):
                    res["data"] = bench_data(s, cfg, assets, roll.get("samples_per_s"))
            if "stage" in sections:
                with section_timer(res, "stage"):
                    res["stage"] = bench_stage(s, cfg)
    finally:
        if ray_started:
            import ray

            ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    res["headline"] = headline(res)
    text = markdown(res, command, s)
    write_report(Path(args.out), text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1, sort_keys=True, default=float) + "\n")
    say("")
    say(text.split("## Summary (JSON)")[0].rstrip())
    say(f"\nreport written to {args.out} ({res['seconds']:.0f} s; sections: {res.get('section_seconds')})")
    summary = {"seconds": res["seconds"], "section_seconds": res.get("section_seconds", {}), "out": str(args.out),
               "machine": res["machine"], "headline": res["headline"]}
    for k in ("prefill", "scoring", "actors", "weight_sync", "data", "stage", SERVING):
        if k in res:
            summary[k] = res[k]
    print(json.dumps(summary, sort_keys=True, default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

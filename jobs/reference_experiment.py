"""Short score-tiny pre-training runs for comparing variants (no save, no calibration).

    python jobs/reference_experiment.py --world runs/world --name base --set reference.steps=600 \
        [--eval-every 200] [--per-type 24] [--log EXPERIMENTS.jsonl]

Evaluates at checkpoints on (a) the world's held-out shards (decoded H.264, primary question,
greedy answer word: the build's own metric) and (b) a type-balanced set of raw-frame videos from
the ``test`` split (``--per-type`` questions of each type), and appends one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import numpy as np
import torch

from pipeline.config import WorldConfig, add_config_args, load_config
from pipeline.data.prompts import qa_prompt
from pipeline.data.world import QUESTION_TYPES, make_video, sample_rng
from pipeline.evaluation import answer_word, evaluate_qa, load_eval_videos, reencode
from pipeline.mllm.reference import Pretrainer, build_model, build_tokenizer


def balanced_set(wcfg: WorldConfig, per_type: int, frames: int | None = None) -> list[tuple[np.ndarray, dict]]:
    want = {t: per_type for t in QUESTION_TYPES}
    if frames is not None and frames < 4:
        wcfg = wcfg.model_copy(update={"motion": ["static"] if frames < 2 else ["static", "linear", "bounce"]})
        want = {t: n for t, n in want.items() if t in (("color", "shape") if frames < 2 else ("color", "shape", "direction"))}
    out, i = [], 0
    while any(want.values()) and i < 50 * per_type * len(QUESTION_TYPES):
        v = make_video(wcfg, sample_rng(wcfg.seed, "test", "video", i), frames=frames)
        i += 1
        for q in v["qa"]:
            if want.get(q["type"], 0) > 0:
                want[q["type"]] -= 1
                out.append((v["frames"], q))
                break
    return out


@torch.no_grad()
def eval_balanced(adapter, items) -> dict:
    per: dict[str, list[bool]] = {}
    stops = []
    for frames, q in items:
        X = adapter.encode_video(frames)
        ids = adapter.generate_ids(X, torch.arange(X.shape[0] * X.shape[1]), qa_prompt(q["question"]), max_new_tokens=2)
        text = adapter.tokenizer.decode(ids, skip_special_tokens=True)
        per.setdefault(q["type"], []).append(answer_word(text) == q["answer"])
        stops.append(len(ids) > 1 and ids[1] in adapter.eos_token_ids)
    acc = {k: round(float(np.mean(v)), 3) for k, v in sorted(per.items())}
    return {"balanced": round(float(np.mean([x for v in per.values() for x in v])), 3), "bal_types": acc,
            "stop_rate": round(float(np.mean(stops)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--world", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--per-type", type=int, default=24)
    ap.add_argument("--shard-videos", type=int, default=128)
    ap.add_argument("--log", default="EXPERIMENTS.jsonl")
    ap.add_argument("--fixed-frames", type=int, help="train (and eval the balanced set) at this frame count only")
    ap.add_argument("--save", help="save the trained model here (save_pretrained)")
    ap.add_argument("--no-shards", action="store_true", help="skip the held-out shard evaluation")
    args = ap.parse_args()
    if args.fixed_frames:
        import pipeline.mllm.reference as ref

        ref.frames_schedule = lambda *a: [args.fixed_frames]
    cfg = load_config(args.config, args.overrides)
    rcfg = cfg.reference
    wcfg = WorldConfig.model_validate_json((Path(args.world) / "world.json").read_text())
    torch.manual_seed(rcfg.seed)
    tok = build_tokenizer()
    model = build_model(rcfg, wcfg, tok)
    tr = Pretrainer(rcfg, wcfg, model, tok)
    items = balanced_set(wcfg, args.per_type, args.fixed_frames)
    shards: list = []
    hist, t_train, ema = [], 0.0, None
    for s in range(rcfg.steps):
        t0 = time.perf_counter()
        m = tr.step()
        t_train += time.perf_counter() - t0
        ema = m["loss"] if ema is None else 0.98 * ema + 0.02 * m["loss"]
        if (s + 1) % args.eval_every == 0 or s + 1 == rcfg.steps:
            model.eval()
            if not args.no_shards:  # decoded once, encoded by the tower as it is now (it trains too)
                shards = reencode(tr.adapter, shards) if shards else load_eval_videos(
                    tr.adapter, str(Path(args.world) / "videos"), args.shard_videos, wcfg.frames, wcfg.size,
                    keep_frames=args.shard_videos)
            full = evaluate_qa(tr.adapter, shards) if shards else {"accuracy": None, "option_accuracy": None, "per_type": {}}
            res = {"step": s + 1, "train_s": round(t_train, 1), "loss": round(ema, 3), "aux": round(m["aux_loss"], 3), "dir": round(m.get("dir_loss", 0.0), 3),
                   "acc": full["accuracy"], "opt": full["option_accuracy"], "types": full["per_type"],
                   **eval_balanced(tr.adapter, items)}
            model.train()
            hist.append(res)
            print(json.dumps(res), flush=True)
    if args.save:
        model.save_pretrained(args.save, safe_serialization=True)
        tok.save_pretrained(args.save)
    line = {"name": args.name, "overrides": args.overrides, "steps": rcfg.steps, "final": hist[-1], "history": hist}
    with open(args.log, "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()

"""Answer a question about a video with a frozen MLLM that sees only the compressor's top tokens.

    python jobs/compress_video.py --mllm .cache/score-tiny --compressor runs/train/final \
        --video clip.mp4 --question "what color is the circle ?" --retention 0.1

Prints the answer, the visual tokens kept and the pruned prefill time inside the generation, then
the cost timed in the order a deployment pays it (``pipeline.evaluation.deployed_rounds``: encode,
select, prefill the kept tokens, encode, prefill all tokens; medians over ``--repeats`` rounds):
the selection (policy + top-K), both prefills, the speedup and the selection's share of the full
prefill. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _bootstrap  # noqa: F401


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mllm", required=True, help="frozen MLLM directory (save_pretrained layout, or s3://)")
    ap.add_argument("--compressor", required=True, help="trained SCORE policy directory")
    ap.add_argument("--video", required=True, help="video file (any container PyAV reads)")
    ap.add_argument("--question", required=True, help='a question, or a full prompt holding "<video>"')
    ap.add_argument("--retention", type=float, default=0.1)
    ap.add_argument("--frames", type=int, default=16, help="frames sampled uniformly from the video")
    ap.add_argument("--min-per-frame", type=int, default=None, help="default: the compressor's setting")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (0: skip the cost comparison)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    if not 0 < args.retention <= 1:
        raise SystemExit("error: --retention must be in (0, 1]")
    if not Path(args.video).is_file():
        raise SystemExit(f"error: --video {args.video}: no such file")

    from pipeline.data.quarantine import BadSample
    from pipeline.evaluation import answer_word, deployed_rounds
    from pipeline.inference import as_prompt, load_compressed

    cm = load_compressed(args.mllm, args.compressor, args.retention, args.min_per_frame, args.frames, dtype=args.dtype)
    try:
        frames = cm.frames(args.video)
    except BadSample as e:
        raise SystemExit(f"error: cannot read {args.video}: {e}") from None
    out = cm.generate(frames, args.question, args.max_new_tokens)
    result = {"answer": out["answer"], "answer_word": answer_word(out["answer"]), "kept": out["kept"], "total": out["total"], "retention": args.retention,
              "prefill_s": round(out["prefill_s"], 6), "policy_s": round(out["policy_s"], 6),
              "encode_s": round(out["encode_s"], 6)}
    if args.repeats > 0:
        prompt = as_prompt(cm.adapter, args.question)
        cost = deployed_rounds(cm.adapter, lambda: cm.encode(frames), lambda X: cm.select(X, prompt=prompt)[0],
                               prompt, args.repeats)
        sel_s, kept_s, full_s = cost["select_s"], cost["prefill_s"], cost["full_prefill_s"]
        result.update(select_median_s=round(sel_s, 6), prefill_kept_median_s=round(kept_s, 6),
                      prefill_full_median_s=round(full_s, 6), speedup=round(full_s / kept_s, 3) if kept_s > 0 else None,
                      select_pct_of_full_prefill=round(100 * sel_s / full_s, 2) if full_s > 0 else None)
    print(f"answer: {result['answer']}")
    print(f"visual tokens kept: {result['kept']}/{result['total']} ({result['kept'] / result['total']:.1%})")
    print(f"prefill (kept tokens): {1e3 * result['prefill_s']:.2f} ms in this generation; policy {1e3 * result['policy_s']:.2f} ms")
    if "prefill_full_median_s" in result:
        print(f"deployment order, median of {args.repeats}: select {1e3 * sel_s:.2f} ms "
              f"({result['select_pct_of_full_prefill']}% of the full prefill), prefill kept {1e3 * kept_s:.2f} ms, "
              f"all tokens {1e3 * full_s:.2f} ms (x{result['speedup']})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

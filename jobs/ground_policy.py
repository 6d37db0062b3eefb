"""The grounding warm start of a question-aware policy (pipeline/grounding.py), as a job.

    python jobs/ground_policy.py --config configs/generalization.yaml --init-policy DIR --out DIR \
        [--set grounding.epochs=6 ...]

Reads the stage-2 videos (``data.video_shards``) and their object annotations, encodes them with
the frozen MLLM (``mllm.path``), trains ``--init-policy`` (a question-aware policy: stage 1's) for
``grounding.epochs`` passes and writes it to ``--out`` (local or ``s3://``). The curriculum runs it
between the stages when ``grounding.epochs`` > 0. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

try:
    import _bootstrap  # noqa: F401  (repo root on sys.path when run as a script)
except ImportError:
    pass

from pipeline.config import add_config_args, config_from_args


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--init-policy", required=True, help="the question-aware policy to start from (stage 1's)")
    p.add_argument("--out", required=True, help="where the warm-started policy goes (save_pretrained layout)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if not cfg.grounding.epochs:
        raise SystemExit("error: grounding.epochs is 0: nothing to do")

    from pipeline import storage
    from pipeline.grounding import ground_policy
    from pipeline.mllm.loader import load_mllm
    from pipeline.policy import ScorePolicy

    adapter = load_mllm(cfg.mllm)
    policy = ScorePolicy.from_pretrained(args.init_policy, map_location=adapter.device, s3=cfg.data.s3)
    try:
        summary = ground_policy(cfg, adapter, policy, log=lambda m: print(m, flush=True))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        policy.save_pretrained(tmp)
        out = storage.upload_dir(tmp, args.out, cfg.data.s3)
    summary["policy"] = out
    print(json.dumps(summary, sort_keys=True, default=float), flush=True)
    return summary


if __name__ == "__main__":
    main()

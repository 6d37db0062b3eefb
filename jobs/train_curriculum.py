"""The two-stage curriculum, each stage its own Ray job (the driver is :mod:`actors.curriculum`).

    python jobs/train_curriculum.py --config configs/demo.yaml [--run NAME] [--storage DIR]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_curriculum.py --config configs/demo.yaml

Validates the config (exit 1 with a one-line error before any Ray work), connects to Ray (or
starts a local head it stops at the end), runs both stages, the choice of the final policy on
validation videos and the evaluation as Ray jobs, and prints, as its LAST stdout line, a JSON
summary naming the run's paths and each stage's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

try:
    import _bootstrap  # noqa: F401
except ImportError:
    pass

from pipeline.config import add_config_args, add_run_args, config_with_run_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p)
    add_run_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation job")
    args = p.parse_args(argv)
    cfg = config_with_run_args(args)  # validated (and --fresh applied) before any Ray work
    if args.resume:
        from pipeline.checkpoint import CheckpointError, verify

        try:
            verify(args.resume.rstrip("/"), cfg.data.s3)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
    cfg_path = str(Path(args.config).resolve()) if args.config else None
    overrides = [o for o in args.overrides if not o.startswith(("run.name=", "run.storage="))]

    if not (os.environ.get("RAY_ADDRESS") or cfg.run.ray_address):
        # a local head is started with token auth on; Ray reads the auth mode when it is imported
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from ray.job_submission import JobSubmissionClient

    from actors.curriculum import _wait_job_server, connect, run_curriculum

    url, head = connect(cfg)
    try:
        client = _wait_job_server(lambda: JobSubmissionClient(url), cfg.run.call_timeout_s)
        t0 = time.perf_counter()
        summary = run_curriculum(cfg, cfg_path, overrides, client, resume=args.resume, evaluate=not args.no_eval)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if head is not None:
            head.stop()
    for s, d in summary["stages"].items():
        print(f"[curriculum] {s}: {d.get('steps_done')} steps, policy v{d.get('final_version')}, "
              f"kept {d['first'].get('sparsity/kept_ratio', float('nan')):.3f}->{d['last'].get('sparsity/kept_ratio', float('nan')):.3f}"
              f"{' (skipped: already done)' if d.get('skipped') else ''}")
    print(json.dumps(summary, sort_keys=True, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

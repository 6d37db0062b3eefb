"""One curriculum stage on Ray (the driver is :func:`actors.stage.run_stage`).

    python jobs/train_stage.py --config configs/demo.yaml --stage pseudo_video \
        [--init-policy DIR] [--run NAME] [--storage DIR] [--resume CKPT] [--set key=value ...]

Validates the config (exit 1 with a one-line error, before any Ray work), runs the stage, prints
its summary line and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

try:
    import _bootstrap  # noqa: F401  (repo root on sys.path when run as a script)
except ImportError:
    pass

from pipeline.config import add_config_args, add_run_args, config_with_run_args
from pipeline.trainer import STAGES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--init-policy", default=None, help="policy directory (save_pretrained layout) to start from")
    add_run_args(p)
    args = p.parse_args(argv)
    cfg = config_with_run_args(args)
    if not (os.environ.get("RAY_ADDRESS") or cfg.run.ray_address):
        # a local cluster, token auth on, said explicitly (else Ray prints a notice about its default)
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from actors.stage import run_stage
    from pipeline.checkpoint import CheckpointError

    try:
        summary = run_stage(cfg, args.stage, init_policy=args.init_policy, resume=args.resume)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
    print(json.dumps({k: v for k, v in summary.items() if k not in ("first", "last")} | {
        "first": summary.get("first"), "last": summary.get("last")}, sort_keys=True, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

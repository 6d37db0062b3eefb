"""Choose a run's final policy on the validation videos (the curriculum's Ray job after stage 2;
the work is :func:`actors.selection.select`).

    python jobs/select_policy.py --config configs/demo.yaml [--run NAME] [--storage DIR] [--stage real_video]

Prints the choice as its last stdout line (JSON). Exit status 1 with a one-line error when
validation is not configured or the stage has no checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

try:
    import _bootstrap  # noqa: F401
except ImportError:
    pass

from pipeline.config import add_config_args, add_run_args, config_with_run_args
from pipeline.trainer import STAGES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--stage", default="real_video", choices=STAGES)
    add_run_args(p)
    args = p.parse_args(argv)
    cfg = config_with_run_args(args)
    if not (os.environ.get("RAY_ADDRESS") or cfg.run.ray_address):
        # a local cluster, token auth on, said explicitly (else Ray prints a notice about its default)
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from actors.selection import select

    try:
        out = select(cfg, args.stage)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, sort_keys=True, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Print what the pipeline would see in a data set, before training on it.

    python jobs/inspect_data.py [PATH] [--stage pseudo_video|real_video] [--mllm DIR] [--limit N] \
        [--config configs/x.yaml] [--set data.format=llava ...]

PATH (a folder, a .json/.jsonl, a LLaVA-NeXT .yaml mixture or a .tar; local or s3://) is read
as the stage's data (``--stage``; default: images -> pseudo_video, videos -> real_video);
without PATH both stages' ``data.image_shards`` / ``data.video_shards`` are. The settings are the
training run's (``--config``, ``--set``), and the samples come from the same Ray Data streams
(actors/data_inspect.py), so what it reports is what a stage streams: samples per stage and
format, quarantined records with reasons, frames per sample and, with ``--mllm``, visual tokens
per sample (min / median / max). The last stdout line is one JSON object: ``records``,
``quarantined`` (count per reason), ``frames``, ``visual_tokens``, ``stages``.
"""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401

from pipeline.config import ConfigError, add_config_args, config_from_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("path", nargs="?", help="data to inspect (default: the config's data.image_shards and data.video_shards)")
    p.add_argument("--stage", choices=("pseudo_video", "real_video"), help="the stage PATH feeds (default: from its records)")
    p.add_argument("--mllm", help="MLLM directory (local or s3://): report its visual tokens per sample")
    p.add_argument("--limit", type=int, help="inspect at most this many samples per stage")
    args = p.parse_args(argv)

    from pipeline.data import sources

    cfg = config_from_args(args)
    stages = ("pseudo_video", "real_video")
    try:
        if args.path:
            stage = args.stage or ("pseudo_video" if sources.kind_of(args.path, cfg.data) == "image" else "real_video")
            key = "image_shards" if stage == "pseudo_video" else "video_shards"
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={key: args.path})})
            stages = (stage,)
        elif args.stage:
            stages = (args.stage,)
        sources.check_sources(cfg.data)  # a mixture naming a missing file: one line, before any Ray work
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import os

    if not (os.environ.get("RAY_ADDRESS") or cfg.run.ray_address):
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # a local cluster, token auth said explicitly (as train_stage)
    import ray

    from actors.data_inspect import inspect_data

    started = not ray.is_initialized()
    try:
        summary = inspect_data(cfg, stages, mllm=args.mllm, limit=args.limit)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

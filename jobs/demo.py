"""`make demo`: run what the pipeline has on the embedded default (shapes world, local Ray).

Generates the world described by the config's ``world`` section into the directory above
``data.image_shards`` (unless it is already there with the same config), then streams the
pseudo-video (stage 1) and real-video (stage 2) datasets through Ray Data on a local cluster and
prints a summary per stream and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _bootstrap  # noqa: F401

from pipeline.config import add_config_args, config_from_args
from pipeline.data import stream
from pipeline.data.world import generate_world
from pipeline.ray_utils import ensure_ray
from pipeline.storage import is_s3


def ensure_world(cfg) -> Path | None:
    """Generate the world next to the configured shard dirs if missing or stale; None for s3://."""
    if is_s3(cfg.data.image_shards):
        return None
    root = Path(cfg.data.image_shards).parent
    marker = root / "world.json"
    want = cfg.world.model_dump_json(indent=2) + "\n"
    if marker.exists() and marker.read_text() == want:
        print(f"world: {root} (cached)")
        return root
    print(f"world: generating {cfg.world.images} images and {cfg.world.videos} videos into {root}")
    generate_world(cfg.world, root)
    return root


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default="configs/demo.yaml")
    cfg = config_from_args(ap.parse_args(argv))

    ensure_world(cfg)
    ensure_ray(cfg.run.ray_address)
    out: dict = {}
    for name, ds in (
        ("pseudo_video", stream.pseudo_video_dataset(cfg, seed=cfg.run.seed)),
        ("video", stream.video_dataset(cfg)),
    ):
        summary = stream.summarize_stream(ds)
        print(f"[{name}] {summary}")
        out[name] = {"samples": summary.samples, "clips_per_s": round(summary.clips_per_s, 1),
                     "quarantined": summary.quarantined}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

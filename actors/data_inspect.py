"""What a stage would stream (``jobs/inspect_data.py``): the same Ray Data datasets the stage
builds from the same config, iterated once and summarised.

Per stage: the path and its format, samples (and the source records they came from), samples
carrying a conversation, quarantined records per reason with the first few records, frames per
sample (min / median / max) and, given an MLLM, its visual tokens per sample (min / median /
max, from the adapter's own ``visual_grid``: no model forward).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable

import numpy as np

from pipeline.config import Config, MLLMConfig
from pipeline.data.quarantine import format_counts

STAGE_KIND = {"pseudo_video": "image", "real_video": "video"}


def _spread(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": int(min(values)), "median": float(np.median(values)), "max": int(max(values))}


def inspect_data(cfg: Config, stages: Iterable[str] = ("pseudo_video", "real_video"), *, mllm: str | None = None,
                 limit: int | None = None, show: int = 5, say: Callable[[str], Any] = print) -> dict[str, Any]:
    """Stream each stage's data once (up to ``limit`` samples) and report it; returns the summary
    whose JSON ``jobs/inspect_data.py`` prints last."""
    from actors import data_stream as stream
    from actors.quarantine import QuarantineLog
    from actors.ray_utils import ensure_ray
    from pipeline.data import sources

    import logging

    import ray

    ensure_ray(cfg.run.ray_address, logging_level=logging.WARNING)  # as the demo's stream check: a quiet console
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled ..."
    adapter = None
    if mllm:
        from pipeline.mllm.loader import load_mllm

        adapter = load_mllm(MLLMConfig(**{**cfg.mllm.model_dump(), "path": mllm}))
    out: dict[str, Any] = {"records": 0, "quarantined": Counter(), "frames": None, "visual_tokens": None, "stages": {}}
    all_frames: list[int] = []
    all_tokens: list[int] = []
    for stage in stages:
        kind = STAGE_KIND[stage]
        d = cfg.data
        path = d.image_shards if kind == "image" else d.video_shards
        fmt = sources.format_of(d, kind)
        log = QuarantineLog()
        ds = (stream.pseudo_video_dataset(cfg, int(cfg.run.seed), quarantine=log) if kind == "image"
              else stream.video_dataset(cfg, quarantine=log))
        frames: list[int] = []
        tokens: list[int] = []
        conv = 0
        src: set[str] = set()
        for batch in ds.iter_batches(batch_size=d.batch_size, batch_format="numpy"):
            for i in range(len(batch["sample_id"])):
                if limit is not None and len(frames) >= limit:
                    break
                t = int(len(batch["frames"][i]))
                frames.append(t)
                src.update(str(s) for s in batch["source_ids"][i])
                conv += bool("conversation" in batch and batch["conversation"][i])
                if adapter is not None:
                    tt, gh, gw = adapter.visual_grid(t)
                    tokens.append(int(tt * gh * gw))
            if limit is not None and len(frames) >= limit:
                break
        counts = log.counts()
        rep = {"path": path, "format": fmt, "records": len(frames), "source_records": len(src),
               "conversations": conv, "quarantined": counts, "frames": _spread(frames),
               "visual_tokens": _spread(tokens) if adapter is not None else None}
        out["stages"][stage] = rep
        out["records"] += len(frames)
        out["quarantined"].update(counts)
        all_frames += frames
        all_tokens += tokens
        fr = rep["frames"]
        say(f"[inspect] {stage}: {path} ({fmt}): {len(frames)} samples from {len(src)} {kind} records"
            + (f", {conv} with a conversation" if conv else "")
            + (f"; frames min {fr['min']} median {fr['median']:g} max {fr['max']}" if fr else ""))
        if adapter is not None and tokens:
            vt = rep["visual_tokens"]
            say(f"[inspect] {stage}: visual tokens per sample min {vt['min']} median {vt['median']:g} max {vt['max']}")
        say(f"[inspect] {stage}: {format_counts(counts)}")
        for r in log.records(show):
            say(f"[inspect]   {r['reason']}: {r['id']} ({r['source']}) {r['detail']}"[:240])
    out["quarantined"] = dict(out["quarantined"])
    out["frames"] = _spread(all_frames)
    out["visual_tokens"] = _spread(all_tokens) if adapter is not None else None
    return out

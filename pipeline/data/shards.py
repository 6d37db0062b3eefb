"""Shard formats, written the way real data sets are laid out.

Image-caption shards (COCO/LAION-export style), ``<root>/images/shard-00000.parquet``:

    id: string          stable sample id
    image: binary       encoded image (PNG or JPEG)
    caption: string
    objects: string     optional JSON annotations (list of {id, shape, color, box:[x0,y0,x1,y1]})

Video shards (LLaVA-Video-178K / WebVid style), ``<root>/videos/``:

    clips/<id>.mp4                  H.264 video
    annotations-00000.jsonl         one JSON object per line:
      {"id", "video": "clips/<id>.mp4", "caption",
       "qa": [{"question", "answer", "options": [...], "type", "objects": [object ids]}],
       "objects": [{"id", "shape", "color", "boxes": [[x0,y0,x1,y1] | null per frame]}],
       "frames", "fps", "width", "height"}

Only ``id``, ``image``, ``caption`` (images) and ``id``, ``video``, ``caption`` (videos) are
required; the rest are annotations used by oracle selectors and evaluation.
"""

from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("objects", pa.string()),
    ]
)
IMAGE_SHARD_GLOB = "shard-*.parquet"
VIDEO_ANNOTATIONS_GLOB = "annotations-*.jsonl"


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H,W,3] -> PNG bytes (deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_image_shard(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write records ``{id, image: uint8[H,W,3] | bytes, caption, objects?}`` as one parquet shard."""
    rows = {"id": [], "image": [], "caption": [], "objects": []}
    for r in records:
        img = r["image"]
        rows["id"].append(r["id"])
        rows["image"].append(img if isinstance(img, bytes) else encode_png(img))
        rows["caption"].append(r["caption"])
        obj = r.get("objects")
        rows["objects"].append(None if obj is None else json.dumps(obj, sort_keys=True))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows, schema=IMAGE_SCHEMA), str(path), compression="zstd")


def encode_mp4(frames: np.ndarray, fps: int = 8, crf: int = 12) -> bytes:
    """uint8 [T,H,W,3] -> H.264 mp4 bytes. Single-threaded x264, so the same frames give the same bytes."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T,H,W,3], got {frames.dtype} {tuple(frames.shape)}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {h}x{w}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1", "x264-params": "bframes=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_video_shard(root: str | Path, shard_index: int, records: Iterable[dict[str, Any]], fps: int) -> None:
    """Write records ``{id, frames: uint8[T,H,W,3], caption, qa, objects}`` as mp4 files + one jsonl."""
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    lines = []
    for r in records:
        frames = r["frames"]
        rel = f"clips/{r['id']}.mp4"
        (root / rel).write_bytes(encode_mp4(frames, fps=fps))
        ann = {k: v for k, v in r.items() if k != "frames"}
        ann.update(video=rel, frames=int(frames.shape[0]), fps=fps, height=int(frames.shape[1]), width=int(frames.shape[2]))
        lines.append(json.dumps(ann, sort_keys=True))
    (root / f"annotations-{shard_index:05d}.jsonl").write_text("".join(line + "\n" for line in lines))

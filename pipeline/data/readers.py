"""Readers for the shard formats of :mod:`pipeline.data.shards`, local or ``s3://``.

Pure functions (no Ray): the stream in :mod:`actors.data_stream` calls them inside Ray Data
tasks. Anything wrong with one sample or one shard raises
:class:`~pipeline.data.quarantine.BadSample` with a reason; callers quarantine and go on.

- Image-caption parquet shards (``*.parquet`` under ``data.image_shards``, sorted by path):
  :func:`iter_image_shard` streams rows ``{id, image (bytes), caption, objects}`` one record batch
  at a time; :func:`decode_image` gives uint8 [H,W,3] RGB (grayscale/palette/RGBA converted).
- Video shards (``*.jsonl`` under ``data.video_shards``, sorted by path): :func:`read_video_index`
  parses the annotations (``video`` is relative to the jsonl's folder unless absolute or a URI);
  :func:`load_video` reads the clip and samples T frames (:mod:`pipeline.data.video`).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from pipeline import storage
from pipeline.config import S3Config
from pipeline.data import conversations
from pipeline.data.quarantine import BadSample
from pipeline.data.video import check_frame_shape, decode_video, resize_rgb

IMAGE_REQUIRED = ("id", "image", "caption")
VIDEO_REQUIRED = ("id", "video", "caption")


# ---------------------------------------------------------------------------------------------
# listing


def list_image_shards(root: str, s3: S3Config | None = None) -> list[str]:
    """Image-caption parquet shards under ``root`` (recursive), sorted: the deterministic shard order."""
    return storage.list_files(root, ".parquet", s3)


def list_video_annotations(root: str, s3: S3Config | None = None) -> list[str]:
    """Video annotation jsonl files under ``root`` (recursive), sorted."""
    return storage.list_files(root, ".jsonl", s3)


# ---------------------------------------------------------------------------------------------
# checks shared by images and videos


def check_caption(caption: Any, max_words: int) -> str:
    """The caption, stripped; ``empty_caption`` / ``long_caption`` (more than ``max_words`` words)."""
    if caption is None or not isinstance(caption, str) or not caption.strip():
        raise BadSample("empty_caption", "caption", "" if caption is None else f"{caption!r}"[:40])
    n = len(caption.split())
    if n > max_words:
        raise BadSample("long_caption", "caption", f"{n} words > {max_words}")
    return caption.strip()


def _is_missing(e: BaseException) -> bool:
    # pyarrow's S3 filesystem reports a missing key as a plain OSError "Path does not exist"
    return isinstance(e, FileNotFoundError) or (
        isinstance(e, OSError) and ("does not exist" in str(e) or "NoSuchKey" in str(e))
    )


def _read_error(e: BaseException, path: str) -> BadSample:
    if _is_missing(e):
        return BadSample("missing_file", "read", path)
    return BadSample("unreadable_shard", "read", f"{type(e).__name__}: {e}"[:300])


# ---------------------------------------------------------------------------------------------
# images


def decode_image(data: bytes | None) -> np.ndarray:
    """Encoded image bytes -> uint8 [H,W,3] RGB; ``empty_file`` / ``corrupt_image`` / ``bad_shape``."""
    if not data:
        raise BadSample("empty_file", "decode", "zero-length image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadSample("corrupt_image", "decode", f"{type(e).__name__}: {e}") from None
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadSample("bad_shape", "shape", f"decoded image has shape {arr.shape}")
    check_frame_shape(arr.shape[0], arr.shape[1], "image")
    return arr


def open_parquet(path: str, s3: S3Config | None = None) -> tuple[Any, pq.ParquetFile]:
    """``(open file, ParquetFile)`` of one shard; a missing, empty, truncated or non-parquet shard
    raises ``BadSample`` (the caller closes the file)."""
    try:
        fs, p = storage.filesystem(path, s3)
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(path)
        if info.size == 0:
            raise BadSample("empty_file", "read", "zero-length parquet shard")
        f = fs.open_input_file(p)
        return f, pq.ParquetFile(f)
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - any open failure quarantines the shard
        raise _read_error(e, path) from None


def iter_image_shard(path: str, s3: S3Config | None = None, batch_rows: int = 256) -> Iterator[dict]:
    """Rows ``{id, image: bytes, caption, objects}`` of one parquet shard, in file order.

    Opening a missing, empty, truncated or non-parquet shard, or a schema without the required
    columns, raises ``BadSample`` before any row; a read error mid-file raises it after the rows
    that did read (the caller quarantines the rest of the shard).
    """
    f, pf = open_parquet(path, s3)
    names = set(pf.schema_arrow.names)
    missing = [c for c in IMAGE_REQUIRED if c not in names]
    if missing:
        f.close()
        raise BadSample("unreadable_shard", "read", f"schema lacks columns {missing}")
    columns = [c for c in (*IMAGE_REQUIRED, "objects") if c in names]
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            cols = {c: batch.column(c).to_pylist() for c in columns}
            for i in range(batch.num_rows):
                yield {
                    "id": cols["id"][i],
                    "image": cols["image"][i],
                    "caption": cols["caption"][i],
                    "objects": cols["objects"][i] if "objects" in cols else None,
                }
    except (pa.ArrowException, OSError) as e:
        raise _read_error(e, path) from None
    finally:
        f.close()


def load_image(row: dict, size: int, max_words: int, s3: S3Config | None = None) -> dict:
    """A shard row -> ``{id, image: uint8[size,size,3], caption, objects}`` (caption checked first).

    Rows of every format (:mod:`pipeline.data.sources`): the image is the row's ``image`` bytes,
    else the file at ``image_path`` (``missing_file`` when it is not there); the caption is the
    row's ``caption``, else its LLaVA ``conversations``' assistant turns joined (checked first)."""
    if not row.get("id"):
        raise BadSample("bad_annotation", "read", "row without id")
    caption = row.get("caption")
    if row.get("conversations") is not None:
        caption = conversations.caption_of(conversations.from_llava(row["conversations"]))
    caption = check_caption(caption, max_words)
    data = row.get("image")
    if not data and row.get("image_path"):
        data = read_media_bytes(row["image_path"], s3)
    image = resize_rgb(decode_image(data), size)
    return {"id": str(row["id"]), "image": image, "caption": caption, "objects": row.get("objects")}


# ---------------------------------------------------------------------------------------------
# videos


def resolve(base_file: str, rel: str) -> str:
    """``rel`` relative to the folder of ``base_file`` (local path or ``s3://`` URI) unless absolute."""
    if storage.is_s3(rel) or os.path.isabs(rel):
        return rel
    folder = base_file.rsplit("/", 1)[0]
    if storage.is_s3(base_file):
        return storage.join(folder, posixpath.normpath(rel))
    return os.path.normpath(os.path.join(folder, rel))


def parse_video_annotations(text: str, path: str) -> Iterator[dict | BadSample]:
    """Records of one jsonl file, or a ``BadSample('bad_annotation')`` per bad line (with ``.line``)."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ann = json.loads(line)
            if not isinstance(ann, dict):
                raise ValueError("not an object")
        except ValueError as e:
            err = BadSample("bad_annotation", "read", f"line {lineno}: {e}"[:200])
            err.line = lineno  # type: ignore[attr-defined]
            yield err
            continue
        missing = [k for k in ("id", "video") if not ann.get(k)]  # a missing caption is empty_caption later
        if missing:
            err = BadSample("bad_annotation", "read", f"line {lineno}: missing {missing}")
            err.line = lineno  # type: ignore[attr-defined]
            err.id = str(ann.get("id") or "")  # type: ignore[attr-defined]
            yield err
            continue
        hw = None
        if ann.get("height") and ann.get("width"):
            try:
                hw = [int(ann["height"]), int(ann["width"])]
            except (TypeError, ValueError):
                err = BadSample("bad_annotation", "read", f"line {lineno}: height/width not integers")
                err.line, err.id = lineno, str(ann["id"])  # type: ignore[attr-defined]
                yield err
                continue
        yield {
            "id": str(ann["id"]),
            "video": resolve(path, str(ann["video"])),
            "caption": ann.get("caption"),
            "qa": json.dumps(ann.get("qa") or [], sort_keys=True),
            "objects": json.dumps(ann.get("objects") or [], sort_keys=True),
            "hw": hw,
            "source": path,
            "line": lineno,
        }


def read_video_index(path: str, s3: S3Config | None = None) -> list[dict | BadSample]:
    """All records (or per-line ``BadSample``) of one annotation jsonl; raises ``BadSample`` if unreadable."""
    try:
        data = storage.read_bytes(path, s3)
    except Exception as e:  # noqa: BLE001
        raise _read_error(e, path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("unreadable_shard", "read", f"not UTF-8: {e}") from None
    return list(parse_video_annotations(text, path))


def read_clip_bytes(path: str, s3: S3Config | None = None) -> bytes:
    try:
        return storage.read_bytes(path, s3)
    except OSError as e:
        if _is_missing(e):
            raise BadSample("missing_file", "read", path) from None
        raise BadSample("corrupt_video", "read", f"{type(e).__name__}: {e}"[:300]) from None


def read_media_bytes(path: str, s3: S3Config | None = None) -> bytes:
    """An image file a record points at (``missing_file`` / ``unreadable_shard`` on failure)."""
    try:
        return storage.read_bytes(path, s3)
    except Exception as e:  # noqa: BLE001
        raise _read_error(e, path) from None


def load_video(record: dict, num_frames: Any, size: int, max_words: int, s3: S3Config | None = None,
               decoder: str = "pyav") -> dict:
    """An index record -> ``{id, frames: uint8[T,S,S,3], caption, qa, objects}`` (caption checked first).

    The clip is ``record["data"]`` when the record carries its bytes (a WebDataset member), else
    the file at ``record["video"]``; ``num_frames`` an int (uniform) or a ``FrameSampling``;
    ``decoder`` one of :data:`pipeline.data.decoders.DECODERS`."""
    caption = check_caption(record.get("caption"), max_words)
    data = record["data"] if record.get("data") is not None else read_clip_bytes(record["video"], s3)
    hw = record.get("hw")
    expect = tuple(hw) if hw else None
    if decoder == "pyav":
        frames = decode_video(data, num_frames, size, expect_hw=expect)
    else:
        from pipeline.data.decoders import decode

        frames = decode(data, num_frames, size, expect, decoder)
    return {"id": record["id"], "frames": frames, "caption": caption, "qa": record["qa"], "objects": record["objects"]}

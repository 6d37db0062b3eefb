"""WebDataset tar shards as video2dataset / img2dataset write them, local or ``s3://``.

A shard ``*.tar`` holds each sample as consecutive members sharing a key (the member name up to
the first dot of its basename): ``<key>.mp4`` (or webm, mkv, avi, mov) + ``<key>.json``
(metadata) + ``<key>.txt`` (caption) for videos, ``<key>.jpg`` (jpeg, png, webp) + ``txt`` +
``json`` for images. A sample's id is its json's ``id`` when it has one, else its key (video2dataset
keys are unique across shards), so ids are the same on every run. Its caption is ``txt``, else
the json's ``caption``; a json ``conversations`` list (LLaVA-style) makes it a conversation
sample; a json ``qa`` list is kept as native QA.

Read by one Ray Data task per shard, streamed member by member (``tarfile`` in stream mode over
a pyarrow input stream: one sequential GET on S3, O(one sample) memory), rather than with
``ray.data.read_webdataset``: that reader fails the whole dataset on a shard it cannot read,
decodes members by extension before we could quarantine them, and orders/keys rows its own
way, while this stream needs the same per-sample quarantine, ``sample_id``s and per-epoch skip
list as the other formats. A shard cut short yields the samples before the cut, then is
quarantined (``unreadable_shard``).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from typing import Any, Iterable, Iterator

from pipeline import storage
from pipeline.config import S3Config
from pipeline.data import conversations as conv
from pipeline.data.quarantine import BadSample

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def list_shards(root: str, s3: S3Config | None = None) -> list[str]:
    """``*.tar`` shards under ``root`` (recursive, sorted), or ``[root]`` if it is one."""
    if root.endswith(".tar"):
        return [root]
    return storage.list_files(root, ".tar", s3)


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, ext)`` of a member name (WebDataset's rule), ext lower-cased; None if it has no dot."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def iter_samples(path: str, s3: S3Config | None = None) -> Iterator[dict[str, Any]]:
    """``{"__key__": key, ext: bytes, ...}`` per sample of one shard, in tar order. A shard that
    cannot be opened raises ``BadSample`` before any sample; one cut short, after the samples
    read before the cut."""
    try:
        fs, p = storage.filesystem(path, s3)
        stream = fs.open_input_stream(p)
    except Exception as e:  # noqa: BLE001
        raise _read_error(e, path) from None
    cur: dict[str, Any] | None = None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                ke = split_name(m.name)
                if ke is None:
                    continue
                key, ext = ke
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                if cur is not None and cur["__key__"] != key:
                    yield cur
                    cur = None
                if cur is None:
                    cur = {"__key__": key}
                cur[ext] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        # the sample the cut went through may be incomplete: it is part of the quarantined rest
        raise _read_error(e, path) from None
    if cur is not None:
        yield cur


def _read_error(e: BaseException, path: str) -> BadSample:
    msg = str(e)
    if isinstance(e, FileNotFoundError) or "does not exist" in msg or "NoSuchKey" in msg:
        return BadSample("missing_file", "read", path)
    if isinstance(e, tarfile.ReadError) and "empty file" in msg:
        return BadSample("empty_file", "read", "zero-length tar shard")
    return BadSample("unreadable_shard", "read", f"{type(e).__name__}: {e}"[:300])


def sample_id(sample: dict[str, Any]) -> str:
    meta = _json(sample)
    rid = meta.get("id")
    return str(rid) if isinstance(rid, (str, int)) and str(rid) else str(sample["__key__"])


def _json(sample: dict[str, Any]) -> dict:
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise BadSample("bad_annotation", "read", f"{sample['__key__']}.json is not JSON: {e}"[:200]) from None
    if not isinstance(meta, dict):
        raise BadSample("bad_annotation", "read", f"{sample['__key__']}.json is not an object")
    return meta


def to_row(sample: dict[str, Any], kind: str) -> dict[str, Any]:
    """A sample -> a raw row ``{id, ext, data (the media bytes), caption, qa, objects, conversation}``
    for the ``kind`` ("video" | "image") stage; ``not_a_video`` / ``not_an_image`` when it holds
    no such member (a tar member of another type is not a video)."""
    meta = _json(sample)
    exts = VIDEO_EXTS if kind == "video" else IMAGE_EXTS
    ext = next((e for e in exts if e in sample), None)
    if ext is None:
        others = sorted(k for k in sample if k != "__key__")
        raise BadSample("not_a_video" if kind == "video" else "not_an_image", "read", f"members {others}")
    caption = sample.get("txt")
    caption = caption.decode("utf-8", "replace").strip() if isinstance(caption, bytes) else meta.get("caption")
    row: dict[str, Any] = {
        "id": sample_id(sample), "ext": ext, "data": sample[ext], "caption": caption,
        "qa": json.dumps(meta["qa"], sort_keys=True) if isinstance(meta.get("qa"), list) else "[]",
        "objects": json.dumps(meta["objects"], sort_keys=True) if meta.get("objects") is not None else None,
        "conversation": "",
    }
    if meta.get("conversations") is not None:
        messages = conv.from_llava(meta["conversations"])
        row["conversation"] = conv.dumps(messages)
        row["caption"] = row["caption"] or conv.caption_of(messages)
    return row


def count_samples(path: str, s3: S3Config | None = None) -> int:
    """Samples in one shard: video2dataset's ``<shard>_stats.json`` (``successes``) when present,
    else the distinct keys of the tar's headers (a seekable read that skips member data)."""
    stats = path[: -len(".tar")] + "_stats.json"
    try:
        if storage.exists(stats, s3):
            n = json.loads(storage.read_bytes(stats, s3)).get("successes")
            if isinstance(n, int):
                return n
    except Exception:  # noqa: BLE001  (no usable stats: count the headers)
        pass
    fs, p = storage.filesystem(path, s3)
    keys: set[str] = set()
    try:
        with fs.open_input_file(p) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                ke = split_name(m.name) if m.isfile() else None
                if ke:
                    keys.add(ke[0])
    except (tarfile.TarError, OSError, EOFError):
        pass  # counted what was readable; the stream quarantines the rest
    return len(keys)


# ---------------------------------------------------------------------------------------------
# writing (jobs/make_world.py --format webdataset)


def write_shard(path: str, samples: Iterable[dict[str, Any]]) -> None:
    """Write ``[{"__key__": key, ext: bytes | str | dict}, ...]`` as one tar, byte-reproducible
    (fixed mtime, owner and mode; members in the given order)."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, value in s.items():
                if ext == "__key__":
                    continue
                data = value if isinstance(value, bytes) else (
                    value.encode() if isinstance(value, str) else json.dumps(value, sort_keys=True).encode())
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                tar.addfile(info, io.BytesIO(data))


def shard_name(i: int) -> str:
    return f"{i:05d}.tar"  # video2dataset's naming


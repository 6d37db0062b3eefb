"""Stage-1 pseudo-video clips: k images, each repeated F frames, captions joined in order.

Inside a segment consecutive frames are the same array, so the residual ``X[t] - X[t-1]`` is
exactly zero there; at a cut (the first frame of segments 1..k-1) it is the difference of two
different images. (Two byte-identical consecutive images would give a zero cut: real data may
contain duplicates; nothing here depends on cuts being non-zero.)

Grouping is deterministic: the images of one shard, in file order or in a seeded permutation of
it (:func:`shard_order`), are taken k at a time; images that fail their checks are quarantined and
the next good image takes their place; a shard's last incomplete group is completed with the shard's
first images, so every good image is used.
"""

from __future__ import annotations

import json
import zlib
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

CAPTION_JOINER = " then "
PSEUDO_PREFIX = "pv:"


def join_captions(captions: Sequence[str]) -> str:
    """The target text of a pseudo-video: the image captions in segment order joined by ``" then "``.

    ``["a red circle", "a blue square"] -> "a red circle then a blue square"``. Each caption is
    stripped of surrounding whitespace; nothing else is changed.
    """
    return CAPTION_JOINER.join(c.strip() for c in captions)


def pseudo_video_id(ids: Sequence[str]) -> str:
    """Stable sample id from the source image ids in order: ``"pv:<id1>+<id2>+..."``."""
    return PSEUDO_PREFIX + "+".join(str(i) for i in ids)


def segment_starts(k: int, repeat: int) -> list[int]:
    """Frame index where each of the k segments starts: ``[0, F, 2F, ...]``."""
    return [i * repeat for i in range(k)]


def make_pseudo_video(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    ids: Sequence[str],
    repeat: int,
    objects: Sequence[str | None] | None = None,
) -> dict:
    """k images uint8 [S,S,3] (all the same shape) -> one pseudo-video sample.

    Returns ``{sample_id, frames: uint8 [k*F,S,S,3], caption, segments: [k starts], source_ids,
    objects: JSON list with one entry per segment (the image's object annotations or null)}``.
    """
    k = len(images)
    if not (k == len(captions) == len(ids)) or k == 0:
        raise ValueError(f"need k >= 1 images, captions and ids of the same length, got {k}, {len(captions)}, {len(ids)}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
        raise ValueError(f"images must share one [S,S,3] shape, got {sorted(shapes)}")
    frames = np.repeat(np.stack([np.asarray(im, dtype=np.uint8) for im in images]), repeat, axis=0)
    segs = []
    for obj in objects if objects is not None else [None] * k:
        segs.append(json.loads(obj) if isinstance(obj, str) and obj else obj)
    return {
        "sample_id": pseudo_video_id(ids),
        "frames": frames,
        "caption": join_captions(captions),
        "segments": segment_starts(k, repeat),
        "source_ids": [str(i) for i in ids],
        "objects": json.dumps(segs, sort_keys=True),
    }


def shard_order(n: int, seed: int | None, shard_key: str) -> np.ndarray:
    """Order in which a shard's n rows are grouped: file order (``seed=None``) or a permutation
    seeded by ``(seed, crc32(shard_key))`` (use the shard's file name, so adding shards does not
    change the groups of the others)."""
    if seed is None:
        return np.arange(n)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(shard_key.encode())])
    return rng.permutation(n)


def group_consecutive(items: Iterable[T], k: int) -> Iterator[list[T]]:
    """Consecutive groups of k. An incomplete last group is filled with the first items, so no
    image of the shard goes unused (a shard with fewer than k items yields nothing)."""
    group: list[T] = []
    head: list[T] = []
    for it in items:
        if len(head) < k:
            head.append(it)
        group.append(it)
        if len(group) == k:
            yield group
            group = []
    if group and len(head) == k:
        yield group + head[: k - len(group)]

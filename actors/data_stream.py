"""Ray Data streams of training samples over image/video shards (local or ``s3://``).

Three datasets, all lazy and streaming (Ray Data's streaming executor with its default
backpressure; nothing is materialised beyond the blocks in flight):

- :func:`image_dataset`: one task per parquet shard; rows ``{sample_id "img:<id>", kind "image",
  id, image uint8 [S,S,3], caption, objects (JSON), source}``.
- :func:`pseudo_video_dataset` (stage 1): one task per parquet shard decodes its images and groups
  k consecutive good images (file order or a seeded permutation per shard) into clips of k*F frames.
  A task holds one shard's encoded rows (not its decoded images) while grouping; groups never
  cross shards, and a resumed run re-decodes consumed shards to find its place (images decode fast).
- :func:`video_dataset` (stage 2): the driver reads the small jsonl annotation index (so decoding
  is spread over many tasks even when a data set ships one huge jsonl, and resumed runs skip
  consumed videos before any bytes are read); tasks read and decode ``batch_size`` clips each.

Training samples (pseudo and real video) share one schema::

    sample_id   str        stable: "pv:<id1>+<id2>+..." | "vid:<id>"
    kind        str        "pseudo_video" | "video"
    frames      uint8      [T,S,S,3]   (T = k*F for pseudo videos; for videos data.video_frames, or with
                                        data.sampling: fps the clip's own count, so T varies)
    caption     str        the target text (pseudo: captions joined in order, see join_captions)
    qa          str        JSON list of {question, answer, options, ...} ("[]" for pseudo videos)
    objects     str        JSON object annotations (pseudo: one entry per segment)
    segments    list[int]  frame index where each source image starts ([0] for videos)
    source_ids  list[str]  source image ids / the video id
    source      str        shard / annotation file the sample came from

Formats (``data.format``, :mod:`pipeline.data.sources`, docs/data.md): stage 1's task unit is a
parquet or tar shard, or ``data.index_rows`` LLaVA image records indexed on the driver; stage 2
reads LLaVA video records by their indexed byte spans, ``batch_size`` per task as the native
jsonl index, and WebDataset tars one task per shard. Samples of those formats add a
``conversation`` column (JSON messages, "" when none), the target :func:`pipeline.trainer.select_target`
then uses.

Order is deterministic: shards sorted by path, ``preserve_order`` set on the dataset's context.
Resume: pass the consumed ``sample_id``s as ``skip_ids``; the stream yields exactly the rest in the
same order. Bad input goes to the dataset's :class:`QuarantineLog` (``quarantine_of(ds)``).
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import ray
import ray.data

from pipeline.config import Config, DataConfig
from pipeline.data import readers, sources
from pipeline.data.pseudo_video import group_consecutive, make_pseudo_video, shard_order
from actors.quarantine import QuarantineLog
from pipeline.data.quarantine import BadSample, QuarantineRecord, format_counts
from actors.ray_utils import ensure_ray

SAMPLE_COLUMNS = ("sample_id", "kind", "frames", "caption", "qa", "objects", "segments", "source_ids", "source")
IMAGE_PREFIX = "img:"
VIDEO_PREFIX = "vid:"
_QUARANTINE_ATTR = "_score_quarantine"


def _resolve(cfg: Config | DataConfig) -> tuple[DataConfig, str | None]:
    if isinstance(cfg, Config):
        return cfg.data, cfg.run.ray_address
    if isinstance(cfg, DataConfig):
        return cfg, None
    raise TypeError(f"expected Config or DataConfig, got {type(cfg).__name__}")


def quarantine_of(ds: ray.data.Dataset) -> QuarantineLog:
    """The :class:`QuarantineLog` of a dataset returned by this module (not of derived datasets:
    pass your own ``quarantine=`` to keep the handle)."""
    log = getattr(ds, _QUARANTINE_ATTR, None)
    if log is None:
        raise ValueError("this dataset has no quarantine log attached; pass quarantine= when creating it")
    return log


def _finish(ds: ray.data.Dataset, log: QuarantineLog, name: str) -> ray.data.Dataset:
    # the context object is shared by every dataset derived from ``ds``
    ds.context.execution_options.preserve_order = True
    ds.set_name(name)
    setattr(ds, _QUARANTINE_ATTR, log)
    return ds


def _shard_items(units: list[dict], epochs: int | None = None) -> ray.data.Dataset:
    """One row (one task) per unit (:func:`pipeline.data.sources.image_units`: a shard, or a run
    of indexed LLaVA records), or per (epoch, unit) with an ``epoch`` column, epoch-major."""
    items = [{**u, "shard_index": i, **({} if e is None else {"epoch": e})}
             for e in _passes(epochs) for i, u in enumerate(units)]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def _passes(epochs: int | None) -> list[int | None]:
    """The data epochs of a dataset: ``[None]`` for a single pass without an ``epoch`` column."""
    return [None] if epochs is None else list(range(epochs))


def _to_batch(rows: list[dict], columns: Iterable[str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for c in columns:
        vals = [r[c] for r in rows]
        if isinstance(vals[0], np.ndarray) and len({v.shape for v in vals}) == 1:
            out[c] = np.stack(vals)  # (videos of different frame counts: an object array, ragged in Ray Data)
        else:
            arr = np.empty(len(vals), dtype=object)
            arr[:] = vals
            out[c] = arr
    return out


class _Emitter:
    """Collects samples into batches and quarantine records, flushing records before each batch."""

    def __init__(self, log: QuarantineLog, batch_size: int, columns: Iterable[str]):
        self.log, self.batch_size, self.columns = log, batch_size, tuple(columns)
        self.rows: list[dict] = []
        self.bad: list[QuarantineRecord] = []

    def add(self, row: dict) -> Iterator[dict[str, np.ndarray]]:
        self.rows.append(row)
        if len(self.rows) >= self.batch_size:
            yield from self.flush()

    def flush(self) -> Iterator[dict[str, np.ndarray]]:
        # records reach the actor before the batch that follows them reaches the consumer
        self.log.add(self.bad)
        self.bad = []
        if self.rows:
            batch, self.rows = _to_batch(self.rows, self.columns), []
            yield batch


def _unit(batch, j: int) -> dict:
    """Row ``j`` of a batch of unit items, as a dict (``path`` and what its format needs)."""
    return {c: batch[c][j] for c in batch}


def _read_shard_rows(unit: dict, fmt: str, dcfg: DataConfig, kind: str, em: _Emitter) -> list[dict]:
    """All rows (encoded) of a unit that could be read; an unreadable shard or tail is quarantined,
    and so is each record its format rejects on its own (``BadSample`` rows, with ``.id``)."""
    rows: list[dict] = []
    path = str(unit["path"])
    try:
        for row in sources.iter_unit_rows(unit, fmt, dcfg):
            if isinstance(row, BadSample):
                em.bad.append(QuarantineRecord.from_error(row, id=getattr(row, "id", ""), source=path, kind=kind))
            else:
                rows.append(row)
    except BadSample as e:
        em.bad.append(QuarantineRecord.from_error(e, id=os.path.basename(path), source=path, kind=kind))
    except Exception as e:  # noqa: BLE001
        em.bad.append(QuarantineRecord.unexpected(e, id=os.path.basename(path), source=path, kind=kind, stage="read"))
    return rows


def _good_images(rows: Iterable[dict], path: str, dcfg: DataConfig, kind: str, em: _Emitter,
                 skip: frozenset[str] = frozenset()) -> Iterator[dict]:
    for row in rows:
        rid = str(row.get("id") or "")
        if skip and (rid in skip or IMAGE_PREFIX + rid in skip):
            continue
        try:
            yield readers.load_image(row, dcfg.frame_size, dcfg.max_caption_words, dcfg.s3)
        except BadSample as e:
            em.bad.append(QuarantineRecord.from_error(e, id=rid, source=path, kind=kind))
        except Exception as e:  # noqa: BLE001
            em.bad.append(QuarantineRecord.unexpected(e, id=rid, source=path, kind=kind, stage="decode"))


# ---------------------------------------------------------------------------------------------
# map functions (run in Ray Data tasks)

_IMAGE_COLUMNS = ("sample_id", "kind", "id", "image", "caption", "objects", "source")


def _image_shards_fn(batch, *, dcfg: DataConfig, fmt: str, skip: frozenset[str], log: QuarantineLog):
    for j, path in enumerate(batch["path"]):
        path = str(path)
        em = _Emitter(log, dcfg.batch_size, _IMAGE_COLUMNS)
        rows = _read_shard_rows(_unit(batch, j), fmt, dcfg, "image", em)
        for img in _good_images(rows, path, dcfg, "image", em, skip):
            row = {"sample_id": IMAGE_PREFIX + img["id"], "kind": "image", "source": path, **img}
            row["objects"] = row["objects"] or ""
            yield from em.add(row)
        yield from em.flush()


def _epoch_of(batch, i: int) -> int | None:
    """Row ``i``'s data epoch, or None for a single-pass dataset (no ``epoch`` column)."""
    return int(batch["epoch"][i]) if "epoch" in batch else None


def _pseudo_shards_fn(batch, *, dcfg: DataConfig, fmt: str, seed: int | None,
                      skips: dict[int | None, frozenset[str]], log: QuarantineLog):
    kind = "pseudo_video"
    for j, path in enumerate(batch["path"]):
        path = str(path)
        epoch = _epoch_of(batch, j)
        skip = skips.get(epoch, frozenset())
        shard_seed = seed if seed is None or epoch is None else seed + epoch  # each epoch regroups
        em = _Emitter(log, dcfg.batch_size, SAMPLE_COLUMNS + (() if epoch is None else ("epoch",)))
        unit = _unit(batch, j)
        rows = _read_shard_rows(unit, fmt, dcfg, kind, em)
        order = shard_order(len(rows), shard_seed, sources.unit_key(unit))
        good = list(_good_images((rows[i] for i in order), path, dcfg, kind, em))
        if 0 < len(good) < dcfg.pseudo_images:  # not enough for one clip: count, never lose silently
            em.bad.extend(QuarantineRecord(id=g["id"], source=path, reason="too_few_images", stage="synthesize",
                                           kind=kind, detail=f"{len(good)} < {dcfg.pseudo_images}") for g in good)
        for group in group_consecutive(good, dcfg.pseudo_images):
            ids = [g["id"] for g in group]
            try:
                s = make_pseudo_video([g["image"] for g in group], [g["caption"] for g in group], ids,
                                      dcfg.pseudo_repeat, [g["objects"] for g in group])
            except Exception as e:  # noqa: BLE001
                for i in ids:
                    em.bad.append(QuarantineRecord.unexpected(e, id=i, source=path, kind=kind, stage="synthesize"))
                continue
            if s["sample_id"] in skip:
                continue
            s.update(kind=kind, qa="[]", source=path, epoch=epoch)
            yield from em.add(s)
        yield from em.flush()


def _videos_fn(batch, *, dcfg: DataConfig, log: QuarantineLog):
    from pipeline.data.video import FrameSampling

    sampling = FrameSampling.from_config(dcfg)  # data.frame_multiple: resolved by the stage driver
    kind = "video"
    em = _Emitter(log, dcfg.batch_size, SAMPLE_COLUMNS + (("epoch",) if "epoch" in batch else ()))
    for i in range(len(batch["id"])):
        h, w = int(batch["height"][i]), int(batch["width"][i])
        rec = {
            "id": str(batch["id"][i]), "video": str(batch["video"][i]), "caption": batch["caption"][i],
            "qa": str(batch["qa"][i]), "objects": str(batch["objects"][i]), "hw": (h, w) if h and w else None,
        }
        source = str(batch["source"][i])
        try:
            v = readers.load_video(rec, sampling, dcfg.frame_size, dcfg.max_caption_words, dcfg.s3, dcfg.decoder)
        except BadSample as e:
            em.bad.append(QuarantineRecord.from_error(e, id=rec["id"], source=rec["video"], kind=kind))
            continue
        except Exception as e:  # noqa: BLE001
            em.bad.append(QuarantineRecord.unexpected(e, id=rec["id"], source=rec["video"], kind=kind, stage="decode"))
            continue
        yield from em.add({
            "sample_id": VIDEO_PREFIX + v["id"], "kind": kind, "frames": v["frames"], "caption": v["caption"],
            "qa": v["qa"], "objects": v["objects"], "segments": [0], "source_ids": [v["id"]], "source": source,
            "epoch": _epoch_of(batch, i),
        })
    yield from em.flush()


_CONV_COLUMNS = SAMPLE_COLUMNS + ("conversation",)


def _emit_video(em: _Emitter, rec: dict | BadSample, dcfg: DataConfig, sampling: Any, source: str,
                epoch: int | None) -> Iterator[dict[str, np.ndarray]]:
    """Decode one llava/webdataset video record and add its sample (with its ``conversation``
    column, "" when it has none), or quarantine it."""
    kind = "video"
    if isinstance(rec, BadSample):
        em.bad.append(QuarantineRecord.from_error(rec, id=getattr(rec, "id", ""), source=source, kind=kind))
        return
    try:
        v = readers.load_video(rec, sampling, dcfg.frame_size, dcfg.max_caption_words, dcfg.s3, dcfg.decoder)
    except BadSample as e:
        em.bad.append(QuarantineRecord.from_error(e, id=rec["id"], source=rec["video"], kind=kind))
        return
    except Exception as e:  # noqa: BLE001
        em.bad.append(QuarantineRecord.unexpected(e, id=rec["id"], source=rec["video"], kind=kind, stage="decode"))
        return
    yield from em.add({
        "sample_id": VIDEO_PREFIX + v["id"], "kind": kind, "frames": v["frames"], "caption": v["caption"],
        "qa": v["qa"], "objects": v["objects"], "segments": [0], "source_ids": [v["id"]], "source": source,
        "conversation": rec.get("conversation") or "", "epoch": epoch,
    })


def _llava_videos_fn(batch, *, dcfg: DataConfig, log: QuarantineLog):
    """A batch of indexed LLaVA video records: ranged reads of their JSON, then decode."""
    from pipeline.data.video import FrameSampling

    sampling = FrameSampling.from_config(dcfg)
    em = _Emitter(log, dcfg.batch_size, _CONV_COLUMNS + (("epoch",) if "epoch" in batch else ()))
    items = [_unit(batch, i) for i in range(len(batch["id"]))]
    for i, rec in enumerate(sources.llava_video_rows(items, dcfg.s3)):
        if isinstance(rec, BadSample):
            rec.id = str(items[i]["id"])  # type: ignore[attr-defined]
        yield from _emit_video(em, rec, dcfg, sampling, str(items[i]["path"]), _epoch_of(batch, i))
    yield from em.flush()


def _wds_videos_fn(batch, *, dcfg: DataConfig, skips: dict[int | None, frozenset[str]], log: QuarantineLog):
    """One WebDataset tar shard per row: its samples streamed member by member, then decoded."""
    from pipeline.data.video import FrameSampling

    sampling = FrameSampling.from_config(dcfg)
    kind = "video"
    for j, path in enumerate(batch["path"]):
        path = str(path)
        epoch = _epoch_of(batch, j)
        skip = skips.get(epoch, frozenset())
        em = _Emitter(log, dcfg.batch_size, _CONV_COLUMNS + (() if epoch is None else ("epoch",)))
        try:
            for rec in sources.wds_video_rows(path, dcfg.s3):
                rid = str(getattr(rec, "id", "")) if isinstance(rec, BadSample) else rec["id"]
                if skip and (rid in skip or VIDEO_PREFIX + rid in skip):
                    continue
                yield from _emit_video(em, rec, dcfg, sampling, path, epoch)
        except BadSample as e:
            em.bad.append(QuarantineRecord.from_error(e, id=os.path.basename(path), source=path, kind=kind))
        except Exception as e:  # noqa: BLE001
            em.bad.append(QuarantineRecord.unexpected(e, id=os.path.basename(path), source=path, kind=kind, stage="read"))
        yield from em.flush()


# ---------------------------------------------------------------------------------------------
# public datasets


_EXPECTED = {"native": "image shards (*.parquet)", "hf_parquet": "parquet shards", "webdataset": "WebDataset shards (*.tar)",
             "llava": "LLaVA image records (.json/.jsonl/.yaml)"}


def _image_units(dcfg: DataConfig, log: QuarantineLog) -> tuple[list[dict], str]:
    """Stage 1's units and format (:func:`pipeline.data.sources.image_units`); records rejected
    while indexing LLaVA files go to ``log``."""
    fmt = sources.format_of(dcfg, "image")
    units, bad = sources.image_units(dcfg, fmt)
    log.add([QuarantineRecord.from_error(e, id=i, source=src, kind="image") for i, src, e in bad])
    if not units:
        raise FileNotFoundError(f"no {_EXPECTED[fmt]} under data.image_shards={dcfg.image_shards!r}")
    return units, fmt


def image_dataset(cfg: Config | DataConfig, *, skip_ids: Iterable[str] = (),
                  quarantine: QuarantineLog | None = None) -> ray.data.Dataset:
    """Decoded image-caption pairs (resized to ``frame_size``), shards in sorted order."""
    dcfg, address = _resolve(cfg)
    ensure_ray(address)
    log = quarantine or QuarantineLog()
    units, fmt = _image_units(dcfg, log)
    ds = _shard_items(units).map_batches(
        _image_shards_fn, batch_size=1, batch_format="numpy",
        fn_kwargs=dict(dcfg=dcfg, fmt=fmt, skip=frozenset(skip_ids), log=log),
    )
    return _finish(ds, log, "images")


def _epoch_skips(epochs: int | None, skip_ids: Iterable[str] | Mapping[int, Iterable[str]]
                 ) -> dict[int | None, frozenset[str]]:
    """``{epoch: ids}`` to skip (key None for a single pass, where ``skip_ids`` is a flat list)."""
    if epochs is None:
        if isinstance(skip_ids, Mapping):
            raise TypeError("skip_ids per epoch needs epochs=")
        return {None: frozenset(skip_ids)}
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    per = skip_ids if isinstance(skip_ids, Mapping) else {e: skip_ids for e in range(epochs)}
    return {int(e): frozenset(ids) for e, ids in per.items()}


def pseudo_video_dataset(cfg: Config | DataConfig, seed: int | None = 0, *,
                         skip_ids: Iterable[str] | Mapping[int, Iterable[str]] = (),
                         quarantine: QuarantineLog | None = None, epochs: int | None = None) -> ray.data.Dataset:
    """Stage-1 pseudo-video samples (see module doc); ``seed=None`` groups in file order.

    ``epochs=E``: E passes in ONE dataset (epoch-major, an ``epoch`` column; epoch ``e``
    regroups with ``seed + e``), and ``skip_ids`` may be ``{epoch: ids}``. One dataset rather
    than a union of E: Ray Data runs every branch of an order-preserving union at once, and a
    75-epoch union took about 6 minutes to yield its first batch."""
    dcfg, address = _resolve(cfg)
    ensure_ray(address)
    log = quarantine or QuarantineLog()
    skips = _epoch_skips(epochs, skip_ids)
    units, fmt = _image_units(dcfg, log)
    ds = _shard_items(units, epochs).map_batches(
        _pseudo_shards_fn, batch_size=1, batch_format="numpy",
        fn_kwargs=dict(dcfg=dcfg, fmt=fmt, seed=seed, skips=skips, log=log),
    )
    return _finish(ds, log, "pseudo_video")


def build_video_index(dcfg: DataConfig, log: QuarantineLog) -> list[dict]:
    """Driver side: every annotation record in shard order; bad lines, unreadable jsonl files and
    duplicate ids go to ``log``."""
    files = readers.list_video_annotations(dcfg.video_shards, dcfg.s3)
    if not files:
        raise FileNotFoundError(f"no video annotations (*.jsonl) under data.video_shards={dcfg.video_shards!r}")
    seen: set[str] = set()
    out: list[dict] = []
    bad: list[QuarantineRecord] = []
    for path in files:
        try:
            entries = readers.read_video_index(path, dcfg.s3)
        except BadSample as e:
            bad.append(QuarantineRecord.from_error(e, id=os.path.basename(path), source=path, kind="video"))
            continue
        for ent in entries:
            if isinstance(ent, BadSample):
                rid = getattr(ent, "id", "") or f"{os.path.basename(path)}:{getattr(ent, 'line', '?')}"
                bad.append(QuarantineRecord.from_error(ent, id=rid, source=path, kind="video"))
                continue
            if ent["id"] in seen:
                bad.append(QuarantineRecord(id=ent["id"], source=path, reason="bad_annotation", stage="read",
                                            kind="video", detail=f"line {ent['line']}: duplicate id"))
                continue
            seen.add(ent["id"])
            hw = ent.pop("hw")
            ent["height"], ent["width"] = (hw or (0, 0))
            ent["caption"] = ent["caption"] if isinstance(ent["caption"], str) else ""
            out.append(ent)
    log.add(bad)
    return out


def video_dataset(cfg: Config | DataConfig, *, skip_ids: Iterable[str] | Mapping[int, Iterable[str]] = (),
                  quarantine: QuarantineLog | None = None, epochs: int | None = None) -> ray.data.Dataset:
    """Stage-2 real-video samples: T frames sampled uniformly, resized to ``frame_size``.

    ``epochs=E``: E passes over the index in ONE dataset (epoch-major, an ``epoch`` column;
    the annotations are read, and their bad lines counted, once), and ``skip_ids`` may be
    ``{epoch: ids}``; see :func:`pseudo_video_dataset` for why not a union."""
    dcfg, address = _resolve(cfg)
    ensure_ray(address)
    log = quarantine or QuarantineLog()
    skips = _epoch_skips(epochs, skip_ids)
    fmt = sources.format_of(dcfg, "video")
    if fmt == "webdataset":  # one task per tar shard: the driver never reads the clips
        from pipeline.data import webdataset

        paths = webdataset.list_shards(dcfg.video_shards, dcfg.s3)
        if not paths:
            raise FileNotFoundError(f"no WebDataset shards (*.tar) under data.video_shards={dcfg.video_shards!r}")
        ds = _shard_items([{"path": p} for p in paths], epochs).map_batches(
            _wds_videos_fn, batch_size=1, batch_format="numpy", fn_kwargs=dict(dcfg=dcfg, skips=skips, log=log))
        return _finish(ds, log, "video")
    entries = build_video_index(dcfg, log) if fmt == "native" else _llava_video_index(dcfg, log)
    index = [ent if e is None else {**ent, "epoch": e} for e in _passes(epochs) for ent in entries
             if not {ent["id"], VIDEO_PREFIX + ent["id"]} & skips.get(e, frozenset())]
    per_block = dcfg.batch_size
    ds = ray.data.from_items(index, override_num_blocks=max(1, math.ceil(len(index) / per_block)))
    ds = ds.map_batches(_videos_fn if fmt == "native" else _llava_videos_fn, batch_size=per_block,
                        batch_format="numpy", fn_kwargs=dict(dcfg=dcfg, log=log))
    return _finish(ds, log, "video")


def _llava_video_index(dcfg: DataConfig, log: QuarantineLog) -> list[dict]:
    """Driver side: the byte spans of every LLaVA video record (:mod:`pipeline.data.llava`: each
    file is scanned once here, and tasks read back only their records); bad records go to ``log``."""
    from pipeline.data import llava

    idx = llava.build_index(dcfg.video_shards, "video", dcfg.s3, dcfg.video_folder)
    log.add([QuarantineRecord.from_error(e, id=i, source=src, kind="video") for i, src, e in idx.bad])
    if not idx.entries:
        raise FileNotFoundError(f"no LLaVA video records under data.video_shards={dcfg.video_shards!r} "
                                f"({idx.other_kind} image records: those feed stage 1; {len(idx.bad)} quarantined)")
    return idx.entries


# ---------------------------------------------------------------------------------------------
# summary


@dataclass
class StreamSummary:
    samples: int = 0
    per_kind: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    frame_shapes: list[tuple] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)

    @property
    def clips_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    def __str__(self) -> str:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.per_kind.items())) or "none"
        shapes = ", ".join("x".join(map(str, s)) for s in self.frame_shapes)
        return (
            f"streamed {self.samples} samples ({kinds}) in {self.seconds:.1f} s, {self.clips_per_s:.1f} clips/s"
            + (f"; frames {shapes}" if shapes else "")
            + "\n" + format_counts(self.quarantined)
        )


def summarize_stream(ds: ray.data.Dataset, quarantine: QuarantineLog | None = None, *,
                     limit: int | None = None, batch_size: int = 8, keep_ids: bool = False) -> StreamSummary:
    """Iterate ``ds`` (up to ``limit`` samples): samples per kind, quarantine counts by reason, clips/s.

    The quarantine counts are the log's counts after the iteration (the whole log if it is shared).
    """
    log = quarantine or quarantine_of(ds)
    s = StreamSummary()
    kinds: Counter[str] = Counter()
    shapes: list[tuple] = []
    t0 = time.perf_counter()
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        n = len(batch["sample_id"])
        if limit is not None:
            n = min(n, limit - s.samples)
        key = "frames" if "frames" in batch else "image"
        for i in range(n):
            kinds[str(batch["kind"][i])] += 1
            shp = tuple(np.asarray(batch[key][i]).shape)
            if shp not in shapes:
                shapes.append(shp)
            if keep_ids:
                s.sample_ids.append(str(batch["sample_id"][i]))
        s.samples += n
        if limit is not None and s.samples >= limit:
            break
    s.seconds = time.perf_counter() - t0
    s.per_kind = dict(kinds)
    s.frame_shapes = shapes
    s.quarantined = log.counts()
    return s


def iter_samples(ds: ray.data.Dataset, batch_size: int = 8) -> Iterator[dict[str, Any]]:
    """Row dicts from a sample dataset, in order (a thin convenience over ``iter_batches``)."""
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        cols = list(batch)
        for i in range(len(batch[cols[0]])):
            yield {c: batch[c][i] for c in cols}

"""Which format a data path holds, and the pure reading steps each format shares with the stream.

``data.format`` (docs/data.md) names the layout of ``data.image_shards`` (stage 1) and
``data.video_shards`` (stage 2); ``auto`` detects it per path (:func:`detect`):

============== ================================================= ==========================================
format          stage 1 (images)                                   stage 2 (videos)
============== ================================================= ==========================================
``native``      ``shard-*.parquet``: id, image bytes, caption       mp4 + ``annotations-*.jsonl`` (id, video, caption, qa)
``llava``       LLaVA JSON/JSONL/YAML mixture, ``image`` records    the same, ``video`` records (conversations)
``webdataset``  ``*.tar``: ``<key>.jpg|png`` + txt + json            ``*.tar``: ``<key>.mp4`` + txt + json
``hf_parquet``  parquet, ``image`` = HF Image struct {bytes, path}   (images only)
============== ================================================= ==========================================

Every format ends in the same rows: stage 1 ``{id, image | image_path, caption | conversations,
objects}`` for :func:`pipeline.data.readers.load_image`, stage 2 ``{id, video | data, caption,
qa, objects, conversation}`` for :func:`pipeline.data.readers.load_video`. The Ray side
(:mod:`actors.data_stream`) cuts them into tasks: stage 1 one task per *unit* (a parquet or tar
shard, or ``data.index_rows`` indexed LLaVA records; a pseudo-video never crosses a unit), stage
2 a task per batch of indexed records (native, llava) or per tar shard (webdataset).
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import ConfigError, DataConfig, S3Config
from pipeline.data import llava, readers, webdataset
from pipeline.data.quarantine import BadSample

FORMATS = ("native", "llava", "webdataset", "hf_parquet")
HF_CAPTION_COLUMNS = ("caption", "text", "conversations")


# ---------------------------------------------------------------------------------------------
# detection


def _first_record(path: str, s3: S3Config | None) -> Any:
    for _, _, _, obj in llava.scan(path, s3):
        return obj
    return None


def _parquet_format(path: str, s3: S3Config | None) -> str:
    fs, p = storage.filesystem(path, s3)
    try:
        with fs.open_input_file(p) as f:
            schema = pq.ParquetFile(f).schema_arrow
    except Exception:  # noqa: BLE001  (an unreadable shard: the native reader quarantines it)
        return "native"
    img = schema.field("image").type if "image" in schema.names else None
    if img is not None and pa.types.is_struct(img):
        return "hf_parquet"
    if img is not None and "id" in schema.names and "caption" in schema.names:
        return "native"
    return "hf_parquet" if img is not None else "native"


_DETECTED: dict[tuple[str, str | None], str] = {}


def detect(path: str, s3: S3Config | None = None) -> str:
    """The format of a data path (module doc): by suffix for a file, by the files under a
    folder (tar -> webdataset; parquet -> its schema; jsonl -> its first record; json -> llava;
    the folder's own files first, its subfolders only when those decide nothing, so a folder of
    178K clips is not listed for it); ``native`` when nothing is there (the native reader then
    names what it expected). Remembered per path in this process (a stage asks several times)."""
    key = (str(path), storage.s3_endpoint(s3) if storage.is_s3(path) else None)
    if key not in _DETECTED:
        fmt = _detect(path, s3)
        if fmt == "native" and not storage.exists(path, s3):
            return fmt  # nothing there yet: not remembered
        _DETECTED[key] = fmt
    return _DETECTED[key]


def _list(path: str, s3: S3Config | None, recursive: bool) -> list[str]:
    fs, p = storage.filesystem(path, s3)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=recursive, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    return [f"s3://{f}" for f in files] if storage.is_s3(path) else files


def _detect(path: str, s3: S3Config | None) -> str:
    low = str(path).lower()
    if low.endswith(llava.YAML_SUFFIXES + (".json",)):
        return "llava"
    if low.endswith(".tar"):
        return "webdataset"
    if low.endswith(".parquet"):
        return _parquet_format(path, s3)
    if low.endswith(".jsonl"):
        try:
            rec = _first_record(path, s3)
        except Exception:  # noqa: BLE001  (unreadable: the reader quarantines it)
            rec = None
        return "llava" if isinstance(rec, dict) and "conversations" in rec else "native"
    for recursive in (False, True):
        try:
            files = _list(path, s3, recursive)
        except Exception:  # noqa: BLE001
            return "native"
        fmt = _by_files(files, s3)
        if fmt is not None:
            return fmt
    return "native"


def _by_files(files: list[str], s3: S3Config | None) -> str | None:
    by = lambda suf: [f for f in files if f.lower().endswith(suf)]  # noqa: E731
    if by(".tar"):
        return "webdataset"
    if by(".parquet"):
        return _parquet_format(by(".parquet")[0], s3)
    if by(".jsonl"):
        try:
            rec = _first_record(by(".jsonl")[0], s3)
        except Exception:  # noqa: BLE001
            rec = None
        return "llava" if isinstance(rec, dict) and "conversations" in rec else "native"
    if by(".json"):
        return "llava"
    return None


def format_of(dcfg: DataConfig, kind: str) -> str:
    """The format of ``data.image_shards`` (kind "image") or ``data.video_shards`` ("video")."""
    path = dcfg.image_shards if kind == "image" else dcfg.video_shards
    fmt = detect(path, dcfg.s3) if dcfg.format == "auto" else dcfg.format
    if fmt == "hf_parquet" and kind == "video":
        raise ConfigError("config: data.video_shards: hf_parquet holds images (stage 1); videos come as native, llava or webdataset")
    return fmt


def check_sources(dcfg: DataConfig) -> None:
    """What must hold before any Ray work (ConfigError, one line): a mixture names only files
    that exist, the formats fit their stages, the decoder is installed."""
    from pipeline.data.decoders import DecoderUnavailable, check_decoder

    try:
        check_decoder(dcfg.decoder)
    except DecoderUnavailable as e:
        raise ConfigError(f"config: {e}") from None
    for kind in ("image", "video"):
        path = dcfg.image_shards if kind == "image" else dcfg.video_shards
        if llava.is_mixture(path):
            llava.mixture(path, dcfg.s3, setting=f"data.{kind}_shards")
            continue
        try:
            there = storage.exists(path, dcfg.s3)
        except Exception:  # noqa: BLE001  (an unreachable store: the stream names it when it reads)
            there = False
        if there:
            format_of(dcfg, kind)


# ---------------------------------------------------------------------------------------------
# stage 1: units and their raw rows


def hf_columns(names: list[str]) -> tuple[str, str]:
    cap = next((c for c in HF_CAPTION_COLUMNS if c in names), None)
    if "image" not in names or cap is None:
        raise BadSample("unreadable_shard", "read", f"schema {names} lacks an 'image' column or one of {list(HF_CAPTION_COLUMNS)}")
    return "image", cap


def iter_hf_image_shard(path: str, s3: S3Config | None = None, folder: str | None = None,
                        batch_rows: int = 256) -> Iterator[dict]:
    """Rows of a Hugging Face image parquet: ``image`` a ``{bytes, path}`` struct (the HF Image
    feature; a path without bytes is read from ``folder``, default the shard's folder) or plain
    bytes; the caption from ``caption`` / ``text`` or LLaVA ``conversations``; ``id`` when the
    shard has one, else ``<file>:<row>`` (stable: the row's place in the file)."""
    f, pf = readers.open_parquet(path, s3)
    names = pf.schema_arrow.names
    try:
        img_col, cap_col = hf_columns(names)
    except BadSample:
        f.close()
        raise
    cols = [c for c in ("id", img_col, cap_col, "objects") if c in names]
    base = folder or path.rsplit("/", 1)[0]
    name = posixpath.basename(path)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            data = {c: batch.column(c).to_pylist() for c in cols}
            for i in range(batch.num_rows):
                img = data[img_col][i]
                image, image_path = (img.get("bytes"), img.get("path")) if isinstance(img, dict) else (img, None)
                out = {"id": str(data["id"][i]) if "id" in data and data["id"][i] not in (None, "") else f"{name}:{row}",
                       "image": image, "objects": data["objects"][i] if "objects" in data else None}
                if not image and image_path:
                    out["image_path"] = llava.resolve_media(base, image_path)
                if cap_col == "conversations":
                    out["conversations"] = data[cap_col][i]
                else:
                    out["caption"] = data[cap_col][i]
                row += 1
                yield out
    except (pa.ArrowException, OSError) as e:
        raise readers._read_error(e, path) from None
    finally:
        f.close()


def image_units(dcfg: DataConfig, fmt: str) -> tuple[list[dict], list[tuple[str, str, BadSample]]]:
    """Stage 1's units (module doc) in order, and the records quarantined while indexing them."""
    root = dcfg.image_shards
    if fmt in ("native", "hf_parquet"):
        paths = readers.list_image_shards(root, dcfg.s3) if not root.endswith(".parquet") else [root]
        return [{"path": p} for p in paths], []
    if fmt == "webdataset":
        return [{"path": p} for p in webdataset.list_shards(root, dcfg.s3)], []
    if fmt == "llava":
        idx = llava.build_index(root, "image", dcfg.s3, dcfg.image_folder)
        units = []
        for start in range(0, len(idx.entries), dcfg.index_rows):
            chunk = idx.entries[start:start + dcfg.index_rows]
            first = chunk[0]
            units.append({"path": first["path"], "key": f"{posixpath.basename(first['path'])}@{first['row']}",
                          "rows": json.dumps([[e["id"], e["path"], e["offset"], e["length"], e["folder"]] for e in chunk])})
        return units, idx.bad
    raise ValueError(f"unknown data format {fmt!r}")


def unit_key(unit: dict) -> str:
    """What seeds a unit's shuffle (a parquet/tar shard: its file name, as the native stream)."""
    return unit.get("key") or os.path.basename(str(unit["path"]))


def iter_unit_rows(unit: dict, fmt: str, dcfg: DataConfig) -> Iterator[dict | BadSample]:
    """Raw image rows of one stage-1 unit, in order; a per-record failure is yielded as a
    ``BadSample`` with ``.id``; a unit that stops being readable raises after the rows before."""
    path = str(unit["path"])
    if fmt == "native":
        yield from readers.iter_image_shard(path, dcfg.s3)
    elif fmt == "hf_parquet":
        yield from iter_hf_image_shard(path, dcfg.s3, dcfg.image_folder)
    elif fmt == "webdataset":
        for s in webdataset.iter_samples(path, dcfg.s3):
            try:
                r = webdataset.to_row(s, "image")
            except BadSample as e:
                e.id = _wds_id(s)  # type: ignore[attr-defined]
                yield e
                continue
            yield {"id": r["id"], "image": r["data"], "caption": r["caption"], "objects": r["objects"]}
    elif fmt == "llava":
        rows = json.loads(unit["rows"])
        by_path: dict[str, list[int]] = {}
        for j, (_, p, *_rest) in enumerate(rows):
            by_path.setdefault(p, []).append(j)
        objs: list[Any] = [None] * len(rows)
        for p, js in by_path.items():
            try:
                for j, obj in zip(js, llava.read_spans(p, [(rows[j][2], rows[j][3]) for j in js], dcfg.s3)):
                    objs[j] = obj
            except Exception as e:  # noqa: BLE001  (the file changed or went away since it was indexed)
                for j in js:
                    objs[j] = readers._read_error(e, p) if not isinstance(e, ValueError) else \
                        BadSample("bad_annotation", "read", f"record changed since indexing: {e}"[:200])
        for (rid, _, _, _, folder), obj in zip(rows, objs):
            try:
                if isinstance(obj, BadSample):
                    raise obj
                r = llava.to_row(obj, rid, folder)
            except BadSample as e:
                e.id = rid  # type: ignore[attr-defined]
                yield e
                continue
            yield {"id": rid, "image_path": r["media"], "caption": r["caption"], "objects": r["objects"]}
    else:
        raise ValueError(f"unknown data format {fmt!r}")


def _wds_id(sample: dict) -> str:
    """A WebDataset sample's id for its quarantine record (its key when its json is bad too)."""
    try:
        return webdataset.sample_id(sample)
    except BadSample:
        return str(sample["__key__"])


# ---------------------------------------------------------------------------------------------
# stage 2 rows


def llava_video_rows(items: list[dict], s3: S3Config | None) -> list[dict | BadSample]:
    """Index items ``{id, path, offset, length, folder}`` -> video records for ``load_video``
    (``{id, video, caption, qa, objects, conversation}``) or a ``BadSample`` each, in order."""
    out: list[dict | BadSample] = [None] * len(items)  # type: ignore[list-item]
    by_path: dict[str, list[int]] = {}
    for j, it in enumerate(items):
        by_path.setdefault(it["path"], []).append(j)
    for p, js in by_path.items():
        try:
            objs = llava.read_spans(p, [(int(items[j]["offset"]), int(items[j]["length"])) for j in js], s3)
        except Exception as e:  # noqa: BLE001
            objs = [readers._read_error(e, p)] * len(js)
        for j, obj in zip(js, objs):
            try:
                if isinstance(obj, BadSample):
                    raise obj
                r = llava.to_row(obj, str(items[j]["id"]), str(items[j]["folder"]))
                out[j] = {"id": r["id"], "video": r["media"], "caption": r["caption"], "qa": r["qa"],
                          "objects": r["objects"] or "[]", "conversation": r["conversation"], "hw": None}
            except BadSample as e:
                out[j] = e
    return out


def wds_video_rows(path: str, s3: S3Config | None) -> Iterator[dict | BadSample]:
    """Video records of one tar shard for ``load_video`` (the clip's bytes in ``data``), or a
    ``BadSample`` with ``.id`` per bad sample; raises after the good ones if the shard breaks."""
    for s in webdataset.iter_samples(path, s3):
        try:
            r = webdataset.to_row(s, "video")
        except BadSample as e:
            e.id = _wds_id(s)  # type: ignore[attr-defined]
            yield e
            continue
        yield {"id": r["id"], "data": r["data"], "video": f"{path}#{s['__key__']}.{r['ext']}", "caption": r["caption"],
               "qa": r["qa"], "objects": r["objects"] or "[]", "conversation": r["conversation"], "hw": None}


# ---------------------------------------------------------------------------------------------
# sizes


def epoch_size(dcfg: DataConfig, stage: str) -> int | None:
    """Samples one pass yields (an upper bound) for the non-native formats; None for native
    (the stage driver reads parquet metadata / the jsonl index itself)."""
    kind = "image" if stage == "pseudo_video" else "video"
    fmt = format_of(dcfg, kind)
    if fmt == "native":
        return None
    root = dcfg.image_shards if kind == "image" else dcfg.video_shards
    if fmt == "llava":
        n = len(llava.build_index(root, kind, dcfg.s3, dcfg.image_folder if kind == "image" else dcfg.video_folder).entries)
    elif fmt == "webdataset":
        n = sum(webdataset.count_samples(p, dcfg.s3) for p in webdataset.list_shards(root, dcfg.s3))
    else:
        n = 0
        for u in image_units(dcfg, fmt)[0]:
            fs, p = storage.filesystem(u["path"], dcfg.s3)
            with fs.open_input_file(p) as f:
                n += pq.ParquetFile(f).metadata.num_rows
    return n // dcfg.pseudo_images if kind == "image" else n


def kind_of(path: str, dcfg: DataConfig) -> str:
    """Whether a data path holds images (stage 1) or videos (stage 2): by its format, and for
    llava / webdataset by its first usable record (``jobs/inspect_data.py PATH``)."""
    fmt = detect(path, dcfg.s3) if dcfg.format == "auto" else dcfg.format
    if fmt == "hf_parquet":
        return "image"
    if fmt == "native":
        low = path.lower()
        if low.endswith(".parquet"):
            return "image"
        return "image" if readers.list_image_shards(path, dcfg.s3) else "video"
    if fmt == "webdataset":
        for p in webdataset.list_shards(path, dcfg.s3):
            for s in webdataset.iter_samples(p, dcfg.s3):
                if any(e in s for e in webdataset.VIDEO_EXTS):
                    return "video"
                if any(e in s for e in webdataset.IMAGE_EXTS):
                    return "image"
        return "video"
    for ent in llava.mixture(path, dcfg.s3):
        for sp in llava.index_file(ent.json_path, dcfg.s3).spans.values():
            return sp.kind
    return "video"

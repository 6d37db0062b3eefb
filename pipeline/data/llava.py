"""LLaVA-style JSON / JSONL data (LLaVA-Video-178K, LLaVA-OneVision, ShareGPT4Video,
LLaVA-Pretrain-558K), local or ``s3://``, and the YAML mixtures LLaVA-NeXT trains on.

A record is ``{"id", "video" | "image", "conversations": [{"from", "value"}, ...], ...}``; its
media path is relative to a media folder (the mixture entry's / the YAML's ``video_folder`` or
``image_folder``, else ``data.video_folder`` / ``data.image_folder``, else the JSON file's own
folder). ``data.video_shards`` / ``data.image_shards`` name one ``.json`` / ``.jsonl`` file, a
folder of them, or a YAML mixture::

    datasets:                      # LLaVA-NeXT's format; json_path relative to the YAML's folder
      - json_path: llava_video_178k_part1.json
        sampling_strategy: all     # all | first:N | end:N | random:N  (N a count or a percentage, 10%)
      - json_path: sharegpt4video.jsonl
        sampling_strategy: "random:50%"
    video_folder: /data/videos     # optional, here or per entry (image_folder alike)

A bare ``N`` or ``N%`` means ``random:N`` / ``random:N%``; ``random`` picks a subset seeded by
the JSON path (the same rows every run) and keeps file order. A mixture naming a file that does
not exist is a :class:`~pipeline.config.ConfigError` before any Ray work (:func:`mixture`).

**Index, not load.** These files are often ONE JSON array of 100+ MB, and a Ray Data task that
needs three records must not parse all of it (nor should every task hold it). The driver scans
each file ONCE (:func:`index_file`): a streaming parse, ``json.JSONDecoder.raw_decode`` over
4 MB chunks with the bytes read as latin-1 so a character offset is a byte offset, keeping per
record only ``(row, byte offset, length, id, kind)`` and its verdict (a bad conversation is
quarantined here, once). Read tasks get those spans and read back exactly their records' bytes
(:func:`read_spans`: one ranged read each, a ranged GET on S3) and parse only those. The driver
holds a few chunks plus the largest record and the spans, never the file (measured: a 156 MB
array of 110K LLaVA-Video records indexed in 1.6 s, +55 MB resident); the index is cached per
``(path, size, mtime)`` so a stage that sizes its epochs and then streams scans once. Splitting
into row ranges instead would make every task parse the array up to its range; streaming the
file through one task would serialise all decoding behind it.
"""

from __future__ import annotations

import json
import os
import posixpath
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import numpy as np
import pyarrow.fs as pafs
import yaml

from pipeline import storage
from pipeline.config import ConfigError, S3Config
from pipeline.data import conversations as conv
from pipeline.data.quarantine import BadSample

JSON_SUFFIXES = (".json", ".jsonl")
YAML_SUFFIXES = (".yaml", ".yml")
CHUNK_BYTES = 4 << 20
MAX_RECORD_BYTES = 64 << 20  # a record that does not parse within this much more text is malformed


class Span(NamedTuple):
    """One indexed record: its row in the file, byte offset and length, id and media kind."""

    row: int
    offset: int
    length: int
    id: str
    kind: str  # "video" | "image"


@dataclass
class FileIndex:
    path: str
    rows: int = 0  # records in the file (good and bad)
    spans: dict[int, Span] = field(default_factory=dict)  # row -> span, good records only
    bad: dict[int, tuple[str, BadSample]] = field(default_factory=dict)  # row -> (id, error)
    fatal: BadSample | None = None  # the file stops being readable here (rows after it are lost, counted once)


@dataclass(frozen=True)
class MixEntry:
    json_path: str
    strategy: str = "all"
    image_folder: str | None = None
    video_folder: str | None = None


# ---------------------------------------------------------------------------------------------
# mixtures


def is_mixture(path: str) -> bool:
    return str(path).lower().endswith(YAML_SUFFIXES)


def _rel(base_file: str, p: str) -> str:
    if storage.is_s3(p) or os.path.isabs(p):
        return p
    folder = base_file.rsplit("/", 1)[0] if "/" in base_file else "."
    return storage.join(folder, posixpath.normpath(p)) if storage.is_s3(base_file) else os.path.normpath(os.path.join(folder, p))


def parse_strategy(strategy: Any) -> tuple[str, int | None, bool]:
    """``(how, n, percent)`` of a sampling strategy, or ValueError naming it."""
    s = str(strategy).strip().lower()
    if s == "all":
        return "all", None, False
    how, _, num = s.rpartition(":")
    how = how or "random"
    pct = num.endswith("%")
    try:
        n = int(num[:-1] if pct else num)
    except ValueError:
        n = -1
    if how not in ("first", "end", "random") or n < 0 or (pct and n > 100):
        raise ValueError(f"sampling_strategy {strategy!r}: expected all, first:N, end:N or random:N (N a count or a percentage)")
    return how, n, pct


def select_rows(rows: int, strategy: str, key: str) -> np.ndarray:
    """The row numbers a strategy keeps out of ``rows``, in file order (``key`` seeds ``random``)."""
    how, n, pct = parse_strategy(strategy)
    if how == "all":
        return np.arange(rows)
    k = min(rows, -(-n * rows // 100) if pct else n)  # LLaVA-NeXT rounds a percentage up
    if how == "first":
        return np.arange(k)
    if how == "end":
        return np.arange(rows - k, rows)
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return np.sort(rng.permutation(rows)[:k])


def mixture(path: str, s3: S3Config | None = None, *, setting: str = "data") -> list[MixEntry]:
    """The files a llava-format path stands for: a YAML mixture's entries (each checked to exist:
    a missing one is a ConfigError naming it), one JSON/JSONL file, or every JSON/JSONL file
    under a folder (sorted), each with ``sampling_strategy: all``."""
    if is_mixture(path):
        try:
            text = storage.read_bytes(path, s3).decode("utf-8")
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"config: {setting}: cannot read the mixture {path!r} ({type(e).__name__}: {e})"[:300]) from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {setting}: {path!r} is not valid YAML ({type(e).__name__})") from None
        items = tree.get("datasets") if isinstance(tree, dict) else None
        if not isinstance(items, list) or not items:
            raise ConfigError(f"config: {setting}: {path!r} has no 'datasets:' list (LLaVA-NeXT mixture format)")
        out = []
        for i, it in enumerate(items):
            if not isinstance(it, dict) or not isinstance(it.get("json_path"), str):
                raise ConfigError(f"config: {setting}: {path!r} datasets[{i}] has no json_path")
            jp = _rel(path, it["json_path"])
            strategy = str(it.get("sampling_strategy", "all"))
            try:
                parse_strategy(strategy)
            except ValueError as e:
                raise ConfigError(f"config: {setting}: {path!r} datasets[{i}]: {e}") from None
            if not storage.exists(jp, s3):
                raise ConfigError(f"config: {setting}: the mixture {path!r} names a missing file: {it['json_path']!r} ({jp})")
            folders = {k: _rel(path, v) if isinstance(v := it.get(k, tree.get(k)), str) else None
                       for k in ("image_folder", "video_folder")}
            out.append(MixEntry(jp, strategy, **folders))
        return out
    fs, p = storage.filesystem(path, s3)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        return [MixEntry(path)]
    files = [f for f in storage.list_files(path, "", s3) if f.lower().endswith(JSON_SUFFIXES)]
    return [MixEntry(f) for f in files]


# ---------------------------------------------------------------------------------------------
# indexing


def _stream_text(path: str, s3: S3Config | None) -> Iterator[str]:
    fs, p = storage.filesystem(path, s3)
    with fs.open_input_stream(p) as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            if not chunk:
                return
            yield chunk.decode("latin-1")  # one char per byte: offsets in the text are byte offsets


def _parse(seg: str) -> Any:
    """A record's JSON text (latin-1 view of its bytes) -> the object, strings decoded as UTF-8."""
    return json.loads(seg if seg.isascii() else seg.encode("latin-1"))


def scan(path: str, s3: S3Config | None = None) -> Iterator[tuple[int, int, int, Any]]:
    """``(row, offset, length, object)`` of each record of a JSON array or a JSONL file, in order,
    streaming; a record that is not JSON gives a ``BadSample('bad_annotation')`` in a JSONL file
    (the next line goes on) and ends the scan in an array (``BadSample('unreadable_shard')``: an
    array has no next line to resynchronise on)."""
    dec = json.JSONDecoder()
    chunks = _stream_text(path, s3)
    buf, base, pos, eof = "", 0, 0, False

    def more() -> bool:
        nonlocal buf, eof
        if eof:
            return False
        nxt = next(chunks, None)
        if nxt is None:
            eof = True
            return False
        buf += nxt
        return True

    def skip_ws() -> bool:  # True when a non-space character is at pos
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return pos < len(buf)

    if not skip_ws():
        return
    array = buf[pos] == "["
    row = 0
    if array:
        pos += 1
    while True:
        if not skip_ws():
            if array:
                yield row, base + pos, 0, BadSample("unreadable_shard", "read", "the JSON array is not closed (truncated file?)")
            return
        if array and buf[pos] == "]":
            return
        if pos > CHUNK_BYTES:  # drop what is consumed (only here: nothing points into it)
            buf, base, pos = buf[pos:], base + pos, 0
        start = pos
        if array:
            while True:
                try:
                    obj, end = dec.raw_decode(buf, start)
                    break
                except json.JSONDecodeError as e:
                    if len(buf) - start > MAX_RECORD_BYTES or not more():
                        yield row, base + start, 0, BadSample("unreadable_shard", "read", f"record {row}: {e.msg} (the rest of the array is unreadable)")
                        return
            seg = buf[start:end]
            if not seg.isascii():  # parsed from the latin-1 view: parse again with its UTF-8 strings
                obj = _parse(seg)
            pos = end
            yield row, base + start, end - start, obj
            row += 1
            if not skip_ws():
                continue  # reported as not closed above
            if buf[pos] == ",":
                pos += 1
            elif buf[pos] != "]":
                yield row, base + pos, 0, BadSample("unreadable_shard", "read", f"after record {row - 1}: expected ',' or ']', got {buf[pos]!r}")
                return
        else:
            while (nl := buf.find("\n", start)) < 0 and more():
                pass
            end = nl if nl >= 0 else len(buf)
            pos = end + 1 if nl >= 0 else end
            seg = buf[start:end].rstrip()
            try:
                obj = _parse(seg)
            except ValueError as e:
                obj = BadSample("bad_annotation", "read", f"record {row} (line {row + 1} not counting blank lines): not JSON ({e})"[:200])
            yield row, base + start, len(seg), obj
            row += 1


def check_record(obj: Any) -> tuple[str | None, str, list[dict[str, str]]]:
    """``(id or None, kind, messages)`` of a parsed record, or a :class:`BadSample`."""
    if isinstance(obj, BadSample):
        raise obj
    if not isinstance(obj, dict):
        raise BadSample("bad_annotation", "read", f"record is a {type(obj).__name__}, not an object")
    kind = "video" if obj.get("video") else "image" if obj.get("image") else None
    rid = obj.get("id")
    rid = str(rid) if isinstance(rid, (str, int)) and str(rid) else None
    if kind is None:
        raise BadSample("text_only", "read", "no 'video' or 'image' field")
    media = obj[kind]
    if isinstance(media, list):
        if len(media) != 1:
            raise BadSample("many_media_tokens", "read", f"{len(media)} {kind}s in one record (one video per sample)")
        media = media[0]
    if not isinstance(media, str):
        raise BadSample("bad_annotation", "read", f"'{kind}' is a {type(media).__name__}, not a path")
    return rid, kind, conv.from_llava(obj.get("conversations"))


_INDEX_CACHE: dict[tuple, FileIndex] = {}


def index_file(path: str, s3: S3Config | None = None) -> FileIndex:
    """Scan one file (module doc); cached per ``(path, size, mtime)``. An unreadable file is a
    ``FileIndex`` with ``fatal`` set and no rows."""
    fs, p = storage.filesystem(path, s3)
    try:
        info = fs.get_file_info(p)
    except Exception as e:  # noqa: BLE001
        return FileIndex(path, fatal=BadSample("unreadable_shard", "read", f"{type(e).__name__}: {e}"[:300]))
    if info.type == pafs.FileType.NotFound:
        return FileIndex(path, fatal=BadSample("missing_file", "read", path))
    if info.size == 0:
        return FileIndex(path, fatal=BadSample("empty_file", "read", "zero-length JSON file"))
    key = (path, info.size, info.mtime_ns)
    if key in _INDEX_CACHE:
        return _INDEX_CACHE[key]
    idx = FileIndex(path)
    name = posixpath.basename(path)
    try:
        for row, off, length, obj in scan(path, s3):
            if isinstance(obj, BadSample) and obj.reason == "unreadable_shard":
                idx.fatal = obj
                break
            idx.rows = row + 1
            try:
                rid, kind, _ = check_record(obj)
            except BadSample as e:
                rid = obj.get("id") if isinstance(obj, dict) else None
                idx.bad[row] = (str(rid) if rid not in (None, "") else f"{name}:{row}", e)
                continue
            idx.spans[row] = Span(row, off, length, rid or f"{name}:{row}", kind)
    except UnicodeDecodeError as e:
        idx.fatal = BadSample("unreadable_shard", "read", f"not UTF-8: {e}"[:200])
    except OSError as e:
        idx.fatal = BadSample("missing_file", "read", path) if "does not exist" in str(e) else \
            BadSample("unreadable_shard", "read", f"{type(e).__name__}: {e}"[:300])
    if len(_INDEX_CACHE) > 64:
        _INDEX_CACHE.clear()
    _INDEX_CACHE[key] = idx
    return idx


@dataclass
class Index:
    """What a llava-format path holds for one stage: ``entries`` (one dict per usable record, in
    mixture order: ``{id, path, offset, length, folder, row}``), ``bad`` ``(id, source, error)``
    per quarantined record or file, and ``other_kind`` (records of the other stage's kind)."""

    entries: list[dict] = field(default_factory=list)
    bad: list[tuple[str, str, BadSample]] = field(default_factory=list)
    other_kind: int = 0
    files: list[str] = field(default_factory=list)


def build_index(root: str, kind: str, s3: S3Config | None = None, folder: str | None = None) -> Index:
    """Every ``kind`` ("video" | "image") record of a llava-format path (a mixture, a file or a
    folder), each mixture entry's sampling strategy applied. Ids are the records' ``id``; a
    record without one is ``<file>:<row>``, and an id met again later in the mixture becomes
    ``<id>@<file>:<row>`` (LLaVA-Video-178K repeats a video's id across its caption and QA files),
    so sample ids are unique and the same on every run."""
    out = Index()
    seen: set[str] = set()
    for ent in mixture(root, s3, setting=f"data.{kind}_shards"):
        idx = index_file(ent.json_path, s3)
        out.files.append(ent.json_path)
        name = posixpath.basename(ent.json_path)
        if idx.fatal is not None:
            out.bad.append((f"{name}:{idx.rows}" if idx.rows else name, ent.json_path, idx.fatal))
        media = getattr(ent, f"{kind}_folder") or folder or ent.json_path.rsplit("/", 1)[0]
        for row in select_rows(idx.rows, ent.strategy, ent.json_path).tolist():
            if row in idx.bad:
                rid, err = idx.bad[row]
                out.bad.append((rid, ent.json_path, err))
                continue
            sp = idx.spans[row]
            if sp.kind != kind:
                out.other_kind += 1
                continue
            rid = sp.id if sp.id not in seen else f"{sp.id}@{name}:{row}"
            if rid in seen:
                out.bad.append((rid, ent.json_path, BadSample("bad_annotation", "read", f"row {row}: duplicate id")))
                continue
            seen.add(rid)
            out.entries.append({"id": rid, "path": ent.json_path, "offset": sp.offset, "length": sp.length,
                                "folder": media, "row": row})
    return out


# ---------------------------------------------------------------------------------------------
# read tasks


def read_spans(path: str, spans: list[tuple[int, int]], s3: S3Config | None = None) -> list[Any]:
    """The parsed records at ``(offset, length)`` spans of one file: ranged reads, no full scan."""
    fs, p = storage.filesystem(path, s3)
    with fs.open_input_file(p) as f:
        return [_parse(f.read_at(length, offset).decode("latin-1")) for offset, length in spans]


def resolve_media(folder: str, rel: str) -> str:
    """A record's media path: ``rel`` under ``folder`` unless absolute or a URI."""
    if storage.is_s3(rel) or os.path.isabs(rel):
        return rel
    if storage.is_s3(folder):
        return storage.join(folder, posixpath.normpath(rel))
    return os.path.normpath(os.path.join(folder, rel))


def to_row(obj: Any, rid: str, folder: str) -> dict:
    """A record -> a raw row for the readers: ``{id, kind, media (resolved path), conversation
    (JSON text), caption (the assistant turns joined), qa, objects}``; BadSample if bad."""
    _, kind, messages = check_record(obj)
    media = obj[kind][0] if isinstance(obj[kind], list) else obj[kind]
    return {
        "id": rid, "kind": kind, "media": resolve_media(folder, media), "conversation": conv.dumps(messages),
        "caption": conv.caption_of(messages),
        "qa": json.dumps(obj.get("qa") or [], sort_keys=True) if isinstance(obj.get("qa"), list) else "[]",
        "objects": json.dumps(obj.get("objects"), sort_keys=True) if obj.get("objects") is not None else None,
    }

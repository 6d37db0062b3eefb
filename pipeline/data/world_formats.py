"""Write the shapes world's training material in the formats users bring (``jobs/make_world.py
--format``), so the tests exercise the real readers of each (docs/data.md):

* ``native``: :mod:`pipeline.data.shards` (parquet + mp4/jsonl);
* ``llava``: ``images/`` and ``videos/`` each hold two JSON arrays (``part-0.json``,
  ``part-1.json``: the first and second half of the shards, so the mixture reads the
  records in the native order), a LLaVA-NeXT ``mixture.yaml`` over both
  (``sampling_strategy: all``, the media folder named in it) and the media under ``media/``
  (``<id>.png`` / ``<id>.mp4``, paths relative to it). Image records are LLaVA-Pretrain-style
  (one human turn asking for a description, the caption as the gpt turn); video records
  LLaVA-Video-style (``<image>`` in the first human turn, the world's first two QA pairs as turns,
  or the caption when a video has no QA);
* ``webdataset``: ``images/NNNNN.tar`` (``<key>.png`` + ``txt`` + ``json``) and
  ``videos/NNNNN.tar`` (``<key>.mp4`` + ``txt`` + ``json``), video2dataset's 9-digit keys; each
  json carries the world id (the sample id), objects, and for videos the QA.

Only ``images/`` and ``videos/`` change format: the held-out and validation videos stay native
(evaluation and policy selection read them). Sample ids are the native world's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import yaml

from pipeline.data.shards import encode_mp4, encode_png, write_image_shard, write_video_shard
from pipeline.data.webdataset import shard_name, write_shard

WORLD_FORMATS = ("native", "llava", "webdataset")
DESCRIBE = "<image>\nGive a brief description of the image."


def _json(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True))  # plain types, sorted keys


class WorldWriter:
    """Writes image and (training) video shards of one format under ``out``; :meth:`close` at the end."""

    def __init__(self, fmt: str, out: str | Path, shards: dict[str, int] | None = None):
        """``shards``: how many image / video shards will come (``{"images": n, "videos": m}``),
        so a llava world splits them into two halves."""
        if fmt not in WORLD_FORMATS:
            raise ValueError(f"world format must be one of {WORLD_FORMATS}, got {fmt!r}")
        self.fmt, self.out = fmt, Path(out)
        self.shards = shards or {}
        self._llava: dict[str, list[list[dict]]] = {"images": [[], []], "videos": [[], []]}

    def _part(self, kind: str, index: int) -> int:
        n = self.shards.get(kind)
        return int(index >= -(-n // 2)) if n else 0  # unknown count: everything in part-0

    def images(self, index: int, records: Iterable[dict[str, Any]]) -> None:
        root = self.out / "images"
        if self.fmt == "native":
            write_image_shard(root / f"shard-{index:05d}.parquet", records)
            return
        if self.fmt == "llava":
            for r in records:
                (root / "media").mkdir(parents=True, exist_ok=True)
                (root / "media" / f"{r['id']}.png").write_bytes(encode_png(r["image"]))
                self._llava["images"][self._part("images", index)].append({
                    "id": r["id"], "image": f"{r['id']}.png", "objects": _json(r.get("objects")),
                    "conversations": [{"from": "human", "value": DESCRIBE}, {"from": "gpt", "value": r["caption"]}]})
            return
        write_shard(str(root / shard_name(index)), [
            {"__key__": f"{index:05d}{i:04d}", "png": encode_png(r["image"]), "txt": r["caption"],
             "json": {"id": r["id"], "objects": _json(r.get("objects"))}} for i, r in enumerate(records)])

    def videos(self, index: int, records: Iterable[dict[str, Any]], fps: int) -> None:
        root = self.out / "videos"
        if self.fmt == "native":
            write_video_shard(root, index, records, fps=fps)
            return
        if self.fmt == "llava":
            (root / "media").mkdir(parents=True, exist_ok=True)
            for r in records:
                (root / "media" / f"{r['id']}.mp4").write_bytes(encode_mp4(r["frames"], fps=fps))
                self._llava["videos"][self._part("videos", index)].append({
                    "id": r["id"], "video": f"{r['id']}.mp4", "data_source": "shapes_world",
                    "conversations": video_conversation(r), "qa": _json(r.get("qa") or []),
                    "objects": _json(r.get("objects"))})
            return
        out = []
        for i, r in enumerate(records):
            t, h, w = (int(v) for v in r["frames"].shape[:3])
            out.append({"__key__": f"{index:05d}{i:04d}", "mp4": encode_mp4(r["frames"], fps=fps), "txt": r["caption"],
                        "json": {"id": r["id"], "qa": _json(r.get("qa") or []), "objects": _json(r.get("objects")),
                                 "frames": t, "fps": fps, "height": h, "width": w}})
        write_shard(str(root / shard_name(index)), out)

    def close(self) -> None:
        if self.fmt != "llava":
            return
        for part, folder_key in (("images", "image_folder"), ("videos", "video_folder")):
            files = self._llava[part]
            if not any(files):
                continue
            root = self.out / part
            for k, recs in enumerate(files):
                (root / f"part-{k}.json").write_text(json.dumps(recs, indent=1, ensure_ascii=False) + "\n")
            mix = {"datasets": [{"json_path": f"part-{k}.json", "sampling_strategy": "all"} for k in range(2)],
                   folder_key: "media"}
            (root / "mixture.yaml").write_text(yaml.safe_dump(mix, sort_keys=False))


def video_conversation(r: dict[str, Any]) -> list[dict[str, str]]:
    """A world video as LLaVA-Video turns: its first two QA pairs, else a caption request."""
    qa = [q for q in (r.get("qa") or []) if q.get("question") and q.get("answer")][:2]
    if not qa:
        return [{"from": "human", "value": "<image>\ndescribe the video ."}, {"from": "gpt", "value": r["caption"]}]
    turns = []
    for i, q in enumerate(qa):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q["question"]})
        turns.append({"from": "gpt", "value": q["answer"]})
    return turns

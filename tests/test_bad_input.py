"""Bad input never crashes the stream: each kind is skipped, quarantined with a reason, counted.

Every case builds a few good samples plus one bad one with the real shard writers, streams it
through Ray Data on the local cluster, and checks the quarantine counts, the record, and that all
good samples came through in order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_images, make_videos

from pipeline.config import DataConfig
from actors import data_stream as stream
from pipeline.data.quarantine import REASONS, BadSample, format_counts
from pipeline.data.shards import write_image_shard, write_video_shard

MAX_WORDS = 12
LONG = " ".join(["word"] * (MAX_WORDS + 1))


def _cfg(root: Path, **kw) -> DataConfig:
    base = dict(image_shards=str(root / "images"), video_shards=str(root / "videos"), frame_size=16,
                pseudo_images=2, pseudo_repeat=2, video_frames=4, batch_size=2, max_caption_words=MAX_WORDS)
    base.update(kw)
    return DataConfig(**base)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---- image cases: (mutate the bad record | the root, reason, bad id)

def _img_bytes(rec):
    rec["image"] = b"\x89PNG\r\n\x1a\n this is not an image"


def _img_empty(rec):
    rec["image"] = b""


def _img_blank_caption(rec):
    rec["caption"] = "   "


def _img_long_caption(rec):
    rec["caption"] = LONG


def _img_wrong_shape(rec):
    rec["image"] = np.zeros((4, 40, 3), dtype=np.uint8)  # 4 px high, aspect 10: not a frame


IMAGE_CASES = {
    "undecodable_image": (_img_bytes, "corrupt_image"),
    "zero_length_image": (_img_empty, "empty_file"),
    "empty_caption": (_img_blank_caption, "empty_caption"),
    "long_caption": (_img_long_caption, "long_caption"),
    "wrong_image_shape": (_img_wrong_shape, "bad_shape"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
@pytest.mark.ray
def test_bad_image_record(ray_cluster, tmp_path, case):
    mutate, reason = IMAGE_CASES[case]
    recs = make_images(4, size=20)
    mutate(recs[1])
    write_image_shard(tmp_path / "images" / "shard-00000.parquet", recs)
    ds = stream.image_dataset(_cfg(tmp_path))
    ids = [r["id"] for r in stream.iter_samples(ds)]
    assert ids == ["img000", "img002", "img003"]
    log = stream.quarantine_of(ds)
    assert log.counts() == {reason: 1}
    (rec,) = log.records()
    assert rec["id"] == "img001" and rec["reason"] == reason and rec["kind"] == "image"
    assert rec["source"].endswith("shard-00000.parquet") and rec["stage"]
    assert log.format() == f"quarantined: 1 ({reason}: 1)"


@pytest.mark.ray
def test_truncated_parquet_shard_is_skipped(ray_cluster, tmp_path):
    imgs = make_images(9, size=20)
    for i in range(3):
        write_image_shard(tmp_path / "images" / f"shard-{i:05d}.parquet", imgs[3 * i: 3 * i + 3])
    _truncate(tmp_path / "images" / "shard-00001.parquet")
    (tmp_path / "images" / "shard-00003.parquet").write_bytes(b"")  # zero-length shard
    (tmp_path / "images" / "shard-00004.parquet").write_text("id,image,caption\n")  # not parquet
    ds = stream.pseudo_video_dataset(_cfg(tmp_path, pseudo_images=1), seed=None)
    ids = [r["sample_id"] for r in stream.iter_samples(ds)]
    assert ids == ["pv:img000", "pv:img001", "pv:img002", "pv:img006", "pv:img007", "pv:img008"]
    log = stream.quarantine_of(ds)
    assert log.counts() == {"unreadable_shard": 2, "empty_file": 1}
    assert sorted(r["id"] for r in log.records()) == ["shard-00001.parquet", "shard-00003.parquet", "shard-00004.parquet"]


# ---- video cases: (mutate the written video dir, reason, bad id)

def _vid_zero_length(root: Path):
    (root / "clips" / "vid001.mp4").write_bytes(b"")


def _vid_corrupt(root: Path):
    (root / "clips" / "vid001.mp4").write_bytes(np.random.default_rng(0).bytes(4000))


def _vid_truncated(root: Path):
    _truncate(root / "clips" / "vid001.mp4", 0.6)  # the moov atom is at the end: gone


def _vid_missing(root: Path):
    (root / "clips" / "vid001.mp4").unlink()


def _edit_annotation(root: Path, **changes):
    path = root / "annotations-00000.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for ann in lines:
        if ann["id"] == "vid001":
            ann.update(changes)
    path.write_text("".join(json.dumps(a) + "\n" for a in lines))


def _vid_empty_caption(root: Path):
    _edit_annotation(root, caption="")


def _vid_long_caption(root: Path):
    _edit_annotation(root, caption=LONG)


def _vid_wrong_size(root: Path):
    _edit_annotation(root, width=64, height=48)  # the file is 32x32: not this annotation's video


def _vid_bad_line(root: Path):
    path = root / "annotations-00000.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = '{"id": "vid001", "video": "clips/vid001.mp4", "caption": '  # cut-off JSON
    path.write_text("\n".join(lines) + "\n")


VIDEO_CASES = {
    "zero_length_mp4": (_vid_zero_length, "empty_file"),
    "corrupt_mp4": (_vid_corrupt, "corrupt_video"),
    "truncated_mp4": (_vid_truncated, "corrupt_video"),
    "missing_file": (_vid_missing, "missing_file"),
    "empty_caption": (_vid_empty_caption, "empty_caption"),
    "long_caption": (_vid_long_caption, "long_caption"),
    "wrong_frame_size": (_vid_wrong_size, "bad_shape"),
    "bad_annotation_line": (_vid_bad_line, "bad_annotation"),
}


@pytest.mark.parametrize("case", sorted(VIDEO_CASES))
@pytest.mark.ray
def test_bad_video_record(ray_cluster, tmp_path, case):
    mutate, reason = VIDEO_CASES[case]
    write_video_shard(tmp_path / "videos", 0, make_videos(3, frames=6), fps=8)
    mutate(tmp_path / "videos")
    ds = stream.video_dataset(_cfg(tmp_path))
    rows = list(stream.iter_samples(ds))
    assert [r["sample_id"] for r in rows] == ["vid:vid000", "vid:vid002"]
    assert all(r["frames"].shape == (4, 16, 16, 3) for r in rows)
    log = stream.quarantine_of(ds)
    assert log.counts() == {reason: 1}
    (rec,) = log.records()
    assert rec["reason"] == reason and rec["kind"] == "video"
    assert rec["id"] in ("vid001", "annotations-00000.jsonl:2")
    assert rec["source"].endswith(("vid001.mp4", "annotations-00000.jsonl"))


@pytest.mark.ray
def test_mixed_bad_input_pseudo_video_stream(ray_cluster, tmp_path):
    """One stream with several bad kinds: good images regroup, counts per reason, summary line."""
    recs = make_images(10, size=20)
    _img_bytes(recs[1])
    _img_long_caption(recs[4])
    _img_wrong_shape(recs[5])
    recs[7]["image"] = np.full((20, 36, 3), 9, dtype=np.uint8)  # not square but usable: resized, kept
    write_image_shard(tmp_path / "images" / "shard-00000.parquet", recs)
    write_image_shard(tmp_path / "images" / "shard-00001.parquet", make_images(2, size=20, prefix="x"))
    _truncate(tmp_path / "images" / "shard-00001.parquet", 0.3)
    cfg = _cfg(tmp_path, pseudo_images=2)
    ds = stream.pseudo_video_dataset(cfg, seed=None)
    summary = stream.summarize_stream(ds, keep_ids=True)
    # img009 is left over: completed with the shard's first good image
    assert summary.sample_ids == ["pv:img000+img002", "pv:img003+img006", "pv:img007+img008", "pv:img009+img000"]
    assert summary.quarantined == {"corrupt_image": 1, "long_caption": 1, "bad_shape": 1, "unreadable_shard": 1}
    text = str(summary)
    assert "pseudo_video=4" in text
    assert "quarantined: 4 (bad_shape: 1, corrupt_image: 1, long_caption: 1, unreadable_shard: 1)" in text


def _bomb_png() -> bytes:
    """A real, well-formed PNG whose header declares 20000 x 20000 pixels (CRC fixed up): Pillow
    refuses to open it with ``DecompressionBombError``, which is neither an ``OSError`` nor a
    ``ValueError``, so ``readers.decode_image`` lets it through as a non-BadSample exception."""
    import struct
    import zlib

    from pipeline.data.shards import encode_png

    png = encode_png(np.zeros((8, 8, 3), dtype=np.uint8))
    ihdr = bytearray(png[16:29])  # after the signature (8) and IHDR's length + type (8): 13 data bytes
    ihdr[0:8] = struct.pack(">II", 20000, 20000)
    return png[:16] + bytes(ihdr) + struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr))) + png[33:]


@pytest.mark.ray
def test_unexpected_reader_error_is_quarantined(ray_cluster, tmp_path):
    """A record that makes the image reader raise something other than BadSample (a PNG that
    declares a decompression-bomb size) is skipped, counted under ``unexpected_error`` with the
    exception's type in the detail, and the stream yields every other sample. (A real input, not
    a patched reader: if readers.decode_image ever classifies this error, e.g. as corrupt_image,
    this test needs another input no reader anticipates.)"""
    recs = make_images(5, size=20)
    recs[2]["image"] = _bomb_png()
    write_image_shard(tmp_path / "images" / "shard-00000.parquet", recs)
    write_image_shard(tmp_path / "images" / "shard-00001.parquet", make_images(2, size=20, prefix="x"))
    ds = stream.image_dataset(_cfg(tmp_path))
    assert [r["id"] for r in stream.iter_samples(ds)] == ["img000", "img001", "img003", "img004", "x000", "x001"]
    log = stream.quarantine_of(ds)
    assert log.counts() == {"unexpected_error": 1}
    (rec,) = log.records()
    assert rec["id"] == "img002" and rec["kind"] == "image" and rec["stage"] == "decode"
    assert rec["source"].endswith("shard-00000.parquet")
    assert rec["detail"].startswith("DecompressionBombError: ") and "pixels" in rec["detail"]
    # stage 1 too: the pseudo-videos group the good images around the bad one
    ds = stream.pseudo_video_dataset(_cfg(tmp_path, pseudo_images=2), seed=None)
    assert [r["sample_id"] for r in stream.iter_samples(ds)] == ["pv:img000+img001", "pv:img003+img004", "pv:x000+x001"]
    assert stream.quarantine_of(ds).counts() == {"unexpected_error": 1}


@pytest.mark.unit
def test_reason_vocabulary():
    assert format_counts({}) == "quarantined: 0"
    assert format_counts({"corrupt_video": 1, "missing_file": 3}) == "quarantined: 4 (missing_file: 3, corrupt_video: 1)"
    with pytest.raises(ValueError, match="unknown quarantine reason 'corrupt'"):
        BadSample("corrupt", "decode")
    # every reason in the vocabulary is produced by a real bad input in these tests (this file's
    # cases, plus too_few_images in test_data_stream.py), so no reason is dead
    exercised = {reason for _, reason in IMAGE_CASES.values()} | {reason for _, reason in VIDEO_CASES.values()}
    exercised |= {"unreadable_shard", "unexpected_error", "too_few_images"}
    from test_bad_input_formats import FORMAT_REASONS  # the formats' reasons: LLaVA, WebDataset, HF parquet

    exercised |= FORMAT_REASONS
    assert exercised == set(REASONS)

"""Bad input in the formats users bring (LLaVA JSON, WebDataset tars, HF parquet): each kind is
skipped, quarantined with its named reason and counted; the good samples come through in order.

Every case writes three records with the real writers (the middle one bad), streams them through
Ray Data on the local cluster (session fixture), and checks the counts and the record.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_images, make_videos, moving_square

from actors import data_stream as stream
from pipeline.config import ConfigError, DataConfig
from pipeline.data import sources
from pipeline.data.shards import encode_mp4, encode_png
from pipeline.data.webdataset import write_shard


def _cfg(**kw) -> DataConfig:
    base = dict(frame_size=16, pseudo_images=2, pseudo_repeat=2, video_frames=4, batch_size=2, max_caption_words=12)
    return DataConfig(**{**base, **kw})


def _conv(q: str = "which way does the square move ?", a: str = "right") -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]


def _llava_videos(root: Path, mutate) -> Path:
    """``root/media/vidNNN.mp4`` + ``root/data.json`` (one JSON array of 3 records, the middle one
    passed through ``mutate``); returns the JSON path."""
    (root / "media").mkdir(parents=True)
    recs = []
    for v in make_videos(3, frames=6):
        (root / "media" / f"{v['id']}.mp4").write_bytes(encode_mp4(v["frames"]))
        recs.append({"id": v["id"], "video": f"{v['id']}.mp4", "conversations": _conv()})
    mutate(recs[1], root)
    (root / "data.json").write_text(json.dumps(recs))
    return root / "data.json"


def _turns(**change):
    def mutate(rec, root):
        rec["conversations"] = change["turns"]
    return mutate


def _missing_media(rec, root):
    (root / "media" / "vid001.mp4").unlink()


def _text_only(rec, root):
    del rec["video"]


def _too_short(rec, root):
    (root / "media" / "vid001.mp4").write_bytes(encode_mp4(moving_square(2, 32)))  # 2 frames < min_frames 3


LLAVA_CASES = {
    "no_assistant_turn": (_turns(turns=[{"from": "human", "value": "<image>\nwhat is it ?"}]), "no_assistant_turn"),
    "no_media_token": (_turns(turns=[{"from": "human", "value": "what is it ?"}, {"from": "gpt", "value": "red"}]),
                       "no_media_token"),
    "media_token_only_in_answer": (_turns(turns=[{"from": "human", "value": "what is it ?"},
                                                 {"from": "gpt", "value": "<image> red"}]), "no_media_token"),
    "two_media_tokens": (_turns(turns=[{"from": "human", "value": "<image>\n<image>\nsame ?"},
                                       {"from": "gpt", "value": "yes"}]), "many_media_tokens"),
    "empty_value": (_turns(turns=[{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "  "}]), "empty_turn"),
    "unknown_role": (_turns(turns=[{"from": "human", "value": "<image>\nwhat ?"}, {"from": "bot", "value": "red"}]), "unknown_role"),
    "missing_media_path": (_missing_media, "missing_file"),
    "text_only_record": (_text_only, "text_only"),
    "video_shorter_than_min_frames": (_too_short, "too_short"),
}


@pytest.mark.parametrize("case", sorted(LLAVA_CASES))
@pytest.mark.ray
def test_bad_llava_video_record(ray_cluster, tmp_path, case):
    mutate, reason = LLAVA_CASES[case]
    path = _llava_videos(tmp_path, mutate)
    ds = stream.video_dataset(_cfg(video_shards=str(path), video_folder=str(tmp_path / "media"), min_frames=3))
    rows = list(stream.iter_samples(ds))
    assert [r["sample_id"] for r in rows] == ["vid:vid000", "vid:vid002"]
    assert all(json.loads(r["conversation"])[-1] == {"role": "assistant", "content": "right"} for r in rows)
    log = stream.quarantine_of(ds)
    assert log.counts() == {reason: 1}
    (rec,) = log.records()
    assert rec["id"] == "vid001" and rec["reason"] == reason and rec["kind"] == "video"
    assert rec["source"].endswith(("data.json", "vid001.mp4"))


def _wds_videos(root: Path, bad_members: dict | None) -> Path:
    samples = []
    for i, v in enumerate(make_videos(3, frames=6)):
        s = {"__key__": f"00000{i:04d}", "mp4": encode_mp4(v["frames"]), "txt": v["caption"], "json": {"id": v["id"]}}
        if i == 1 and bad_members is not None:
            s = {"__key__": s["__key__"], **bad_members}
        samples.append(s)
    write_shard(str(root / "00000.tar"), samples)
    return root


@pytest.mark.ray
def test_tar_member_that_is_not_a_video(ray_cluster, tmp_path):
    """A WebDataset sample whose only media member is audio (and one whose mp4 member is not
    a video): ``not_a_video`` / ``corrupt_video``, counted, the rest streamed."""
    junk = np.random.default_rng(0).bytes(3000)
    for members, reason in (({"wav": b"RIFF....WAVE", "txt": "a sound", "json": {"id": "vid001"}}, "not_a_video"),
                            ({"mp4": junk, "txt": "noise", "json": {"id": "vid001"}}, "corrupt_video")):
        root = tmp_path / reason
        ds = stream.video_dataset(_cfg(video_shards=str(_wds_videos(root, members))))
        assert [r["sample_id"] for r in stream.iter_samples(ds)] == ["vid:vid000", "vid:vid002"]
        log = stream.quarantine_of(ds)
        assert log.counts() == {reason: 1}
        (rec,) = log.records()
        assert rec["id"] == "vid001" and "00000.tar" in rec["source"]
        assert (reason != "not_a_video") or "wav" in rec["detail"]


@pytest.mark.ray
def test_truncated_tar_keeps_what_was_read(ray_cluster, tmp_path):
    _wds_videos(tmp_path, None)
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[: int(len(data) * 0.6)])
    ds = stream.video_dataset(_cfg(video_shards=str(tmp_path)))
    ids = [r["sample_id"] for r in stream.iter_samples(ds)]
    assert ids and ids == ["vid:vid000", "vid:vid001"][: len(ids)]
    assert stream.quarantine_of(ds).counts() == {"unreadable_shard": 1}


@pytest.mark.ray
def test_image_tar_sample_without_an_image(ray_cluster, tmp_path):
    imgs = make_images(4, size=20)
    samples = [{"__key__": f"00000{i:04d}", "png": encode_png(r["image"]), "txt": r["caption"], "json": {"id": r["id"]}}
               for i, r in enumerate(imgs)]
    samples[1] = {"__key__": samples[1]["__key__"], "txt": "no picture", "json": {"id": "img001"}}
    write_shard(str(tmp_path / "images" / "00000.tar"), samples)
    ds = stream.pseudo_video_dataset(_cfg(image_shards=str(tmp_path / "images"), pseudo_images=1), seed=None)
    assert [r["sample_id"] for r in stream.iter_samples(ds)] == ["pv:img000", "pv:img002", "pv:img003"]
    log = stream.quarantine_of(ds)
    assert log.counts() == {"not_an_image": 1} and log.records()[0]["id"] == "img001"


@pytest.mark.ray
def test_llava_image_records_bad_conversation_and_missing_image(ray_cluster, tmp_path):
    """Stage 1 from LLaVA-Pretrain-style records: a bad conversation (quarantined while indexing)
    and a missing image file (quarantined in the read task) each counted once; the good
    images still make pseudo-videos."""
    (tmp_path / "media").mkdir()
    recs = []
    for r in make_images(5, size=20):
        (tmp_path / "media" / f"{r['id']}.png").write_bytes(encode_png(r["image"]))
        recs.append({"id": r["id"], "image": f"{r['id']}.png", "conversations": _conv("describe it .", r["caption"])})
    recs[1]["conversations"] = [{"from": "gpt", "value": "hello"}]  # no human turn: no media token
    (tmp_path / "media" / "img003.png").unlink()
    (tmp_path / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = _cfg(image_shards=str(tmp_path / "pretrain.jsonl"), image_folder=str(tmp_path / "media"), pseudo_images=1)
    ds = stream.pseudo_video_dataset(cfg, seed=None)
    rows = list(stream.iter_samples(ds))
    assert [r["sample_id"] for r in rows] == ["pv:img000", "pv:img002", "pv:img004"]
    assert rows[0]["caption"] == "img 0 shows shape 0"
    assert stream.quarantine_of(ds).counts() == {"no_media_token": 1, "missing_file": 1}


@pytest.mark.ray
def test_hf_parquet_image_path_that_does_not_exist(ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = make_images(3, size=20)
    structs = [{"bytes": encode_png(imgs[0]["image"]), "path": None}, {"bytes": None, "path": "gone.png"},
               {"bytes": encode_png(imgs[2]["image"]), "path": "img002.png"}]
    pq.write_table(pa.table({"image": structs, "text": [r["caption"] for r in imgs]}), tmp_path / "train-00000.parquet")
    cfg = _cfg(image_shards=str(tmp_path), pseudo_images=1)
    assert sources.format_of(cfg, "image") == "hf_parquet"
    ds = stream.pseudo_video_dataset(cfg, seed=None)
    assert [r["sample_id"] for r in stream.iter_samples(ds)] == ["pv:train-00000.parquet:0", "pv:train-00000.parquet:2"]
    log = stream.quarantine_of(ds)
    assert log.counts() == {"missing_file": 1}
    assert log.records()[0]["id"] == "train-00000.parquet:1" and log.records()[0]["detail"].endswith("gone.png")


@pytest.mark.unit
def test_mixture_naming_a_missing_file_is_a_config_error(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"datasets": [{"json_path": "a.json", "sampling_strategy": "all"},
                                                {"json_path": "b.json", "sampling_strategy": "first:10"}]}))
    with pytest.raises(ConfigError, match=r"data.video_shards: the mixture .*mix.yaml' names a missing file: 'b.json'"):
        sources.check_sources(_cfg(video_shards=str(mix)))
    mix.write_text(yaml.safe_dump({"datasets": [{"json_path": "a.json", "sampling_strategy": "some"}]}))
    with pytest.raises(ConfigError, match=r"sampling_strategy 'some'"):
        sources.check_sources(_cfg(image_shards=str(mix)))


# the reasons these cases produce (test_bad_input.py checks that no reason is dead)
FORMAT_REASONS = {reason for _, reason in LLAVA_CASES.values()} | {"not_a_video", "not_an_image"}

"""Ray Data streaming over image/video shards: decode, pseudo-video, S3, determinism, resume.

Real local Ray cluster (session fixture) and a real S3 server on 127.0.0.1 (moto_server).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_images, moving_square, upload_dir

from pipeline.config import DataConfig, S3Config
from actors import data_stream as stream
from pipeline.data.pseudo_video import CAPTION_JOINER, join_captions, make_pseudo_video, segment_starts
from pipeline.data.shards import encode_mp4, write_video_shard
from pipeline.data.video import decode_video, sample_indices

K, F, T, S = 3, 2, 5, 16


def _cfg(root, **kw) -> DataConfig:
    base = dict(image_shards=f"{root}/images", video_shards=f"{root}/videos", frame_size=S,
                pseudo_images=K, pseudo_repeat=F, video_frames=T, batch_size=2, max_caption_words=12)
    base.update(kw)
    return DataConfig(**base)


def _rows(ds) -> list[dict]:
    return list(stream.iter_samples(ds))


# ------------------------------------------------------------------------------- pure functions


@pytest.mark.unit
def test_sample_indices_uniform():
    assert sample_indices(20, 5).tolist() == [0, 5, 10, 14, 19]
    assert sample_indices(1, 4).tolist() == [0, 0, 0, 0]
    assert sample_indices(3, 5).tolist() == [0, 0, 1, 2, 2]  # shorter than T: frames repeat
    idx = sample_indices(100, 16)
    assert idx[0] == 0 and idx[-1] == 99 and np.all(np.diff(idx) > 0)


@pytest.mark.unit
def test_decode_video_samples_uniform_frames():
    n = 20
    frames = np.stack([np.full((32, 48, 3), 10 * t, dtype=np.uint8) for t in range(n)])
    out = decode_video(encode_mp4(frames), num_frames=T, size=S)
    assert out.shape == (T, S, S, 3) and out.dtype == np.uint8
    means = out.reshape(T, -1).mean(axis=1)
    np.testing.assert_allclose(means, 10 * sample_indices(n, T), atol=3)


@pytest.mark.unit
def test_pseudo_video_residuals_and_caption():
    imgs = make_images(4, size=S)
    pv = make_pseudo_video([r["image"] for r in imgs], [r["caption"] for r in imgs], [r["id"] for r in imgs], repeat=3)
    fr = pv["frames"].astype(np.int16)
    assert pv["frames"].shape == (12, S, S, 3) and pv["frames"].dtype == np.uint8
    assert pv["segments"] == segment_starts(4, 3) == [0, 3, 6, 9]
    res = np.abs(np.diff(fr, axis=0)).reshape(11, -1).max(axis=1)  # res[t-1] = |X[t] - X[t-1]|
    cuts = set(pv["segments"][1:])
    for t in range(1, 12):
        assert (res[t - 1] > 0) == (t in cuts), t
    assert pv["caption"] == CAPTION_JOINER.join(r["caption"] for r in imgs)
    assert pv["caption"] == join_captions([r["caption"] for r in imgs])
    assert pv["sample_id"] == "pv:" + "+".join(r["id"] for r in imgs)
    assert len(json.loads(pv["objects"])) == 4


# ------------------------------------------------------------------------------- Ray Data streams


@pytest.mark.ray
def test_image_stream(ray_cluster, shard_root):
    ds = stream.image_dataset(_cfg(shard_root))
    rows = _rows(ds)
    assert [r["id"] for r in rows] == [f"img{i:03d}" for i in range(16)]  # sorted shard order, file order
    assert all(r["image"].shape == (S, S, 3) and r["image"].dtype == np.uint8 for r in rows)
    assert stream.quarantine_of(ds).counts() == {}


@pytest.mark.ray
def test_pseudo_video_stream(ray_cluster, shard_root):
    cfg = _cfg(shard_root)
    rows = _rows(stream.pseudo_video_dataset(cfg, seed=None))
    # 8 images per shard, k=3: the last 2 images of a shard are completed with its first, none is lost
    assert [r["sample_id"] for r in rows] == [
        "pv:img000+img001+img002", "pv:img003+img004+img005", "pv:img006+img007+img000",
        "pv:img008+img009+img010", "pv:img011+img012+img013", "pv:img014+img015+img008",
    ]
    captions = {r["id"]: r["caption"] for r in make_images(16)}
    for r in rows:
        assert r["kind"] == "pseudo_video"
        fr = r["frames"]
        assert fr.shape == (K * F, S, S, 3) and fr.dtype == np.uint8
        assert list(r["segments"]) == [0, F, 2 * F]
        res = np.abs(np.diff(fr.astype(np.int16), axis=0)).reshape(K * F - 1, -1).max(axis=1)
        for t in range(1, K * F):
            assert (res[t - 1] > 0) == (t % F == 0), (r["sample_id"], t)
        assert r["caption"] == " then ".join(captions[i] for i in r["source_ids"])
        assert json.loads(r["qa"]) == []


@pytest.mark.ray
def test_shard_too_small_for_one_clip_is_counted(ray_cluster, tmp_path):
    from pipeline.data.shards import write_image_shard

    write_image_shard(tmp_path / "images/shard-00000.parquet", make_images(2, size=S))
    write_image_shard(tmp_path / "images/shard-00001.parquet", make_images(4, size=S, prefix="b"))
    ds = stream.pseudo_video_dataset(_cfg(tmp_path), seed=None)
    rows = _rows(ds)
    assert [r["sample_id"] for r in rows] == ["pv:b000+b001+b002", "pv:b003+b000+b001"]
    assert stream.quarantine_of(ds).counts() == {"too_few_images": 2}


@pytest.mark.ray
def test_pseudo_video_seed_is_deterministic(ray_cluster, shard_root):
    cfg = _cfg(shard_root)
    a = [r["sample_id"] for r in _rows(stream.pseudo_video_dataset(cfg, seed=7))]
    b = [r["sample_id"] for r in _rows(stream.pseudo_video_dataset(cfg, seed=7))]
    c = [r["sample_id"] for r in _rows(stream.pseudo_video_dataset(cfg, seed=8))]
    assert a == b and len(a) == 6
    assert a != c
    # groups never cross shards
    for sid in a:
        shards = {int(i[3:]) // 8 for i in sid[3:].split("+")}
        assert len(shards) == 1


@pytest.mark.ray
def test_video_stream(ray_cluster, shard_root):
    ds = stream.video_dataset(_cfg(shard_root))
    rows = _rows(ds)
    assert [r["sample_id"] for r in rows] == [f"vid:vid{i:03d}" for i in range(5)]
    for r in rows:
        assert r["kind"] == "video" and r["frames"].shape == (T, S, S, 3) and r["frames"].dtype == np.uint8
        assert json.loads(r["qa"])[0]["answer"] == "right"
        assert json.loads(r["objects"])[0]["shape"] == "square"
        assert list(r["segments"]) == [0] and list(r["source_ids"]) == [r["sample_id"][4:]]
    # the stream gives what a direct decode gives
    direct = decode_video((shard_root / "videos" / "clips" / "vid002.mp4").read_bytes(), T, S)
    np.testing.assert_array_equal(rows[2]["frames"], direct)
    summary = stream.summarize_stream(ds)
    assert summary.per_kind == {"video": 5} and summary.quarantined_total == 0
    assert "streamed 5 samples (video=5)" in str(summary) and "quarantined: 0" in str(summary)


@pytest.mark.ray
@pytest.mark.slow
def test_s3_read_path_matches_local(ray_cluster, s3_env, shard_root):
    images = upload_dir(shard_root / "images", "score-test", "world/images", s3_env)
    videos = upload_dir(shard_root / "videos", "score-test", "world/videos", s3_env)
    local = _cfg(shard_root)
    remote = _cfg(shard_root, image_shards=images, video_shards=videos, s3=S3Config(endpoint_url=s3_env))
    for make in (stream.image_dataset, lambda c: stream.pseudo_video_dataset(c, seed=3), stream.video_dataset):
        a, b = _rows(make(local)), _rows(make(remote))
        assert len(a) == len(b) > 0
        for ra, rb in zip(a, b):
            assert ra["sample_id"] == rb["sample_id"] and ra["caption"] == rb["caption"]
            key = "image" if "image" in ra else "frames"
            np.testing.assert_array_equal(ra[key], rb[key])
        assert all(str(r["source"]).startswith("s3://score-test/world/") for r in b)
    # a clip missing on S3 is quarantined like a missing local file
    import boto3

    boto3.client("s3", endpoint_url=s3_env).delete_object(Bucket="score-test", Key="world/videos/clips/vid003.mp4")
    ds = stream.video_dataset(remote)
    assert [r["sample_id"] for r in _rows(ds)] == [f"vid:vid{i:03d}" for i in (0, 1, 2, 4)]
    assert stream.quarantine_of(ds).counts() == {"missing_file": 1}


@pytest.mark.ray
@pytest.mark.slow
def test_resume_skips_consumed_ids(ray_cluster, shard_root):
    cfg = _cfg(shard_root)
    for make in (lambda **kw: stream.pseudo_video_dataset(cfg, seed=5, **kw),
                 lambda **kw: stream.video_dataset(cfg, **kw)):
        full = [r["sample_id"] for r in _rows(make())]
        consumed = []
        for r in stream.iter_samples(make()):
            consumed.append(r["sample_id"])
            if len(consumed) == 2:
                break  # a run stops part-way
        rest = [r["sample_id"] for r in _rows(make(skip_ids=set(consumed)))]
        assert consumed == full[:2]
        assert rest == full[2:]
        assert [r["sample_id"] for r in _rows(make(skip_ids=set(full)))] == []


@pytest.mark.ray
@pytest.mark.slow
def test_epochs_in_one_dataset_match_single_passes(ray_cluster, shard_root):
    """epochs=E: one dataset, epoch-major, an ``epoch`` column; epoch e of stage 1 regroups with
    seed + e (the single pass with that seed), and a resume skips ids per epoch."""
    cfg = _cfg(shard_root)
    for make, seeded in ((lambda seed=5, **kw: stream.pseudo_video_dataset(cfg, seed=seed, **kw), True),
                         (lambda seed=None, **kw: stream.video_dataset(cfg, **kw), False)):
        passes = [[r["sample_id"] for r in _rows(make(**({"seed": 5 + e} if seeded else {})))] for e in range(3)]
        rows = _rows(make(epochs=3))
        assert [r["sample_id"] for r in rows] == passes[0] + passes[1] + passes[2]
        assert [int(r["epoch"]) for r in rows] == [e for e in range(3) for _ in passes[e]]
        if seeded:
            assert passes[0] != passes[1]  # each epoch regroups the images
        skip = {0: passes[0], 1: passes[1][:2]}  # a resumed stage consumed epoch 0 and part of epoch 1
        rest = _rows(make(epochs=3, skip_ids=skip))
        assert [(int(r["epoch"]), r["sample_id"]) for r in rest] == (
            [(1, i) for i in passes[1][2:]] + [(2, i) for i in passes[2]])
    with pytest.raises(TypeError, match="epochs"):
        stream.video_dataset(cfg, skip_ids={0: ["vid:vid000"]})


@pytest.mark.ray
def test_frames_sampled_from_short_and_long_videos(ray_cluster, tmp_path):
    # videos of different lengths and sizes all come out as [T,S,S,3]
    recs = [{"id": f"v{n}", "frames": moving_square(n, size), "caption": "a square moves"}
            for n, size in ((2, 32), (9, 48), (30, 24))]
    write_video_shard(tmp_path / "videos", 0, recs, fps=8)
    rows = _rows(stream.video_dataset(_cfg(tmp_path)))
    assert [r["sample_id"] for r in rows] == ["vid:v2", "vid:v9", "vid:v30"]
    assert {r["frames"].shape for r in rows} == {(T, S, S, 3)}


@pytest.mark.ray
def test_ensure_ray_reuses_and_probes(ray_cluster):
    from conftest import _free_port

    from actors.ray_utils import RayTimeoutError, _check_reachable, ensure_ray

    assert ensure_ray()["CPU"] == ray_cluster["CPU"] == 2  # already connected: unchanged
    with pytest.raises(RayTimeoutError, match="not reachable"):
        _check_reachable(f"127.0.0.1:{_free_port()}", timeout_s=2)

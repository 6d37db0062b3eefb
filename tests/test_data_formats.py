"""Bring your own data: LLaVA JSON/JSONL/YAML mixtures, WebDataset tars and HF image parquet
read beside the native shards, conversations as training targets, decoders, and inspect_data.

The shapes world is written in each format by ``jobs/make_world.py --format`` (the real
writers), so the real readers are the ones exercised; Ray Data on the session's local cluster,
S3 on the loopback moto server.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import build_tiny_mllm, moving_square, upload_dir

from pipeline.config import ConfigError, DataConfig, S3Config, WorldConfig
from pipeline.data import conversations as conv
from pipeline.data import llava, sources
from pipeline.data.quarantine import BadSample

ROOT = Path(__file__).resolve().parents[1]
WORLD = WorldConfig(images=18, videos=8, heldout_videos=4, val_videos=0, frames=4, size=32, grid=2, object_size=0.25,
                    jitter=0, max_objects=2, shard_size=3)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """The same tiny world written as native, llava and webdataset (``root/<fmt>``)."""
    from pipeline.data.world import generate_world

    root = tmp_path_factory.mktemp("formats")
    for fmt in ("native", "llava", "webdataset"):
        generate_world(WORLD, root / fmt, progress=False, fmt=fmt)
    return root


def _paths(worlds: Path, fmt: str) -> tuple[str, str]:
    if fmt == "llava":
        return str(worlds / fmt / "images" / "mixture.yaml"), str(worlds / fmt / "videos" / "mixture.yaml")
    return str(worlds / fmt / "images"), str(worlds / fmt / "videos")


def _dcfg(worlds: Path, fmt: str, **kw) -> DataConfig:
    img, vid = _paths(worlds, fmt)
    base = dict(image_shards=img, video_shards=vid, frame_size=16, pseudo_images=2, pseudo_repeat=2, video_frames=4,
                batch_size=2)
    return DataConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------- units


@pytest.mark.unit
def test_llava_conversation_becomes_prompt_and_target():
    turns = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "<image>\nwhat color is it ?"},
             {"from": "gpt", "value": "red"}, {"from": "human", "value": "and its shape ?"}, {"from": "gpt", "value": "circle "}]
    msgs = conv.from_llava(turns)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[1]["content"] == "<video>\nwhat color is it ?"
    prompt, target = conv.split_target(msgs)
    assert target == "circle" and prompt == msgs[:4]
    assert conv.caption_of(msgs) == "red circle"
    # <video> spelled as such, and the role/content spelling, are accepted as they are
    assert conv.from_llava([{"role": "user", "content": "<video> hi"}, {"role": "assistant", "content": "yo"}])[0] == \
        {"role": "user", "content": "<video> hi"}


@pytest.mark.unit
@pytest.mark.parametrize("turns,reason", [
    ([{"from": "human", "value": "<image>\nq"}], "no_assistant_turn"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "no_media_token"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> a"}], "no_media_token"),
    ([{"from": "human", "value": "<image><video> q"}, {"from": "gpt", "value": "a"}], "many_media_tokens"),
    ([{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": ""}], "empty_turn"),
    ([{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": None}], "empty_turn"),
    ([{"from": "human", "value": "<image> q"}, {"from": "narrator", "value": "a"}], "unknown_role"),
    ([], "bad_annotation"),
    ("not a list", "bad_annotation"),
])
def test_bad_conversations_name_their_reason(turns, reason):
    with pytest.raises(BadSample) as e:
        conv.from_llava(turns)
    assert e.value.reason == reason


@pytest.mark.unit
def test_select_target_uses_the_conversation_and_rollout_records_carry_it(tiny_mllm):
    """A video sample with a conversation is scored on it: the prompt a ChatPrompt (a str whose
    text is the messages' JSON), scored exactly as the same messages given as a list; it
    pickles, and a rollout record holding it converts to an Arrow string column (what Ray Data
    and RolloutBatch.from_records need). A native sample's target is unchanged."""
    import pyarrow as pa
    import torch

    from actors.rollout import records_to_columns
    from pipeline.data.prompts import qa_prompt
    from pipeline.mllm.chat import ChatPrompt
    from pipeline.trainer import select_target

    msgs = conv.from_llava([{"from": "human", "value": "<image>\nwhat color is the circle ?"}, {"from": "gpt", "value": "red"},
                            {"from": "human", "value": "what shape ?"}, {"from": "gpt", "value": "circle"}])
    s = {"sample_id": "vid:x", "kind": "video", "conversation": conv.dumps(msgs), "qa": "[]", "caption": "red circle"}
    prompt, target = select_target(s)
    assert isinstance(prompt, ChatPrompt) and target == "circle"
    assert json.loads(prompt) == msgs[:3] and prompt.messages == tuple((m["role"], m["content"]) for m in msgs[:3])
    again = pickle.loads(pickle.dumps(prompt))
    assert isinstance(again, ChatPrompt) and again.messages == prompt.messages
    ad = tiny_mllm("llava_onevision")
    X = ad.encode_video(moving_square(4, 16))[None]
    keep = torch.ones(1, 1, X.shape[1] * X.shape[2], dtype=torch.bool)
    a, b = ad.score(X, keep, [prompt], [target]), ad.score(X, keep, [msgs[:3]], [target])
    assert torch.equal(a, b)
    c = ad.score(X, keep, ["<video> what shape ?"], [target])  # the turns before it do count
    assert not torch.equal(a, c)
    cols = records_to_columns([{"prompt": prompt, "target": target}, {"prompt": "<video> q", "target": "t"}])
    assert pa.array(cols["prompt"]).type == pa.string() and pa.array(cols["prompt"])[0].as_py() == str(prompt)
    native = {"sample_id": "vid:y", "kind": "video", "qa": json.dumps([{"question": "what ?", "answer": "red"}]),
              "caption": "c", "conversation": ""}
    assert select_target(native) == (qa_prompt("what ?"), "red")


@pytest.mark.unit
def test_json_array_is_indexed_once_by_byte_spans(tmp_path, monkeypatch):
    """The streaming scan (tiny chunks, so records straddle them) finds every record's byte span
    in a JSON array and a JSONL file, non-ASCII text included; reading a span back gives the
    record; a bad JSONL line is one bad record, a cut array ends the scan."""
    monkeypatch.setattr(llava, "CHUNK_BYTES", 7)
    recs = [{"id": f"r{i}", "video": f"v{i}.mp4", "conversations": [{"from": "human", "value": f"<image>\nqué {i} ?"},
                                                                     {"from": "gpt", "value": "sí " * i + "ok"}]}
            for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=2, ensure_ascii=False), encoding="utf-8")
    idx = llava.index_file(str(tmp_path / "a.json"))
    assert idx.rows == 5 and not idx.bad and idx.fatal is None
    spans = [idx.spans[i] for i in range(5)]
    assert [s.id for s in spans] == [f"r{i}" for i in range(5)] and {s.kind for s in spans} == {"video"}
    assert llava.read_spans(str(tmp_path / "a.json"), [(s.offset, s.length) for s in spans]) == recs
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    lines[2] = '{"id": "r2", "video": '
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    idx = llava.index_file(str(tmp_path / "b.jsonl"))
    assert sorted(idx.spans) == [0, 1, 3, 4] and idx.bad[2][1].reason == "bad_annotation"
    assert llava.read_spans(str(tmp_path / "b.jsonl"), [(idx.spans[4].offset, idx.spans[4].length)]) == [recs[4]]
    text = json.dumps(recs)
    (tmp_path / "c.json").write_text(text[: len(text) // 2])
    idx = llava.index_file(str(tmp_path / "c.json"))
    assert idx.fatal is not None and idx.fatal.reason == "unreadable_shard" and 0 < len(idx.spans) < 5


@pytest.mark.unit
def test_sampling_strategies_and_mixture(tmp_path):
    assert llava.select_rows(10, "all", "k").tolist() == list(range(10))
    assert llava.select_rows(10, "first:3", "k").tolist() == [0, 1, 2]
    assert llava.select_rows(10, "end:25%", "k").tolist() == [7, 8, 9]  # 25% of 10 rounds up to 3
    r = llava.select_rows(10, "random:40%", "a.json")
    assert len(r) == 4 and list(r) == sorted(r) and r.tolist() == llava.select_rows(10, "40%", "a.json").tolist()
    with pytest.raises(ValueError, match="sampling_strategy"):
        llava.parse_strategy("last:3")
    for name in ("a.json", "b.jsonl"):
        (tmp_path / name).write_text("[]" if name.endswith(".json") else "")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"video_folder": "/videos", "datasets": [
        {"json_path": "a.json", "sampling_strategy": "first:10%"}, {"json_path": "b.jsonl", "video_folder": "clips"}]}))
    ents = llava.mixture(str(tmp_path / "m.yaml"))
    assert [(Path(e.json_path).name, e.strategy, e.video_folder) for e in ents] == [
        ("a.json", "first:10%", "/videos"), ("b.jsonl", "all", str(tmp_path / "clips"))]
    assert [Path(e.json_path).name for e in llava.mixture(str(tmp_path))] == ["a.json", "b.jsonl"]


@pytest.mark.unit
def test_formats_are_detected(worlds, tmp_path):
    for fmt in ("native", "llava", "webdataset"):
        d = _dcfg(worlds, fmt)
        assert sources.format_of(d, "image") == sources.format_of(d, "video") == fmt
        assert sources.kind_of(d.image_shards, d) == "image" and sources.kind_of(d.video_shards, d) == "video"
    d = _dcfg(worlds, "llava", image_shards=str(worlds / "llava" / "images" / "part-0.json"))
    assert sources.format_of(d, "image") == "llava"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [{"bytes": b"x", "path": None}], "text": ["t"]}), tmp_path / "x.parquet")
    d = DataConfig(image_shards=str(tmp_path), video_shards=str(tmp_path))
    assert sources.format_of(d, "image") == "hf_parquet"
    with pytest.raises(ConfigError, match="hf_parquet holds images"):
        sources.format_of(d, "video")


@pytest.mark.unit
def test_decoders_share_one_interface():
    """decord (installed here from its wheel) decodes the frames PyAV does, at a width decord
    0.6 mishandles (48 px); bad bytes are corrupt_video either way; an unknown or missing
    decoder is one error naming the extra."""
    from pipeline.data import decoders
    from pipeline.data.shards import encode_mp4

    frames = np.stack([np.full((32, 48, 3), 12 * t, dtype=np.uint8) for t in range(10)])
    data = encode_mp4(frames)
    a = decoders.decode(data, 4, 16, decoder="pyav")
    assert a.shape == (4, 16, 16, 3)
    try:
        import decord  # noqa: F401
    except ImportError:
        with pytest.raises(decoders.DecoderUnavailable, match=r"pip install -e '\.\[decord\]'"):
            decoders.check_decoder("decord")
    else:
        b = decoders.decode(data, 4, 16, decoder="decord")
        assert b.shape == a.shape and b.dtype == np.uint8
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 3
        with pytest.raises(BadSample) as e:
            decoders.decode(np.random.default_rng(0).bytes(2000), 4, 16, decoder="decord")
        assert e.value.reason == "corrupt_video"
    with pytest.raises(decoders.DecoderUnavailable, match="unknown decoder"):
        decoders.check_decoder("ffmpeg-cli")


@pytest.mark.unit
def test_missing_decord_is_a_config_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_decord(name, *a, **kw):
        if name == "decord":
            raise ImportError("No module named 'decord'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_decord)
    with pytest.raises(ConfigError, match=r"data.decoder=decord needs the decord extra: pip install -e '\.\[decord\]'"):
        sources.check_sources(DataConfig(decoder="decord", image_shards="/nonexistent", video_shards="/nonexistent"))


# ------------------------------------------------------------------------------------------- Ray Data


def _rows(ds) -> list[dict]:
    from actors import data_stream as stream

    return list(stream.iter_samples(ds))


@pytest.mark.ray
def test_every_format_streams_the_same_world(ray_cluster, worlds):
    """Stage 2: the same sample ids and the same decoded frames from native, the LLaVA mixture
    and the WebDataset tars; LLaVA samples carry the world's QA as a conversation. Stage 1:
    every format yields pseudo-videos of the same images with the same captions."""
    from actors import data_stream as stream

    videos = {fmt: _rows(stream.video_dataset(_dcfg(worlds, fmt))) for fmt in ("native", "llava", "webdataset")}
    ids = [r["sample_id"] for r in videos["native"]]
    assert ids == [f"vid:vid-train-0-{i:06d}" for i in range(WORLD.videos)]
    for fmt in ("llava", "webdataset"):
        assert [r["sample_id"] for r in videos[fmt]] == ids
        for a, b in zip(videos["native"], videos[fmt]):
            np.testing.assert_array_equal(a["frames"], b["frames"])
            assert b["caption"] and json.loads(b["qa"]) == json.loads(a["qa"])
    for a, b in zip(videos["native"], videos["llava"]):
        qa = json.loads(a["qa"])
        msgs = json.loads(b["conversation"])
        assert msgs[0] == {"role": "user", "content": "<video>\n" + qa[0]["question"]}
        assert msgs[1] == {"role": "assistant", "content": qa[0]["answer"]}
    assert all(r["conversation"] == "" for r in videos["webdataset"])  # tars with qa, no conversations
    images = {}
    for fmt in ("native", "llava", "webdataset"):
        rows = _rows(stream.image_dataset(_dcfg(worlds, fmt)))
        images[fmt] = {r["id"]: (r["image"], r["caption"]) for r in rows}
    for fmt in ("llava", "webdataset"):
        assert images[fmt].keys() == images["native"].keys() and len(images[fmt]) == WORLD.images
        for k, (img, cap) in images["native"].items():
            np.testing.assert_array_equal(images[fmt][k][0], img)
            assert images[fmt][k][1] == cap
        pv = _rows(stream.pseudo_video_dataset(_dcfg(worlds, fmt), seed=0))
        used = [i for r in pv for i in r["source_ids"]]
        assert set(used) == set(images["native"]) and all(r["frames"].shape == (4, 16, 16, 3) for r in pv)


@pytest.mark.ray
def test_resume_skips_exactly_the_consumed_ids(ray_cluster, worlds):
    """The exactly-once ledger's contract on the new formats: a run that consumed the first
    samples of epoch 0 and resumes with them as ``skip_ids`` gets exactly the rest, in order."""
    from actors import data_stream as stream

    for fmt in ("llava", "webdataset"):
        d = _dcfg(worlds, fmt)
        for make in (lambda **kw: stream.pseudo_video_dataset(d, seed=3, epochs=2, **kw),
                     lambda **kw: stream.video_dataset(d, epochs=2, **kw)):
            full = [(int(r["epoch"]), r["sample_id"]) for r in _rows(make())]
            first = [i for e, i in full if e == 0]
            assert len(first) >= 3 and len(full) == 2 * len(first)
            rest = [(int(r["epoch"]), r["sample_id"]) for r in _rows(make(skip_ids={0: first[:3]}))]
            assert rest == [(e, i) for e, i in full if not (e == 0 and i in first[:3])], fmt


@pytest.mark.ray
@pytest.mark.slow
def test_webdataset_and_llava_on_s3_match_local(ray_cluster, s3_env, worlds):
    """The same streams from the loopback S3 server: WebDataset tars (sequential reads) and a
    LLaVA mixture (ranged reads of the indexed records), media on S3 too."""
    from actors import data_stream as stream

    for fmt in ("webdataset", "llava"):
        remote = upload_dir(worlds / fmt, "fmt-test", fmt, s3_env)
        img, vid = _paths(worlds, fmt)
        rel = lambda p: remote + p[len(str(worlds / fmt)):]  # noqa: E731
        d_local, d_s3 = _dcfg(worlds, fmt), _dcfg(worlds, fmt, image_shards=rel(img), video_shards=rel(vid),
                                                  s3=S3Config(endpoint_url=s3_env))
        assert sources.format_of(d_s3, "video") == fmt
        for make in (stream.video_dataset, lambda c: stream.pseudo_video_dataset(c, seed=1)):
            a, b = _rows(make(d_local)), _rows(make(d_s3))
            assert [r["sample_id"] for r in a] == [r["sample_id"] for r in b] and a
            for ra, rb in zip(a, b):
                np.testing.assert_array_equal(ra["frames"], rb["frames"])


@pytest.mark.ray
def test_inspect_data_reports_what_a_stage_streams(ray_cluster, worlds, tmp_path, capsys):
    """``jobs/inspect_data.py PATH --mllm DIR``: samples per stage and format, quarantined counts
    per reason, frames and visual tokens (min/median/max); the last line is the JSON summary.
    A LLaVA file with one bad record shows it; a mixture naming a missing file exits 1."""
    sys.path.insert(0, str(ROOT / "jobs"))
    import inspect_data

    model, tok = build_tiny_mllm("llava_onevision")
    model.save_pretrained(tmp_path / "mllm")
    tok.save_pretrained(tmp_path / "mllm")
    recs = json.loads((worlds / "llava" / "videos" / "part-0.json").read_text())
    recs[1]["conversations"] = recs[1]["conversations"][:1]  # no gpt turn
    (tmp_path / "v.json").write_text(json.dumps(recs))
    argv = [str(tmp_path / "v.json"), "--mllm", str(tmp_path / "mllm"), "--set", "data.frame_size=16",
            "--set", "data.video_frames=4", "--set", f"data.video_folder={worlds / 'llava' / 'videos' / 'media'}"]
    assert inspect_data.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["records"] == len(recs) - 1 and summary["quarantined"] == {"no_assistant_turn": 1}
    assert summary["frames"] == {"min": 4, "median": 4.0, "max": 4}
    assert summary["visual_tokens"] == {"min": 16, "median": 16.0, "max": 16}  # 4 frames x 2x2 tokens
    st = summary["stages"]["real_video"]
    assert st["format"] == "llava" and st["conversations"] == len(recs) - 1
    assert any("no_assistant_turn" in line and recs[1]["id"] in line for line in out)
    # both stages of a config, webdataset
    img, vid = _paths(worlds, "webdataset")
    assert inspect_data.main(["--set", f"data.image_shards={img}", "--set", f"data.video_shards={vid}",
                              "--set", "data.frame_size=16", "--set", "data.pseudo_images=2", "--set", "data.pseudo_repeat=2",
                              "--set", "data.video_frames=4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["stages"]["pseudo_video"]["format"] == "webdataset" and summary["quarantined"] == {}
    assert summary["records"] == summary["stages"]["pseudo_video"]["records"] + WORLD.videos
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"datasets": [{"json_path": "nope.json"}]}))
    assert inspect_data.main([str(tmp_path / "m.yaml")]) == 1
    assert "names a missing file: 'nope.json'" in capsys.readouterr().err


@pytest.mark.unit
def test_make_world_cli_writes_each_format(tmp_path):
    out = tmp_path / "w"
    r = subprocess.run([sys.executable, str(ROOT / "jobs/make_world.py"), "--out", str(out), "--images", "4", "--videos", "2",
                        "--heldout-videos", "1", "--frames", "4", "--size", "32", "--grid", "2", "--objects", "1-1",
                        "--set", "world.object_size=0.25", "--set", "world.jitter=0", "--quiet", "--format", "llava"],
                       capture_output=True, text=True, check=True)
    assert json.loads(r.stdout.splitlines()[-1])["format"] == "llava"
    mix = yaml.safe_load((out / "videos" / "mixture.yaml").read_text())
    assert [d["json_path"] for d in mix["datasets"]] == ["part-0.json", "part-1.json"] and mix["video_folder"] == "media"
    part = json.loads((out / "videos" / "part-0.json").read_text())
    assert isinstance(part, list) and part[0]["conversations"][0]["value"].startswith("<image>\n")
    assert (out / "videos" / "media" / part[0]["video"]).is_file()
    assert (out / "heldout" / "videos" / "annotations-00000.jsonl").is_file()  # evaluation stays native


# ------------------------------------------------------------------------------------------- Ray stages
EQ_STEPS = 24
EQ_BAND = 0.03  # as tests/test_ray_pipeline.py: margin around the single-process seeds' range


def _stage_tree(root: Path, worlds: Path) -> dict:
    stage = {"steps": EQ_STEPS, "batch_size": 2, "group_size": 4, "lr": 3e-3}
    return {
        "run": {"name": "fmt", "storage": str(root / "runs"), "seed": 0, "call_timeout_s": 60},
        "data": {"image_shards": str(worlds / "native" / "images"), "video_shards": str(worlds / "native" / "videos"),
                 "frame_size": 16, "pseudo_images": 2, "pseudo_repeat": 2, "video_frames": 4, "batch_size": 2},
        "mllm": {"path": str(root / "mllm")},
        "policy": {"hidden": 32, "layers": 1, "heads": 2},
        "stage": {"pseudo_video": stage, "real_video": {**stage, "steps": 2}},
        "rollout": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5, "max_staleness": 2},
        "learner": {"num_workers": 1, "cpus_per_worker": 0.5, "zero_stage": 1, "fit_timeout_s": 600},
    }


@pytest.fixture(scope="module")
def stage_assets(tmp_path_factory, worlds):
    root = tmp_path_factory.mktemp("fmtstage")
    model, tok = build_tiny_mllm("llava_onevision")
    model.save_pretrained(root / "mllm")
    tok.save_pretrained(root / "mllm")
    (root / "cfg.yaml").write_text(yaml.safe_dump(_stage_tree(root, worlds)))
    return root


def _heldout_keep(policy, adapter, videos) -> float:
    import torch

    with torch.no_grad():
        return float(torch.cat([torch.sigmoid(policy(v.X, adapter.visual_grid(v.X.shape[0])[1:])).flatten()
                                for v in videos]).mean())


@pytest.mark.ray
@pytest.mark.slow
def test_ray_stage_learns_on_llava_and_webdataset_as_on_native(ray_cluster, worlds, stage_assets, s3_env, monkeypatch):
    """Stage 1 on Ray from the world written as a LLaVA YAML mixture (local) and as WebDataset
    tars on the loopback S3 server ends where the single-process trainer does on the native
    shards: the final policy's mean keep probability on the held-out videos lies in the band of
    three single-process seeds (+ EQ_BAND), and moved by >= 0.1 from the initial policy (the
    measure of tests/test_ray_pipeline.py's Ray-vs-single-process test)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    from actors.stage import run_stage
    from pipeline import trainer as tr
    from pipeline.config import MLLMConfig, load_config
    from pipeline.evaluation import load_eval_videos
    from pipeline.mllm.loader import load_mllm
    from pipeline.policy import ScorePolicy

    cfg_path = stage_assets / "cfg.yaml"
    adapter = load_mllm(MLLMConfig(path=str(stage_assets / "mllm")))
    videos = load_eval_videos(adapter, str(worlds / "native" / "heldout" / "videos"), 4, 4, 16)
    init = _heldout_keep(tr.init_policy(adapter.hidden_size, load_config(cfg_path).policy, 0), adapter, videos)
    single = []
    for seed in (0, 1, 2):
        c = load_config(cfg_path, [f"run.seed={seed}"])
        pol = tr.init_policy(adapter.hidden_size, c.policy, seed)
        samples = tr.stage_samples("pseudo_video", c, source="shards", log=None)
        s = tr.train_stage(adapter, pol, samples, c.stage.pseudo_video, tr.stage_seed(seed, "pseudo_video"),
                           progress=False, log=None, cache={})
        assert s["steps_done"] == EQ_STEPS
        single.append(_heldout_keep(pol, adapter, videos))
    wds = upload_dir(worlds / "webdataset" / "images", "fmt-stage", "wds/images", s3_env)
    # data.index_rows = the native shard size: a pseudo-video never crosses 3 records, as in native
    runs = {"llava": [f"data.image_shards={_paths(worlds, 'llava')[0]}", "data.format=llava",
                      f"data.index_rows={WORLD.shard_size}"],
            "webdataset_s3": [f"data.image_shards={wds}", f"data.s3.endpoint_url={s3_env}"]}
    dist = {}
    for name, over in runs.items():
        cfg = load_config(cfg_path, [f"run.name={name}", *over])
        s = run_stage(cfg, "pseudo_video", log=None)
        assert s["steps_done"] == EQ_STEPS and s["quarantined"] == {}, (name, s)
        dist[name] = _heldout_keep(ScorePolicy.from_pretrained(s["policy"]), adapter, videos)
    print(f"[keep] init {init:.3f} single-process native {[round(x, 3) for x in single]} Ray {dist}")
    assert max(single) < init - 0.1, (init, single)
    for name, d in dist.items():
        assert d < init - 0.1 and min(single) - EQ_BAND <= d <= max(single) + EQ_BAND, (name, init, single, dist)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_real_video_stage_on_llava_conversations(ray_cluster, worlds, stage_assets, monkeypatch):
    """Stage 2 on Ray from LLaVA video records: rollouts score the conversations (a ChatPrompt
    through the rollout actors' records and the learner), steps happen and the ledger holds the
    records' sample ids, each once."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    from actors.stage import run_stage
    from pipeline.config import load_config

    cfg = load_config(stage_assets / "cfg.yaml", ["run.name=conv", f"data.video_shards={_paths(worlds, 'llava')[1]}"])
    s = run_stage(cfg, "real_video", log=None)
    assert s["steps_done"] == 2 and s["start_sha"] != s["final_sha"]
    ledger = json.loads((Path(s["stage_dir"]) / "ledger.json").read_text())
    ids = [k for e in ledger for k in e["ids"] + e["dropped"]]
    assert len(ids) == len(set(ids)) == 2 * cfg.stage.real_video.batch_size
    assert all(k.split("vid:", 1)[-1].startswith("vid-train-0-") for k in ids), ids


@pytest.mark.unit
def test_single_process_trainer_refuses_other_formats(tmp_path):
    """The single-process trainer reads native shards: a LLaVA or WebDataset path is a config
    error naming the Ray jobs, never a silent fall-back to generated samples."""
    from pipeline.config import ConfigError, load_config
    from pipeline.trainer import stage_samples

    ann = tmp_path / "llava.json"
    ann.write_text(json.dumps([{"id": "a", "video": "a.mp4", "conversations": [
        {"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]}]))
    cfg = load_config(None, [f"data.video_shards={ann}", f"data.video_folder={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.video_shards: llava data streams through Ray"):
        stage_samples("real_video", cfg, log=None)

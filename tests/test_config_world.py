"""Typed config (defaults <- YAML <- dotted overrides, one-line errors) and the shapes world."""

import json
import subprocess
import sys
from pathlib import Path

import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data.world import QUESTION_TYPES, VOCAB, make_video, sample_rng
from pipeline.config import WorldConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run: {name: exp1}\nstage:\n  real_video: {steps: 50}\n")
    cfg = load_config(p, ["stage.real_video.steps=200", "world.motion=[linear, appear]", "data.s3.endpoint_url=http://127.0.0.1:9"])
    assert cfg.run.name == "exp1"
    assert cfg.stage.real_video.steps == 200
    assert cfg.stage.pseudo_video.steps == load_config().stage.pseudo_video.steps
    assert cfg.world.motion == ["linear", "appear"]
    assert cfg.data.s3.endpoint_url == "http://127.0.0.1:9"
    # a YAML alias is a copy: overriding one stage leaves the stage it shares its mapping with alone
    p.write_text("stage:\n  pseudo_video: &s {steps: 7}\n  real_video: *s\n")
    cfg = load_config(p, ["stage.real_video.rollout_budget=[0.05,0.1]"])
    assert cfg.stage.real_video.rollout_budget == (0.05, 0.1) and cfg.stage.pseudo_video.rollout_budget is None
    assert cfg.stage.pseudo_video.steps == cfg.stage.real_video.steps == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage.real_video.stepz=1", "config: unknown key 'stage.real_video.stepz'"),
        ("stage.real_video.steps=-1", "config: stage.real_video.steps: Input should be greater than or equal to 1"),
        ("world.size=63", "config: world.size: must be even"),
        ("world.background=mars", "config: world.background: Input should be"),
        ("world.max_objects=5", "config: world: max_objects=5: a scene's objects have distinct shapes and colours"),
        ("world.grid=1", "config: world: max_objects must fit the 1x1 grid"),
        ("world.pan=[0.2,0.1]", "config: world: pan must be a value or [lo, hi] with 0 <= lo <= hi <= 0.5"),
        ("world.noise=0.7", "config: world: noise must be a value or [lo, hi] with 0 <= lo <= hi <= 0.5"),
        ("world.background=[]", "config: world: background: an empty list"),
        ("rollout.max_actors=0", "config: rollout.max_actors"),
        ("validation.retentions=[0.1,1.5]", "config: validation.retentions: every retention must be in (0, 1]"),
        ("rollout.max_staleness=0", "config: rollout.max_staleness (0) is below learner.prefetch_batches (1)"),
        ("validation.average_last=3", "config: validation.average_last (3) is done by the selection job, which needs validation.video_shards"),
        ("nonsense", "config: override 'nonsense' must look like key.path=value"),
    ],
)
@pytest.mark.unit
def test_bad_config_is_one_clear_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


@pytest.mark.unit
def test_checkpoint_average_needs_the_checkpoints_kept():
    ok = load_config(None, ["validation.video_shards=v", "validation.average_last=5", "checkpoint.keep_every=100"])
    assert ok.validation.average_last == 5
    with pytest.raises(ConfigError, match=r"average_last \(3\) averages more checkpoints than checkpoint.keep_last \(2\)"):
        load_config(None, ["validation.video_shards=v", "validation.average_last=3"])


@pytest.mark.unit
def test_configs_directory_validates():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files, "configs/ must hold at least the demo config"
    for f in files:
        load_config(f)


@pytest.mark.slow
def test_job_rejects_bad_config_before_work(tmp_path):
    out = tmp_path / "w"
    r = subprocess.run([sys.executable, str(ROOT / "jobs/make_world.py"), "--out", str(out), "--objects", "5-2"],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "max_objects must be >= min_objects" in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_world_is_deterministic_and_readable(tmp_path):
    args = ["--images", "20", "--videos", "6", "--seed", "3", "--frames", "8", "--heldout-videos", "4", "--val-videos", "3", "--quiet"]
    for name in ("a", "b"):
        subprocess.run([sys.executable, str(ROOT / "jobs/make_world.py"), "--out", str(tmp_path / name), *args], check=True)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) >= 6 + 2
    for f in files_a:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    table = pq.read_table(tmp_path / "a/images/shard-00000.parquet")
    assert table.column_names == ["id", "image", "caption", "objects"] and table.num_rows == 20
    anns = [json.loads(line) for line in (tmp_path / "a/videos/annotations-00000.jsonl").read_text().splitlines()]
    assert len(anns) == 6 and all((tmp_path / "a/videos" / a["video"]).stat().st_size > 0 for a in anns)
    assert all(a["frames"] == 8 and len(o["boxes"]) == 8 for a in anns for o in a["objects"])
    # the held-out evaluation videos are drawn from another split than the training videos, and
    # the validation videos (choosing the final policy) from a third: the same index in two
    # splits is a different video (the ids name their split, so compare what the files hold)
    held = [json.loads(line) for line in (tmp_path / "a/heldout/videos/annotations-00000.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (tmp_path / "a/val/videos/annotations-00000.jsonl").read_text().splitlines()]
    assert len(held) == 4 and len(val) == 3

    def clip(folder: str, a: dict) -> bytes:
        return (tmp_path / "a" / folder / a["video"]).read_bytes()

    def scene(a: dict) -> str:  # what a video shows: its objects (shape, colour, motion, boxes)
        return json.dumps(a["objects"], sort_keys=True)

    splits = {"videos": anns, "heldout/videos": held, "val/videos": val}
    contents = {name: [clip(name, a) for a in split] for name, split in splits.items()}
    for i in range(3):
        assert len({contents[name][i] for name in splits}) == 3, f"index {i}: two splits hold the same clip"
        assert len({scene(split[i]) for split in splits.values()}) == 3, f"index {i}: two splits show the same scene"
    # no evaluation or validation clip is one the training split holds
    assert set(contents["heldout/videos"]).isdisjoint(contents["videos"])
    assert set(contents["val/videos"]).isdisjoint(set(contents["videos"]) | set(contents["heldout/videos"]))
    # a different seed gives a different world
    subprocess.run([sys.executable, str(ROOT / "jobs/make_world.py"), "--out", str(tmp_path / "c"), *args[:4], "--seed", "4", "--frames", "8", "--quiet"], check=True)
    assert (tmp_path / "c/videos/annotations-00000.jsonl").read_bytes() != (tmp_path / "a/videos/annotations-00000.jsonl").read_bytes()


@pytest.mark.unit
def test_questions_are_about_small_objects_and_use_the_vocabulary():
    cfg = WorldConfig(frames=16)
    seen_types = set()
    r = cfg.object_size * cfg.size / 2
    for i in range(200):
        v = make_video(cfg, sample_rng(0, "eval", "video", i))
        words = set(v["caption"].split())
        for q in v["qa"]:
            seen_types.add(q["type"])
            words |= set(q["question"].split()) | {q["answer"]} | set(q["options"])
            assert q["answer"] in q["options"] and len(set(q["options"])) == len(q["options"])
            assert q["objects"], "every question is about at least one object"
            # the question's objects cover a small fraction of the frame (redundant background)
            area = sum(1 for o in v["objects"] if o["id"] in q["objects"] for b in o["boxes"] if b)
            assert area * (2 * r) ** 2 <= 0.1 * cfg.frames * cfg.size**2 * len(q["objects"])
        assert words <= set(VOCAB), words - set(VOCAB)
    assert seen_types == set(QUESTION_TYPES)


@pytest.mark.unit
def test_pan_and_noise_change_pixels_but_not_annotations():
    base = make_video(WorldConfig(frames=6), sample_rng(0, "eval", "video", 1))
    panned = make_video(WorldConfig(frames=6, pan=0.2, noise=0.03), sample_rng(0, "eval", "video", 1))
    assert base["qa"] == panned["qa"] and base["caption"] == panned["caption"]
    # plain camera: background residuals are zero where no object is; a panning camera moves them
    assert not np.array_equal(base["frames"], panned["frames"])
    assert np.abs(np.diff(panned["frames"].astype(int), axis=0)).mean() > np.abs(np.diff(base["frames"].astype(int), axis=0)).mean()


@pytest.mark.unit
@pytest.mark.parametrize("world, message", [
    (dict(grid=1, max_objects=1, object_size=0.1, motion=["linear"]), "motion ['linear'] needs grid >= 2"),
    (dict(grid=2, size=32, object_size=0.25, jitter=0, max_objects=3), "max_objects=3 with moving objects ['bounce', 'linear'] needs a grid with at least 2 cells per object (grid=2: at most 2)"),
    (dict(frames=3), "motion ['appear', 'color_change', 'disappear'] needs frames >= 4"),
])
def test_worlds_that_cannot_be_drawn_are_config_errors(world, message):
    """Knob combinations the generator cannot honour (a direction with nowhere to move, objects
    crowding a small grid, events with no frame strictly inside the video) fail validation with one
    line; before, they produced ``None`` answers, overlapping objects or events at frame 0."""
    with pytest.raises(ValueError, match=re.escape(message)):
        WorldConfig(**world)


@pytest.mark.unit
def test_every_drawable_world_draws_without_overlap():
    """Every knob combination the config accepts (grid, objects, frames, motions) draws videos
    whose objects never share a cell, whose answers are words, and whose events fall inside."""
    checked = 0
    for grid in (2, 3, 4):
        for mo in (1, 2, 3, 4):
            for frames in (2, 4, 16):
                for motion in (["linear"], ["bounce"], ["appear", "disappear", "color_change"], ["static", "linear", "appear"]):
                    try:
                        cfg = WorldConfig(size=12 * grid, grid=grid, max_objects=mo, min_objects=mo, frames=frames,
                                          motion=motion, object_size=0.25, jitter=0)
                    except ValueError:
                        continue
                    checked += 1
                    cell = cfg.size / grid
                    for i in range(6):
                        v = make_video(cfg, sample_rng(0, "train", "video", i))
                        assert all(q["answer"] for q in v["qa"])
                        seen = [(t, int((b[0] + b[2]) / 2 // cell), int((b[1] + b[3]) / 2 // cell))
                                for o in v["objects"] for t, b in enumerate(o["boxes"]) if b]
                        assert len(seen) == len(set(seen)), (grid, mo, frames, motion, i)
                        for o in v["objects"]:
                            assert o["motion"] != "appear" or o["boxes"][0] is None
    assert checked >= 60, checked


@pytest.mark.unit
def test_a_randomized_world_draws_its_knobs_per_sample_and_stays_deterministic():
    cfg = WorldConfig(frames=4, background=["plain", "texture", "photo"], pan=(0.0, 0.2))
    vids = [make_video(cfg, sample_rng(0, "eval", "video", i))["frames"] for i in range(12)]
    again = make_video(cfg, sample_rng(0, "eval", "video", 3))["frames"]
    assert np.array_equal(vids[3], again)
    # plain backgrounds are flat where no object is; photo/texture ones are not: both kinds appear
    corner_std = [float(v[0, :3, :3].std(axis=(0, 1)).max()) for v in vids]
    assert min(corner_std) < 1.0 < max(corner_std), corner_std
    # a noise range: each video its own noise level
    noisy = WorldConfig(frames=4, background="plain", noise=(0.0, 0.06))
    levels = [float(make_video(noisy, sample_rng(0, "eval", "video", i))["frames"][0, :3, :3].std(axis=(0, 1)).max()) for i in range(12)]
    assert max(levels) > 3 * min(levels) + 1.0, levels
    # a scalar knob draws nothing: the fixed world's samples are the ones it always was
    fixed = WorldConfig(frames=4)
    assert np.array_equal(make_video(fixed, sample_rng(0, "eval", "video", 1))["frames"],
                          make_video(fixed.model_copy(update={"noise": 0.0}), sample_rng(0, "eval", "video", 1))["frames"])
    with pytest.raises(ConfigError, match="world.pan"):
        load_config(None, ["world.pan=[0.1, 0.2, 0.3]"])

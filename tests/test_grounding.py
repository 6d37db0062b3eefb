"""The grounding warm start (pipeline/grounding.py): its targets, its two-level loss, and a real
pass over real annotated shards with a real tiny MLLM that teaches a question-aware policy to rank
the asked object's tokens first."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import partly_asked_videos

from pipeline.config import GroundingConfig, PolicyConfig, WorldConfig, load_config
from pipeline.data.world import make_video, sample_rng
from pipeline.grounding import grounding_loss, grounding_pairs, grounding_targets, precision_at_asked, warm_start

T, GH, GW = 8, 4, 4


@pytest.mark.unit
def test_targets_mark_the_asked_objects_and_the_background_and_name_every_skip():
    checked = 0
    for v, asked_tokens, every in partly_asked_videos(T):
        asked, background = grounding_targets(v["objects"], v["qa"][0]["objects"], (T, GH, GW), (64, 64))
        assert set(torch.nonzero(asked).flatten().tolist()) == asked_tokens
        assert set(torch.nonzero(~background).flatten().tolist()) == every
        checked += 1
    assert checked >= 5
    v = make_video(WorldConfig(frames=T, min_objects=2, max_objects=3), sample_rng(0, "eval", "video", 0))
    assert grounding_targets([], [0], (T, GH, GW), (64, 64)) == "no_annotations"
    assert grounding_targets(v["objects"], [], (T, GH, GW), (64, 64)) == "no_question_objects"
    assert grounding_targets(v["objects"], [0], (T // 2, GH, GW), (64, 64)) == "frame_mismatch"
    hidden = [dict(v["objects"][0], boxes=[None] * T)]
    assert grounding_targets(hidden, [hidden[0]["id"]], (T, GH, GW), (64, 64)) == "asked_not_visible"


@pytest.mark.unit
def test_loss_ranks_asked_first_then_background_before_the_other_objects():
    asked = torch.tensor([True, True, False, False, False, False])
    background = torch.tensor([False, False, True, True, False, False])  # tokens 4, 5: another object
    good = torch.tensor([3.0, 3.0, 1.0, 1.0, -1.0, -1.0])
    assert grounding_loss(good, asked, background) < grounding_loss(good.flip(0), asked, background)
    distractor_first = torch.tensor([3.0, 3.0, -1.0, -1.0, 1.0, 1.0])
    assert grounding_loss(good, asked, background) < grounding_loss(distractor_first, asked, background)
    z = torch.zeros(6, requires_grad=True)
    grounding_loss(z, asked, background).backward()
    g = -z.grad  # the descent direction
    assert g[:2].min() > g[2:].max()  # asked tokens rise most
    assert g[2:4].min() > g[4:].max()  # background rises over the other object
    # no other object in the video: the second level is skipped, only the first remains
    only = ~asked
    first = -torch.log_softmax(good, -1)[asked].mean()
    assert torch.allclose(grounding_loss(good, asked, only), first)
    assert precision_at_asked(good, asked) == 1.0 and precision_at_asked(good.flip(0), asked) == 0.0


@pytest.mark.unit
def test_config_refuses_a_warm_start_of_a_question_agnostic_policy():
    with pytest.raises(ValueError, match="question-aware"):
        load_config(None, ["grounding.epochs=2"])
    assert load_config(None, ["grounding.epochs=2", "policy.question_aware=true"]).grounding.epochs == 2


@pytest.fixture(scope="module")
def grounded(tmp_path_factory):
    """A small annotated world (2 objects, written shards), a tiny random LLaVA-OV of that
    world's vocabulary, and the config that points at both."""
    from pipeline.data.world import generate_world
    from pipeline.mllm.reference import build_model, build_tokenizer
    from pipeline.config import ReferenceConfig

    root = tmp_path_factory.mktemp("grounding")
    wcfg = WorldConfig(images=0, videos=16, heldout_videos=0, frames=4, size=64, grid=4, object_size=0.2, jitter=0,
                       min_objects=2, max_objects=2, motion=["static"])
    generate_world(wcfg, root / "world", progress=False)
    # one record whose clip is gone: a counted skip, never a crash
    ann = sorted((root / "world" / "videos").glob("*.jsonl"))[0]
    rec = json.loads(ann.read_text().splitlines()[0])
    ann.write_text(ann.read_text() + json.dumps(dict(rec, id="gone", video="clips/gone.mp4")) + "\n")
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(ReferenceConfig(hidden=32, layers=2, heads=2, vision_hidden=16, patch=16), wcfg, tok)
    model.save_pretrained(root / "mllm")
    tok.save_pretrained(root / "mllm")
    cfg = load_config(None, [f"data.video_shards={root / 'world' / 'videos'}", "data.frame_size=64",
                             "data.video_frames=4", f"mllm.path={root / 'mllm'}", "policy.question_aware=true",
                             "policy.hidden=32", "policy.layers=1", "policy.heads=2", "grounding.epochs=30",
                             "grounding.batch_size=8", "grounding.lr=3e-3"])
    return cfg


@pytest.mark.slow
def test_warm_start_teaches_the_policy_to_rank_the_asked_object_first(grounded):
    from pipeline.mllm.loader import load_mllm
    from pipeline.trainer import init_policy

    adapter = load_mllm(grounded.mllm)
    q: Counter = Counter()
    pairs = list(grounding_pairs(adapter, grounded, quarantine=q, log=None))
    assert len(pairs) >= 16 and sum(q.values()) >= 1  # the missing clip is counted by its reason
    policy = init_policy(adapter.hidden_size, grounded.policy, 0)

    def precision() -> float:
        with torch.no_grad():
            return sum(precision_at_asked(policy(p.X[None], p.grid, question=(p.question[None], torch.ones(
                1, p.question.shape[0], dtype=torch.bool)))[0], p.asked) for p in pairs) / len(pairs)

    before = precision()
    out = warm_start(policy, pairs, grounded.grounding, seed=0, log=None)
    after = precision()
    assert out["pairs"] == len(pairs) and len(out["epochs"]) == grounded.grounding.epochs
    assert out["epochs"][-1]["loss"] < out["epochs"][0]["loss"]
    # an untrained random tower's tokens say little about colour and shape: the ranking rises from
    # chance (a quarter of the tokens are asked ones) but slowly, as the loss does
    assert after > before + 0.15, (before, after)
    agnostic = init_policy(adapter.hidden_size, PolicyConfig(hidden=32, layers=1, heads=2), 0)
    with pytest.raises(ValueError, match="question-agnostic"):
        warm_start(agnostic, pairs, GroundingConfig(epochs=1), seed=0, log=None)
    with pytest.raises(ValueError, match="no \\(video, question\\) pair"):
        warm_start(policy, [], GroundingConfig(epochs=1), seed=0, log=None)


@pytest.mark.slow
def test_ground_policy_job_and_the_local_curriculum_start_stage_2_from_the_warm_start(grounded, tmp_path, capsys):
    """The job writes the warm-started policy and one JSON line; it refuses a question-agnostic
    policy in one line. The single-process curriculum runs the warm start between the stages and
    stage 2 starts from it (``grounding/policy``)."""
    import importlib.util
    from pathlib import Path

    from pipeline.mllm.loader import load_mllm
    from pipeline.policy import ScorePolicy
    from pipeline.trainer import init_policy, train_curriculum_local, weights_sha

    spec = importlib.util.spec_from_file_location("ground_policy", Path(__file__).parents[1] / "jobs" / "ground_policy.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    sets = [x for k, v in (("data.video_shards", grounded.data.video_shards), ("data.frame_size", 64),
                           ("data.video_frames", 4), ("mllm.path", grounded.mllm.path), ("policy.question_aware", "true"),
                           ("policy.hidden", 32), ("policy.layers", 1), ("policy.heads", 2), ("grounding.epochs", 2))
            for x in ("--set", f"{k}={v}")]
    init_policy(32, grounded.policy, 0).save_pretrained(tmp_path / "init")
    summary = job.main(sets + ["--init-policy", str(tmp_path / "init"), "--out", str(tmp_path / "warm")])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["policy"] == str(tmp_path / "warm") and len(last["epochs"]) == 2 and last["skipped"] == {"missing_file": 1}
    warm = ScorePolicy.from_pretrained(tmp_path / "warm")
    assert warm.cfg.question_aware and weights_sha(warm) != weights_sha(ScorePolicy.from_pretrained(tmp_path / "init"))
    assert summary["pairs"] == last["pairs"]
    init_policy(32, grounded.policy.model_copy(update={"question_aware": False}), 0).save_pretrained(tmp_path / "agnostic")
    with pytest.raises(SystemExit, match="question-agnostic"):
        job.main(sets + ["--init-policy", str(tmp_path / "agnostic"), "--out", str(tmp_path / "x")])

    cfg = grounded.model_copy(update={
        "grounding": grounded.grounding.model_copy(update={"epochs": 1}),
        "stage": grounded.stage.model_copy(update={
            "pseudo_video": grounded.stage.pseudo_video.model_copy(update={"steps": 1, "batch_size": 2, "group_size": 2}),
            "real_video": grounded.stage.real_video.model_copy(update={"steps": 1, "batch_size": 2, "group_size": 2})}),
        "data": grounded.data.model_copy(update={"image_shards": str(tmp_path / "no-images")}),
    })
    adapter = load_mllm(cfg.mllm)
    out = train_curriculum_local(cfg, adapter, tmp_path / "run", progress=False, log=None, tensorboard=False)
    assert out["stages"]["grounding"]["policy"] == str(tmp_path / "run" / "grounding" / "policy")
    assert out["stages"]["real_video"]["init_from"] == out["stages"]["grounding"]["policy"]

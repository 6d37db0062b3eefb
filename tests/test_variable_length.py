"""Variable-length videos end to end: fps frame sampling (``data.sampling: fps``), rollout batches
that mix frame counts (tiny LLaVA-OneVision 4 vs 8 frames, tiny Qwen2-VL T' = 2 vs 3), their
records, the update on them, evaluation, and a Ray stage-2 run whose batches mix lengths.

A padded token is never kept, never sampled and never enters the loss; a batch of equal lengths
takes the unpadded path (the demo's numbers are the end-to-end check that it did not move).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import trainer as tr
from pipeline import update as up
from pipeline.config import ConfigError, DataConfig, PolicyConfig, StageConfig, WorldConfig, load_config
from pipeline.data.quarantine import BadSample
from pipeline.data.video import FrameSampling, decode_video, sample_indices
from pipeline.policy import padded_logits

SMALL = PolicyConfig(hidden=16, layers=1, heads=2, mlp_ratio=2)
QA = [{"question": "what color is the circle", "answer": "red"},
      {"question": "which way does the square move", "answer": "left"}]


def sample(i: int, frames: int) -> dict:
    rng = np.random.default_rng(i)
    return {"sample_id": f"vid:{i}", "kind": "video", "frames": rng.integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8),
            "caption": "a red circle then a blue square", "qa": json.dumps(QA)}


def scfg(**kw) -> StageConfig:
    return StageConfig(**({"steps": 2, "lr": 3e-3, "group_size": 4, "batch_size": 3, "ppo_epochs": 2} | kw))


@pytest.mark.unit
@pytest.mark.parametrize("kind,budget", [("llava_onevision", None), ("llava_onevision", (0.2, 0.4)), ("qwen2_vl", None)])
def test_equal_length_batch_takes_the_unpadded_path(tiny_mllm, kind, budget):
    """A batch of one length is not padded (no per-sample steps, no validity mask): the path the
    fixed-frame pipeline always took; its update reports the one frame count."""
    adapter = tiny_mllm(kind)
    cfg = scfg(rollout_budget=budget)
    pol = tr.init_policy(adapter.hidden_size, SMALL, 0)
    b = tr.rollout(adapter, pol, [sample(i, 4) for i in range(3)], cfg, tr.step_generator(0, 0), 3, seed=0)
    assert b.steps is None and b.token_valid() is None
    assert b.X.shape[:2] == (3, adapter.visual_grid(4)[0])
    m = up.ppo_update(up.TorchOptimizer(pol, cfg), tr.RolloutBatch.from_records(b.to_records()), cfg)
    assert m[up.FRAMES_MIN] == m[up.FRAMES_MAX] == 4 and m[up.SKIPPED] == 0


# ------------------------------------------------------------------------- mixed lengths


def check_mixed_batch(adapter, pol, b: tr.RolloutBatch, samples: list[dict], cfg: StageConfig) -> None:
    """What every padded batch must satisfy (shapes, validity, per-sample equivalence, records)."""
    encoded = [adapter.encode_video_with_side(s["frames"]) for s in samples]
    Xs = [x for x, _ in encoded]
    steps = [int(x.shape[0]) for x in Xs]
    N = int(Xs[0].shape[1])
    B, G, M = len(samples), cfg.group_size, max(steps) * N
    assert b.steps.tolist() == steps and b.X.shape == (B, max(steps), N, adapter.hidden_size)
    assert b.num_frames.tolist() == [len(s["frames"]) for s in samples] and b.num_tokens == M
    valid = b.token_valid()
    assert valid.shape == (B, M) and valid.sum(-1).tolist() == [t * N for t in steps]
    masks = b.unpacked_masks()
    assert masks.shape == (B, G, M)
    assert not bool((masks & ~valid[:, None]).any()), "a padded token was kept"
    assert bool((masks & valid[:, None]).any(-1).all())  # every mask keeps a real token
    assert torch.equal(b.rho, 1 - masks.sum(-1).float() / valid.sum(-1, keepdim=True).float())  # rho over own tokens
    assert bool((b.old_logits[~valid] == 0).all())
    for i, (s, x) in enumerate(zip(samples, Xs)):
        t = steps[i]
        assert torch.equal(b.X[i, :t], x) and bool((b.X[i, t:] == 0).all())
        with torch.no_grad():  # each sample's logits are the policy's on its own length
            own = pol(x[None], b.grid)[0] + (0.0 if b.shift is None else float(b.shift[i]))
        torch.testing.assert_close(b.old_logits[i, : t * N], own, rtol=1e-5, atol=1e-5)
        # CE of each sample under its masks = the MLLM's score of that sample alone at its own length
        side = {k: v[None] for k, v in encoded[i][1].items()}  # DeepStack features (Qwen3-VL), else none
        ce = adapter.score(x[None], masks[i : i + 1, :, : t * N], [b.prompts[i]], [b.targets[i]], side=side)
        torch.testing.assert_close(b.ce[i], ce[0], rtol=1e-4, atol=1e-4)
    # records: per sample and unpadded; they come back to the same padded batch
    recs = b.to_records()
    assert [r["X"].shape[0] for r in recs] == steps and [r["num_tokens"] for r in recs] == [t * N for t in steps]
    assert [r["num_frames"] for r in recs] == [len(s["frames"]) for s in samples]
    back = tr.RolloutBatch.from_records(recs)
    assert back.steps.tolist() == steps and torch.equal(back.X, b.X.float() if b.X.dtype == torch.float32 else b.X)
    assert torch.equal(back.unpacked_masks(), masks) and torch.equal(back.old_logits, b.old_logits)
    assert torch.equal(back.dce, b.dce) and torch.equal(back.rho, b.rho)
    assert (back.shift is None) == (b.shift is None) and (b.shift is None or torch.equal(back.shift, b.shift))
    # records of equal length among themselves form an unpadded batch again
    same = [r for r in recs if r["X"].shape[0] == steps[0]]
    assert tr.RolloutBatch.from_records(same).steps is None


@pytest.mark.unit
@pytest.mark.parametrize("budget", [None, (0.2, 0.4)], ids=["bernoulli", "budget"])
def test_llava_rollout_mixing_4_and_8_frames(tiny_mllm, budget):
    adapter = tiny_mllm("llava_onevision")
    cfg = scfg(rollout_budget=budget)
    pol = tr.init_policy(adapter.hidden_size, SMALL, 0)
    samples = [sample(0, 4), sample(1, 8), sample(2, 4)]
    b = tr.rollout(adapter, pol, samples, cfg, tr.step_generator(0, 0), 3, seed=0)
    check_mixed_batch(adapter, pol, b, samples, cfg)
    if budget is not None:  # the budget is each sample's own r * T'*N, whatever the longest is
        assert b.shift is not None
        kept = torch.sigmoid(b.old_logits) * b.token_valid()
        frac = kept.sum(-1) / b.token_valid().sum(-1)
        assert bool(((frac > 0.2 - 1e-3) & (frac < 0.4 + 1e-3)).all()), frac


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_qwen_rollout_mixing_2_and_3_steps(tiny_mllm, kind):
    """Qwen merges 2 frames per step: 4 and 6 frames are T' = 2 and 3 (Qwen3-VL: with its DeepStack
    side features padded and sliced like X)."""
    adapter = tiny_mllm(kind)
    cfg = scfg()
    pol = tr.init_policy(adapter.hidden_size, SMALL, 0)
    samples = [sample(0, 4), sample(1, 6), sample(2, 6)]
    b = tr.rollout(adapter, pol, samples, cfg, tr.step_generator(0, 0), 0, seed=0)
    assert b.steps.tolist() == [2, 3, 3]
    check_mixed_batch(adapter, pol, b, samples, cfg)
    m = up.ppo_update(up.TorchOptimizer(pol, cfg), tr.RolloutBatch.from_records(b.to_records()), cfg)
    assert m[up.SKIPPED] == 0 and math.isfinite(m[up.LOSS]) and m[up.FRAMES_MIN] == 4 and m[up.FRAMES_MAX] == 6


@pytest.mark.unit
def test_update_on_a_mixed_batch_never_reads_padding(tiny_mllm):
    """The learner's update on a padded batch: ratio 1 at unchanged weights (behaviour logits are
    recomputed exactly), and whatever sits in the padded slots of X, the behaviour logits and the
    masks' bits cannot move the loss, its gradient or any metric."""
    adapter = tiny_mllm("llava_onevision")
    cfg = scfg(rollout_budget=(0.2, 0.4))
    pol = tr.init_policy(adapter.hidden_size, SMALL, 0)
    b = tr.rollout(adapter, pol, [sample(0, 4), sample(1, 8), sample(2, 6)], cfg, tr.step_generator(0, 0), 0, seed=0)
    valid = b.token_valid()
    adv = up.advantages(b, cfg)
    out = up.surrogate(pol, b.X, b.grid, b.unpacked_masks(), b.old_logits, adv, cfg, b.shift, b.steps, valid)
    assert float(out["approx_kl"]) < 1e-10 and abs(float(out["ratio"]) - 1) < 1e-6

    garbage = tr.RolloutBatch(**{**b.__dict__})
    noise = torch.randn(b.X.shape, generator=torch.Generator().manual_seed(1)) * 100
    pad = ~valid.view(b.X.shape[0], b.X.shape[1], -1)[..., 0]  # padded steps [B, T']
    garbage.X = torch.where(pad[..., None, None], noise, b.X)
    garbage.old_logits = torch.where(valid, b.old_logits, torch.full_like(b.old_logits, -7.0))
    masks = b.unpacked_masks() | ~valid[:, None]  # padded bits set: the valid mask must ignore them
    grads = []
    for batch, m_ in ((b, b.unpacked_masks()), (garbage, masks)):
        p = tr.init_policy(adapter.hidden_size, SMALL, 0)
        o = up.surrogate(p, batch.X, batch.grid, m_, batch.old_logits, adv, cfg, batch.shift, batch.steps, valid)
        o["loss"].backward()
        grads.append([q.grad.clone() for q in p.parameters() if q.grad is not None])
        for k in ("pg_loss", "entropy", "clip_frac", "approx_kl", "ratio", "keep_prob"):
            assert torch.equal(o[k], out[k]), k
    assert all(torch.equal(a, c) for a, c in zip(*grads))

    before = tr.weights_sha(pol)
    m = up.ppo_update(up.TorchOptimizer(pol, cfg), tr.RolloutBatch.from_records(b.to_records()), cfg)
    assert tr.weights_sha(pol) != before and m[up.SKIPPED] == 0 and math.isfinite(m[up.GRAD_NORM])


@pytest.mark.unit
def test_padded_logits_scores_each_sample_at_its_own_length():
    pol = tr.init_policy(8, SMALL, 0)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(t, 6, 8, generator=g) for t in (3, 1, 3, 2)]
    X, steps = tr.pad_steps(xs), torch.tensor([3, 1, 3, 2])
    with torch.no_grad():
        z = padded_logits(pol, X, (2, 3), steps)
        assert torch.equal(z[[0, 2]], pol(X[[0, 2]], (2, 3)))  # a group of one length: the plain call
        for i, x in enumerate(xs):
            torch.testing.assert_close(z[i, : x.shape[0] * 6], pol(x[None], (2, 3))[0], rtol=1e-6, atol=1e-6)
            assert bool((z[i, x.shape[0] * 6:] == 0).all())
        assert torch.equal(padded_logits(pol, X[[0, 2]], (2, 3), torch.tensor([3, 3])), pol(X[[0, 2]], (2, 3)))
    with pytest.raises(ValueError, match="steps"):
        padded_logits(pol, X, (2, 3), torch.tensor([3, 1, 4, 2]))


@pytest.mark.unit
def test_from_records_refuses_what_padding_cannot_join(tiny_mllm):
    adapter = tiny_mllm("llava_onevision")
    pol = tr.init_policy(adapter.hidden_size, SMALL, 0)
    recs = tr.rollout(adapter, pol, [sample(0, 4), sample(1, 8)], scfg(), tr.step_generator(0, 0)).to_records()
    other_n = {**recs[0], "X": recs[0]["X"][:, :2], "num_tokens": 8}
    with pytest.raises(ValueError, match="different shapes"):
        tr.RolloutBatch.from_records([recs[1], other_n])
    with pytest.raises(ValueError, match="num_tokens"):
        tr.RolloutBatch.from_records([recs[1], {**recs[0], "num_tokens": 17}])
    odd = {"vid:1": (torch.zeros(4, 9, adapter.hidden_size), {})}  # an X of another token grid (cached)
    with pytest.raises(ValueError, match="different token grids"):
        tr.rollout(adapter, pol, [sample(0, 4), sample(1, 4)], scfg(), tr.step_generator(0, 0), cache=odd)


@pytest.mark.unit
def test_batched_keeps_arrival_order_across_lengths():
    got = list(tr.batched(iter([sample(0, 4), sample(1, 3), sample(2, 4), sample(3, 3), sample(4, 4)]), 2))
    assert [[s["sample_id"] for s in b] for b in got] == [["vid:0", "vid:1"], ["vid:2", "vid:3"]]


@pytest.mark.unit
def test_single_process_trainer_with_fps_sampling(tiny_mllm):
    """train_stage on world videos of 4..8 frames sampled at the world's fps: batches mix lengths."""
    from pipeline.config import Config

    adapter = tiny_mllm("llava_onevision")
    cfg = Config.model_validate({
        "world": {"frames": 4, "frames_max": 8, "fps": 8, "size": 32, "grid": 2, "object_size": 0.25, "jitter": 0,
                  "max_objects": 2, "motion": ["static", "linear"]},
        "data": {"frame_size": 16, "sampling": "fps", "fps": 8.0}})
    samples = tr.stage_samples("real_video", cfg, source="world", log=None, frame_multiple=adapter._frames_for(1))
    pol = tr.init_policy(adapter.hidden_size, SMALL, 0)
    s = tr.train_stage(adapter, pol, samples, scfg(steps=3), seed=0, progress=False, log=None)
    assert s["steps_done"] == 3 and s["start_sha"] != s["final_sha"]
    spans = [(h[up.FRAMES_MIN], h[up.FRAMES_MAX]) for h in s["history"]]
    assert all(4 <= lo <= hi <= 8 for lo, hi in spans) and any(hi > lo for lo, hi in spans), spans


# ------------------------------------------------------------------------- frame sampling


@pytest.mark.unit
def test_fps_sampling_follows_qwen_vl_utils():
    s = FrameSampling("fps", fps=2.0, min_frames=4, max_frames=768, multiple=2)
    # 10 s at 30 fps: 300 frames -> 20; 1 s -> 4 (the floor); 2.5 s at 8 fps: 20 frames -> 5 -> 4 (rounded down to 2)
    assert s.count(300, 30.0) == 20 and s.count(30, 30.0) == 4 and s.count(20, 8.0) == 4
    assert s.count(7, 1.0) == 6  # 14 wanted, clamped to the 7 frames there are, rounded down to the patch
    assert FrameSampling("fps", fps=2.0, min_frames=4, max_frames=10, multiple=2).count(3000, 30.0) == 10
    assert FrameSampling("fps", fps=2.0, min_frames=3, max_frames=768, multiple=2).lowest == 4  # rounded up
    assert list(s.indices(300, 30.0)) == list(sample_indices(300, 20))  # spread over the whole clip
    assert FrameSampling("fps", fps=1.0, min_frames=1, multiple=1).count(45, 10.0) == 4  # LLaVA: no rounding
    with pytest.raises(BadSample) as e:
        s.count(3, 30.0)
    assert e.value.reason == "too_short"
    with pytest.raises(BadSample) as e:
        s.count(30, None)
    assert e.value.reason == "corrupt_video"
    uniform = FrameSampling(num_frames=16)  # the default: every video 16 frames, short ones repeat frames
    assert uniform.count(3, None) == 16 and list(uniform.indices(3, None)) == list(sample_indices(3, 16))
    with pytest.raises(ValueError, match="exceeds max_frames"):
        FrameSampling("fps", min_frames=5, max_frames=5, multiple=2)


@pytest.mark.unit
def test_fps_sampling_config():
    d = DataConfig(sampling="fps")
    assert (d.fps, d.min_frames, d.max_frames, d.frame_multiple) == (2.0, 4, 768, 0)  # qwen-vl-utils' defaults
    assert DataConfig().min_frames == 1 and DataConfig().sampling == "uniform"  # uniform: as before
    assert FrameSampling.from_config(d, 2).multiple == 2 and FrameSampling.from_config(d).multiple == 1
    assert FrameSampling.from_config(DataConfig(sampling="fps", frame_multiple=4), 2).multiple == 4
    with pytest.raises(ConfigError, match="min_frames .* max_frames"):
        load_config(None, ["data.sampling=fps", "data.max_frames=3"])
    with pytest.raises(ConfigError, match="data.sampling"):
        load_config(None, ["data.sampling=decord"])


@pytest.mark.unit
def test_check_model_dir_with_fps_sampling(tiny_mllm, tmp_path):
    from conftest import build_tiny_mllm
    from pipeline.mllm.loader import check_model_dir, resolve_frame_multiple, temporal_patch

    model, tok = build_tiny_mllm("qwen2_vl")
    model.save_pretrained(tmp_path / "q")
    tok.save_pretrained(tmp_path / "q")
    base = [f"mllm.path={tmp_path / 'q'}", "data.pseudo_repeat=2", "data.sampling=fps"]
    assert temporal_patch(str(tmp_path / "q")) == 2
    check_model_dir(load_config(None, base + ["data.video_frames=5"]))  # video_frames is not used by fps sampling
    with pytest.raises(ConfigError, match="data.frame_multiple=3: .* multiple of 2"):
        check_model_dir(load_config(None, base + ["data.frame_multiple=3"]))
    with pytest.raises(ConfigError, match="exceeds max_frames"):
        check_model_dir(load_config(None, base + ["data.min_frames=5", "data.max_frames=5"]))
    cfg = resolve_frame_multiple(load_config(None, base))
    assert cfg.data.frame_multiple == 2
    uniform = load_config(None, [f"mllm.path={tmp_path / 'q'}"])
    assert resolve_frame_multiple(uniform) is uniform  # uniform sampling: the config as it was


@pytest.mark.unit
def test_decoded_clips_of_different_durations(tmp_path):
    from pipeline.data.shards import encode_mp4

    rng = np.random.default_rng(0)
    clip = {n: encode_mp4(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), fps=8) for n in (6, 16, 40)}
    fps = FrameSampling("fps", fps=2.0, min_frames=4, max_frames=768, multiple=2)
    # 0.75 s -> 4 (min_frames), 2 s -> 4, 5 s -> 10 frames
    assert [decode_video(clip[n], fps, 16).shape[0] for n in (6, 16, 40)] == [4, 4, 10]
    assert [decode_video(clip[n], FrameSampling("fps", fps=8.0, min_frames=4, multiple=2), 16).shape[0]
            for n in (6, 16, 40)] == [6, 16, 40]
    assert {decode_video(clip[n], 12, 16).shape for n in (6, 16, 40)} == {(12, 16, 16, 3)}  # an int: uniform, as before
    with pytest.raises(BadSample) as e:
        decode_video(clip[6], FrameSampling("fps", min_frames=8, multiple=2), 16)
    assert e.value.reason == "too_short"


@pytest.mark.unit
def test_world_frames_range():
    from pipeline.data.world import make_video, sample_rng

    w = WorldConfig(frames=4, frames_max=8, size=32, grid=2, object_size=0.25, jitter=0, max_objects=2)
    lengths = [len(make_video(w, sample_rng(0, "train", "video", i))["frames"]) for i in range(12)]
    assert set(lengths) <= set(range(4, 9)) and len(set(lengths)) >= 3
    assert "frames_max" not in WorldConfig().model_dump_json()  # world.json of a world without a range: unchanged
    with pytest.raises(ConfigError, match="frames_max"):
        load_config(None, ["world.frames=8", "world.frames_max=4"])


@pytest.mark.unit
def test_evaluation_on_videos_of_different_lengths(tiny_mllm):
    """evaluate_qa / run_evaluation: every video at its own length and K; cost columns are means."""
    from pipeline.baselines import SELECTORS
    from pipeline.evaluation import EvalVideo, evaluate_qa, run_evaluation
    from pipeline.select import budget

    adapter = tiny_mllm("llava_onevision")
    qa = {"question": "what color is the circle", "answer": "red", "options": ["red", "blue"], "type": "color"}
    videos = [EvalVideo(f"v{t}", adapter.encode_video(sample(t, t)["frames"]), qa, [], (16, 16)) for t in (4, 8)]
    kept: list[int] = []

    def spy(X, k, ctx):
        kept.append(k)
        assert ctx.grid[0] == X.shape[0]
        return SELECTORS["uniform"](X, k, ctx)

    assert evaluate_qa(adapter, videos, spy, 0.25)["n"] == 2
    assert kept == [budget(0.25, 16), budget(0.25, 32)]
    res = run_evaluation(adapter, videos, {"uniform": SELECTORS["uniform"]}, [0.25], timing_videos=1, timing_repeats=1)
    row = res["rows"][0]
    assert row["k"] == (budget(0.25, 16) + budget(0.25, 32)) / 2 and row["tokens"] == 24
    assert res["setup"]["steps"] == [4, 8] and 0 < row["flops_ratio"] < 1


# ------------------------------------------------------------------------- Ray: stage 2 with fps sampling


@pytest.fixture(scope="module")
def fps_assets(tmp_path_factory):
    """A world whose videos last 4..8 frames at 8 fps, a tiny LLaVA-OV checkpoint, and a config that
    samples at 8 fps (every frame: each video keeps its own length, 4..8)."""
    import yaml

    from conftest import build_tiny_mllm
    from pipeline.data.world import generate_world

    root = tmp_path_factory.mktemp("fps-stage")
    generate_world(WorldConfig(images=0, videos=8, heldout_videos=0, frames=4, frames_max=8, fps=8, size=32, grid=2,
                               object_size=0.25, jitter=0, max_objects=2), root / "world", progress=False)
    model, tok = build_tiny_mllm("llava_onevision")
    model.save_pretrained(root / "mllm")
    tok.save_pretrained(root / "mllm")
    stage = {"steps": 3, "batch_size": 2, "group_size": 4, "lr": 3e-3}
    tree = {
        "run": {"name": "fps", "storage": str(root / "runs"), "seed": 0, "call_timeout_s": 60},
        "data": {"image_shards": str(root / "world" / "images"), "video_shards": str(root / "world" / "videos"),
                 "frame_size": 16, "batch_size": 2, "sampling": "fps", "fps": 8.0, "min_frames": 4},
        "mllm": {"path": str(root / "mllm")},
        "policy": {"hidden": 32, "layers": 1, "heads": 2},
        "stage": {"pseudo_video": stage, "real_video": stage},
        "rollout": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5, "max_staleness": 2},
        "learner": {"num_workers": 1, "cpus_per_worker": 0.5, "zero_stage": 1, "fit_timeout_s": 600, "image_every": 1},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(tree))
    return root


@pytest.mark.ray
@pytest.mark.slow
def test_stage2_with_fps_sampling_mixes_frame_counts(ray_cluster, fps_assets, monkeypatch):
    """Ray Data stream (ragged frames) -> rollout actors (one padded rollout per batch) -> ragged
    rollout records -> the DeepSpeed learner: the run completes, a batch holds two frame counts
    (data/frames_min < data/frames_max at some step, in TensorBoard and the summary), no record is
    dropped for its length, and the per-step mask images draw each sample at its own length."""
    from actors import data_stream as stream
    from actors.stage import run_stage
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(fps_assets / "cfg.yaml")
    lengths = [len(r["frames"]) for r in stream.iter_samples(stream.video_dataset(cfg))]
    assert len(lengths) == 8 and set(lengths) <= set(range(4, 9)) and len(set(lengths)) >= 2

    s = run_stage(cfg, "real_video", log=None)
    assert s["steps_done"] == 3 and not s["exhausted"] and s["dropped_shape"] == 0
    assert s["start_sha"] != s["final_sha"]
    acc = EventAccumulator(str(s["tensorboard"]), size_guidance={"images": 0})
    acc.Reload()
    lo = [e.value for e in acc.Scalars(up.FRAMES_MIN)]
    hi = [e.value for e in acc.Scalars(up.FRAMES_MAX)]
    assert len(lo) == len(hi) == 3 and all(4 <= a <= b <= 8 for a, b in zip(lo, hi))
    assert any(b > a for a, b in zip(lo, hi)), (lo, hi)  # a batch of two frame counts went through
    assert s["first"][up.FRAMES_MAX] > s["first"][up.FRAMES_MIN]
    assert all(math.isfinite(s["last"][k]) for k in (up.REWARD, up.LOSS, up.GRAD_NORM))
    assert len(acc.Images("masks/real_video")) == 3
    ledger = json.loads((Path(s["stage_dir"]) / "ledger.json").read_text())
    assert sum(len(e["ids"]) + len(e["dropped"]) for e in ledger) == 6 and all(not e["dropped"] for e in ledger)

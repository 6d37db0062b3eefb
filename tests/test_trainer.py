"""Single-process trainer: rollout batches, learn step, determinism, learning signal, curriculum.

CPU, the tiny random LLaVA-OneVision of conftest (16x16 frames -> 2x2 tokens per frame, D=32) and a
small policy; a few seconds in all.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import trainer as tr
from pipeline import update as up
from pipeline.config import Config, PolicyConfig, StageConfig, WorldConfig
from pipeline.data.prompts import CAPTION_PROMPT, qa_prompt
from pipeline.metrics import MetricsWriter, mean_metrics, timed
from pipeline.policy import ScorePolicy
from pipeline.rewards import delta_ce, sparsity, unpack_masks

SMALL_POLICY = PolicyConfig(hidden=16, layers=1, heads=2, mlp_ratio=2)
QA = [{"question": "what color is the circle", "answer": "red"},
      {"question": "which way does the square move", "answer": "left"}]


def make_sample(i: int, frames: int = 4, kind: str = "video") -> dict:
    rng = np.random.default_rng(i)
    return {
        "sample_id": f"{'vid' if kind == 'video' else 'pv'}:{i}",
        "kind": kind,
        "frames": rng.integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8),
        "caption": "a red circle then a blue square",
        "qa": json.dumps(QA) if kind == "video" else "[]",
    }


def cycle(n: int, frames: int = 4):
    i = 0
    while True:
        yield make_sample(i % n, frames, "video" if i % 2 else "pseudo_video")
        i += 1


@pytest.fixture(scope="module")
def llava(tiny_mllm):
    return tiny_mllm("llava_onevision")


def stage_cfg(**kw) -> StageConfig:
    base = dict(steps=6, lr=3e-3, group_size=4, batch_size=2)
    base.update(kw)
    return StageConfig(**base)


# ------------------------------------------------------------------------------ targets, metrics
@pytest.mark.unit
def test_select_target():
    pv = make_sample(0, kind="pseudo_video")
    assert tr.select_target(pv) == (CAPTION_PROMPT, pv["caption"])
    v = make_sample(1)
    p, t = tr.select_target(v, seed=3)
    assert (p, t) in [(qa_prompt(q["question"]), q["answer"]) for q in QA]
    assert tr.select_target(v, seed=3) == (p, t)  # deterministic
    picks = {tr.select_target({**v, "sample_id": f"vid:{i}"}, 0)[1] for i in range(20)}
    assert picks == {"red", "left"}  # spread over the QA pairs
    assert tr.select_target({**v, "qa": QA}, 3) == (p, t)  # list or JSON
    # resample_qa: epoch 0 keeps the first draw, later epochs draw again (without it: fixed)
    assert tr.select_target({**v, "epoch": 0}, 3, resample=True) == (p, t)
    assert {tr.select_target({**v, "epoch": 5}, 3) for _ in range(2)} == {(p, t)}
    drawn = {tr.select_target({**v, "epoch": e}, 3, resample=True)[1] for e in range(12)}
    assert drawn == {"red", "left"}
    assert tr.select_target({**v, "qa": "[]"}) == (CAPTION_PROMPT, v["caption"])
    with pytest.raises(ValueError, match="neither QA nor a caption"):
        tr.select_target({**v, "qa": None, "caption": " "})


@pytest.mark.unit
def test_metrics_helpers(tmp_path):
    m: dict = {}
    with timed(m, "rollout"):
        pass
    with timed(m, "rollout"):
        pass
    assert set(m) == {"timing/rollout"} and m["timing/rollout"] >= 0
    assert mean_metrics([{"a": 1.0, "b": torch.tensor(2.0)}, {"a": 3.0, "c": "x"}]) == {"a": 2.0, "b": 2.0}
    with MetricsWriter(tmp_path / "tb") as w:
        w.log(0, {"reward": 0.5, "timing/learn": torch.tensor(0.1), "skip": [1, 2]})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.unit
def test_lr_schedule_warmup_then_constant():
    assert [up.lr_at(s, stage_cfg(steps=5, lr=1.0, warmup=2)) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------ rollout batch
@pytest.mark.unit
def test_rollout_batch_is_consistent(llava):
    scfg = stage_cfg(group_size=3, tau_abs=0.1, tau_rel=0.2)
    pol = tr.init_policy(llava.hidden_size, SMALL_POLICY, 0)
    samples = [make_sample(i, kind=k) for i, k in enumerate(["video", "pseudo_video", "video"])]
    cache: dict = {}
    b = tr.rollout(llava, pol, samples, scfg, tr.step_generator(0, 0), policy_version=7, seed=0, cache=cache)
    B, G, T, N = 3, 3, 4, 4
    M = T * N
    assert b.X.shape == (B, T, N, llava.hidden_size) and b.grid == (2, 2)
    assert b.masks.bits.shape == (B, G, (M + 7) // 8) and b.num_tokens == M
    assert b.old_logits.shape == (B, M) and b.ce_full.shape == (B,)
    for t in (b.dce, b.rho, b.ce):
        assert t.shape == (B, G) and t.dtype == torch.float32
    assert b.policy_version.tolist() == [7] * B and b.sample_ids == [s["sample_id"] for s in samples]
    assert {k for k in cache if isinstance(k, str)} == set(b.sample_ids)  # X per sample (+ CE_full, below)

    masks = unpack_masks(b.masks)
    assert masks.shape == (B, G, M) and masks.any(-1).all()
    prompts_targets = [tr.select_target(s, 0) for s in samples]
    prompts, targets = [p for p, _ in prompts_targets], [t for _, t in prompts_targets]
    assert b.prompts == prompts and b.targets == targets
    # CE_full is the all-ones score; CE_g is the score of exactly the masks that were packed
    full = llava.score(b.X, torch.ones(B, 1, M, dtype=torch.bool), prompts, targets)[:, 0]
    assert torch.allclose(b.ce_full, full, atol=1e-5)
    assert torch.allclose(b.ce, llava.score(b.X, masks, prompts, targets), atol=1e-5)
    assert torch.allclose(b.dce, delta_ce(b.ce_full, b.ce, 0.1, 0.2), atol=1e-6)
    assert torch.equal(b.rho, sparsity(masks))
    # behaviour logits are the policy's on X
    with torch.no_grad():
        assert torch.allclose(b.old_logits, pol(b.X, (2, 2)), atol=1e-6)
    # scoring in small length buckets, and with CE_full from the cache, gives the same CE
    assert all(("ce_full", str(s["sample_id"]), p, t) in cache for s, p, t in zip(samples, prompts, targets))
    b2 = tr.rollout(llava, pol, samples, scfg.model_copy(update={"score_max_tokens": 8}), tr.step_generator(0, 0), cache=cache)
    assert torch.equal(unpack_masks(b2.masks), masks)
    assert torch.allclose(b2.ce, b.ce, atol=1e-5) and torch.allclose(b2.ce_full, b.ce_full, atol=1e-5)

    # records round-trip
    recs = b.to_records()
    assert len(recs) == B and recs[0]["X"].dtype == np.float32 and recs[0]["mask_bits"].dtype == np.uint8
    back = tr.RolloutBatch.from_records(recs)
    assert torch.equal(back.unpacked_masks(), masks) and torch.equal(back.dce, b.dce) and back.grid == b.grid
    assert torch.equal(back.X, b.X.float()) and back.policy_version.tolist() == [7] * B

    # a bf16 state (rollout.state_dtype): half the bytes in the record, the same bits back, and
    # the behaviour logits are the policy's on exactly that state (what the learner recomputes),
    # while the CE are still the MLLM's on the full-precision X
    bb = tr.rollout(llava, pol, samples, scfg, tr.step_generator(0, 0), 7, cache=cache, state_dtype=torch.bfloat16)
    assert bb.X.dtype == torch.bfloat16 and torch.equal(unpack_masks(bb.masks), masks)
    assert torch.allclose(bb.ce, b.ce, atol=1e-5)
    rec16 = bb.to_records()
    assert rec16[0]["x_dtype"] == "bfloat16" and rec16[0]["X"].nbytes * 2 == recs[0]["X"].nbytes
    back16 = tr.RolloutBatch.from_records(rec16)
    assert back16.X.dtype == torch.bfloat16 and torch.equal(back16.X, b.X.to(torch.bfloat16))
    with torch.no_grad():
        assert torch.equal(back16.old_logits, pol(back16.X, (2, 2)).float())
    with pytest.raises(ValueError, match="different shapes"):  # one batch cannot mix state dtypes
        tr.RolloutBatch.from_records([recs[0], rec16[1]])


@pytest.mark.unit
def test_budgeted_rollout_keeps_the_budget_and_learns_from_the_shifted_policy(llava):
    """stage.rollout_budget: masks keep about r*M tokens, r ~ U[lo, hi], whatever the policy's keep
    rate; the shift travels in the records, and the learner's ratio at unchanged weights is 1."""
    scfg = stage_cfg(group_size=64, rollout_budget=(0.25, 0.25))
    pol = tr.init_policy(llava.hidden_size, SMALL_POLICY, 0)
    with torch.no_grad():  # a policy that keeps almost everything: the budget must override it
        pol.head.bias.fill_(6.0)
    samples = [make_sample(i) for i in range(2)]
    b = tr.rollout(llava, pol, samples, scfg, tr.step_generator(0, 0), seed=0)
    M = b.num_tokens
    kept = (1 - b.rho).mean(-1) * M
    assert torch.allclose(kept, torch.full((2,), 0.25 * M), atol=1.0)
    with torch.no_grad():
        z = pol(b.X, b.grid)
    assert b.shift is not None and bool((b.shift < -5).all())
    assert torch.allclose(b.old_logits, z + b.shift[:, None], atol=1e-5)  # behaviour = shifted policy
    back = tr.RolloutBatch.from_records(b.to_records())
    assert torch.equal(back.shift, b.shift)
    adv = up.advantages(back, scfg)
    out = up.surrogate(pol, back.X, back.grid, back.unpacked_masks(), back.old_logits, adv, scfg, back.shift)
    assert float(out["approx_kl"]) < 1e-8 and abs(float(out["ratio"]) - 1) < 1e-5
    unshifted = up.surrogate(pol, back.X, back.grid, back.unpacked_masks(), back.old_logits, adv, scfg)
    assert float(unshifted["approx_kl"]) > 1.0  # without the shift the ratio would compare other policies
    # a range draws a budget per sample
    wide = tr.rollout(llava, pol, samples, scfg.model_copy(update={"rollout_budget": (0.1, 0.5)}),
                      tr.step_generator(0, 1), seed=0)
    assert wide.shift[0] != wide.shift[1]
    with pytest.raises(ValueError, match="rollout_budget"):
        StageConfig(rollout_budget=(0.5, 0.2))


@pytest.mark.unit
def test_byte_lru_bounds_bytes_and_counts():
    from pipeline.cache import ByteLRU

    c = ByteLRU(max_bytes=3 * 400)  # three 10x10 float32 tensors
    for i in range(3):
        c[i] = torch.zeros(10, 10)
    assert c.stats() == {"entries": 3, "bytes": 1200, "hits": 0, "misses": 3, "evictions": 0}
    _ = c[0]  # 0 is now the most recent: 1 goes first
    c[3] = torch.zeros(10, 10)
    assert list(c) == [2, 0, 3] and c.stats()["evictions"] == 1 and c.bytes == 1200
    c[2] = torch.zeros(5, 10)  # replacing a key re-counts its bytes and is not a miss
    assert c.bytes == 1000 and c.misses == 4 and c.hits == 1
    c["big"] = torch.zeros(40, 10)  # larger than the whole budget: not kept, nothing evicted
    assert "big" not in c and len(c) == 3
    c.update({"x": torch.zeros(10, 10), "y": torch.zeros(2)})
    assert list(c) == [3, 2, "x", "y"] and c.bytes == 1008 and c.evictions == 2  # 0 was the oldest
    assert c.hit_rate() == 1 / 8  # 1 read, 7 stores of new keys
    assert ByteLRU(0).stats()["entries"] == 0 and ByteLRU.from_mb(1.5).max_bytes == 3 * 2**19
    with pytest.raises(ValueError):
        ByteLRU(-1)


@pytest.mark.unit
def test_learn_step_metrics_and_update(llava):
    scfg = stage_cfg(ppo_epochs=2)
    pol = tr.init_policy(llava.hidden_size, SMALL_POLICY, 0)
    opt = up.TorchOptimizer(pol, scfg)
    b = tr.rollout(llava, pol, [make_sample(0), make_sample(1)], scfg, tr.step_generator(0, 0))
    before = tr.weights_sha(pol)
    m = up.ppo_update(opt, b, scfg)
    assert tr.weights_sha(pol) != before
    for k in (up.REWARD, up.DCE_MEAN, up.DCE_MIN, up.SAFE_FRAC, up.KEPT, up.ADV_MEAN, up.ADV_STD, up.ADV_MIN,
              up.ADV_MAX, up.ENTROPY, up.CLIP_FRAC, up.APPROX_KL, up.KEEP_PROB, up.GRAD_NORM):
        assert np.isfinite(m[k]), k
    assert m[up.REWARD] == pytest.approx(float(b.dce.mean()))
    assert m[up.KEPT] == pytest.approx(float(1 - b.rho.mean()))
    assert m[up.APPROX_KL] >= 0 and m[up.SKIPPED] == 0


# ------------------------------------------------------------------------------ determinism
def _run(llava, seed: int, steps: int = 4) -> tuple[ScorePolicy, dict]:
    pol = tr.init_policy(llava.hidden_size, SMALL_POLICY, 0)
    s = tr.train_stage(llava, pol, cycle(6), stage_cfg(steps=steps), seed, progress=False, log=None, cache={})
    return pol, s


@pytest.mark.slow
def test_deterministic_for_a_seed(llava):
    p1, s1 = _run(llava, seed=1)
    p2, s2 = _run(llava, seed=1)
    p3, _ = _run(llava, seed=2)
    for (k, a), (_, b) in zip(p1.state_dict().items(), p2.state_dict().items()):
        assert torch.equal(a, b), k
    assert s1["final_sha"] == s2["final_sha"] != s1["start_sha"]
    assert [h[up.REWARD] for h in s1["history"]] == [h[up.REWARD] for h in s2["history"]]
    assert any(not torch.equal(a, b) for a, b in zip(p1.state_dict().values(), p3.state_dict().values()))


@pytest.mark.slow
def test_resume_matches_uninterrupted(llava):
    """Steps draw masks from per-step generators: 2 + 2 steps (same optimizer) == 4 steps."""
    full, _ = _run(llava, seed=5, steps=4)
    pol = tr.init_policy(llava.hidden_size, SMALL_POLICY, 0)
    opt = up.TorchOptimizer(pol, stage_cfg())
    it = cycle(6)
    tr.train_stage(llava, pol, it, stage_cfg(steps=2), 5, optimizer=opt, progress=False, log=None)
    tr.train_stage(llava, pol, it, stage_cfg(steps=4), 5, start_step=2, optimizer=opt, progress=False, log=None)
    assert tr.weights_sha(pol) == tr.weights_sha(full)


# ------------------------------------------------------------------------------ learning signal
@pytest.mark.slow
def test_kept_ratio_falls_on_tiny_mllm(llava, tmp_path):
    """Random tiny MLLM: dropping tokens barely moves CE, so with the default tolerance nearly every
    rollout is safe and the safe-zone advantage favours sparser masks."""
    pol = tr.init_policy(llava.hidden_size, SMALL_POLICY, 0)
    scfg = stage_cfg(steps=30, lr=3e-3, group_size=4, batch_size=2)
    with MetricsWriter(tmp_path / "tb") as w:
        s = tr.train_stage(llava, pol, cycle(6), scfg, 0, writer=w, progress=False, log=None, cache={})
    first, last = s["first"], s["last"]
    assert last[up.KEPT] < first[up.KEPT] - 0.1, (first[up.KEPT], last[up.KEPT])
    assert last[up.KEEP_PROB] < first[up.KEEP_PROB] - 0.1
    assert last[up.SAFE_FRAC] >= 0.9
    assert s["steps_done"] == 30 and not s["exhausted"]
    assert {"timing/rollout", "timing/learn", "timing/data", up.ROLLOUTS_PER_S} <= set(s["history"][0])


class ObjectTokenMLLM:
    """A frozen stand-in MLLM whose CE depends only on a few tokens: the "object" tokens (bright
    pixels, marked in X's first feature) must all be kept, the background never matters:
    ``CE = 1 + 2 * (object tokens dropped) / (object tokens)``."""

    hidden_size = 8
    device = torch.device("cpu")

    def visual_grid(self, t: int) -> tuple[int, int, int]:
        return (t, 2, 2)

    def encode_video_with_side(self, frames) -> tuple[torch.Tensor, dict]:
        f = torch.as_tensor(np.asarray(frames)).float() / 255.0  # [T, 16, 16, 3]
        cells = f.reshape(f.shape[0], 2, 8, 2, 8, 3).mean((2, 4, 5)).reshape(f.shape[0], 4)
        obj = (cells > 0.5).float()
        g = torch.Generator().manual_seed(0)
        noise = 0.1 * torch.randn(f.shape[0], 4, self.hidden_size, generator=g)
        X = noise
        X[..., 0] += 3.0 * obj
        X[..., 1] += cells
        return X, {}

    def score(self, X, keep, prompts, targets, side=None) -> torch.Tensor:
        obj = (X[..., 0] > 1.5).flatten(1)  # [B, M]
        dropped = (obj[:, None, :] & ~keep).float().sum(-1)
        return 1.0 + 2.0 * dropped / obj.float().sum(-1, keepdim=True).clamp(min=1)


def object_videos(n: int):
    """Dark 4-frame videos with one bright quadrant (the object) at a random place per frame."""
    rng = np.random.default_rng(0)
    i = 0
    while True:
        f = np.full((4, 16, 16, 3), 30, dtype=np.uint8)
        for t in range(4):
            q = rng.integers(4)
            r, c = divmod(int(q), 2)
            f[t, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 230
        yield {"sample_id": f"vid:{i % n}", "kind": "video", "frames": f, "caption": "a white square", "qa": "[]"}
        i += 1


@pytest.mark.slow
def test_learns_to_keep_the_tokens_that_matter():
    ad = ObjectTokenMLLM()
    pol = tr.init_policy(ad.hidden_size, SMALL_POLICY, 0)
    scfg = StageConfig(steps=40, lr=1e-2, group_size=8, batch_size=4, tau_abs=0.05, tau_rel=0.0)
    s = tr.train_stage(ad, pol, object_videos(10_000), scfg, 0, progress=False, log=None)
    first, last = s["first"], s["last"]
    # 1 of 4 tokens per frame is the object: from ~0.85 kept and ~half the rollouts safe to
    # (nearly) only the object tokens, nearly always safe (measured: 0.25 kept, >= 0.98 safe)
    assert last[up.KEPT] < 0.45 < first[up.KEPT] - 0.3, (first[up.KEPT], last[up.KEPT])
    assert last[up.SAFE_FRAC] >= 0.9 > first[up.SAFE_FRAC] + 0.2, (first[up.SAFE_FRAC], last[up.SAFE_FRAC])
    v = next(object_videos(1))
    X, _ = ad.encode_video_with_side(v["frames"])
    with torch.no_grad():
        p = torch.sigmoid(pol(X, (2, 2)))
    obj = (X[..., 0] > 1.5).flatten()
    assert float(p[obj].min()) > 0.9 and float(p[~obj].mean()) < 0.1, p


# ------------------------------------------------------------------------------ curriculum
@pytest.mark.slow
def test_train_curriculum_local_end_to_end(llava, tmp_path):
    from pipeline.data.world import generate_world

    world = WorldConfig(images=8, videos=4, heldout_videos=0, size=48, frames=4, shard_size=8, motion=["static", "linear"])
    generate_world(world, tmp_path / "world", progress=False)
    cfg = Config.model_validate({
        "run": {"seed": 3},
        "world": world.model_dump(),
        "data": {"image_shards": str(tmp_path / "world/images"), "video_shards": str(tmp_path / "world/videos"),
                 "frame_size": 16, "pseudo_images": 2, "pseudo_repeat": 2, "video_frames": 4},
        "policy": SMALL_POLICY.model_dump(),
        "stage": {"pseudo_video": {"steps": 3, "batch_size": 2, "group_size": 2},
                  "real_video": {"steps": 3, "batch_size": 2, "group_size": 2, "lr": 1e-3}},
    })
    logs: list[str] = []
    out = tmp_path / "run"
    s = tr.train_curriculum_local(cfg, llava, out, progress=False, log=logs.append)
    s1, s2 = s["stages"]["pseudo_video"], s["stages"]["real_video"]
    assert s1["steps_done"] == 3 and s2["steps_done"] == 3
    assert s1["init_from"] is None and s2["init_from"] == str(out / "pseudo_video" / "policy")
    assert s2["start_sha"] == s1["final_sha"] != s2["final_sha"]  # stage 2 starts from stage 1's weights
    loaded = ScorePolicy.from_pretrained(out / "final" / "policy")
    assert tr.weights_sha(loaded) == s["final_sha"] == s2["final_sha"]
    assert loaded.cfg == SMALL_POLICY and loaded.embed_dim == llava.hidden_size
    assert json.loads((out / "summary.json").read_text())["final_sha"] == s["final_sha"]
    assert list((out / "tensorboard" / "real_video").glob("events.out.tfevents.*"))
    assert not any("generating world samples" in line for line in logs)  # read from the shards
    assert s1["quarantined"] == {} and s2["quarantined"] == {}
    assert any(line.startswith("[pseudo_video] 3 steps") for line in logs)
    assert any(line.startswith("[real_video] 3 steps") for line in logs)
    # the local readers give the same samples the Ray stream would: pseudo-videos of k*F frames
    first = next(tr.iter_pseudo_videos_local(cfg.data, 0))
    assert first["frames"].shape == (4, 16, 16, 3) and first["sample_id"].startswith("pv:")
    vid = next(tr.iter_videos_local(cfg.data))
    assert vid["frames"].shape == (4, 16, 16, 3) and json.loads(vid["qa"])


@pytest.mark.unit
def test_world_sources_are_deterministic():
    cfg = Config.model_validate({"world": {"size": 48, "frames": 4, "motion": ["static"]},
                                 "data": {"frame_size": 16, "pseudo_images": 2, "pseudo_repeat": 2, "video_frames": 4}})
    a = next(tr.stage_samples("pseudo_video", cfg, source="world"))
    b = next(tr.stage_samples("pseudo_video", cfg, source="world"))
    assert a["sample_id"] == b["sample_id"] and np.array_equal(a["frames"], b["frames"])
    assert a["frames"].shape == (4, 16, 16, 3)
    v = next(tr.stage_samples("real_video", cfg, source="world"))
    assert v["frames"].shape == (4, 16, 16, 3) and v["kind"] == "video" and tr.select_target(v)[1]

"""Token selectors: exact budget, sorted unique indices, and what each one keeps."""

import pytest
import torch
from conftest import partly_asked_videos

from pipeline.baselines import SELECTORS, asked_share, objects_oracle_select, oracle_select, uniform_temporal
from pipeline.select import SelectionContext, budget
from pipeline.config import WorldConfig
from pipeline.data.world import make_video, sample_rng

T, GH, GW = 16, 4, 4
N = GH * GW


def _ctx(v, seed=0):
    return SelectionContext(grid=(T, GH, GW), frame_hw=(64, 64), objects=v["objects"],
                            question_objects=v["qa"][0]["objects"], seed=seed)


@pytest.mark.parametrize("r", [0.05, 0.1, 0.25, 1.0])
@pytest.mark.parametrize("name", sorted(SELECTORS))
@pytest.mark.unit
def test_exact_budget_sorted_unique(name, r):
    v = make_video(WorldConfig(frames=T), sample_rng(0, "eval", "video", 5))
    X = torch.zeros(T, N, 8)
    k = budget(r, T * N)
    idx = SELECTORS[name](X, k, _ctx(v))
    assert idx.dtype == torch.long and idx.shape == (k,)
    assert torch.equal(idx, torch.unique(idx)) and int(idx.min()) >= 0 and int(idx.max()) < T * N


@pytest.mark.unit
def test_budget_rounds_up_and_rejects_bad_ratio():
    assert budget(0.1, 256) == 26 and budget(1e-6, 256) == 1 and budget(1.0, 256) == 256
    with pytest.raises(ValueError, match="retention"):
        budget(0.0, 10)


@pytest.mark.unit
def test_uniform_keeps_whole_evenly_spaced_frames():
    idx = uniform_temporal(torch.zeros(T, N, 1), 2 * N, SelectionContext(grid=(T, GH, GW)))
    frames = sorted(set((idx // N).tolist()))
    assert frames == [0, 15] and len(idx) == 2 * N


@pytest.mark.unit
def test_oracle_covers_the_question_objects():
    cfg = WorldConfig(frames=T)
    for i in range(20):
        v = make_video(cfg, sample_rng(0, "eval", "video", i))
        if not v["qa"]:
            continue
        k = budget(0.1, T * N)
        keep = set(oracle_select(torch.zeros(T, N, 1), k, _ctx(v, seed=i)).tolist())
        q_objs = set(v["qa"][0]["objects"])
        for o in v["objects"]:
            if o["id"] not in q_objs:
                continue
            visible = [t for t, b in enumerate(o["boxes"]) if b]
            kept_frames = {j // N for j in keep} & set(visible)
            # the object is visible in kept tokens, spread over its visible frames
            assert kept_frames, (i, o["id"])
            assert max(kept_frames) - min(kept_frames) >= min(len(visible) - 1, 4) or len(kept_frames) == len(visible)
    with pytest.raises(ValueError, match="annotations"):
        oracle_select(torch.zeros(T, N, 1), 4, SelectionContext(grid=(T, GH, GW)))


@pytest.mark.unit
def test_objects_oracle_keeps_every_object_and_the_question_oracle_only_the_asked_ones():
    checked = 0
    for v, asked, every in partly_asked_videos(T):
        k = len(asked)  # exactly the asked objects' tokens: the question oracle keeps those and nothing else
        assert set(oracle_select(torch.zeros(T, N, 1), k, _ctx(v)).tolist()) == asked
        every_keep = set(objects_oracle_select(torch.zeros(T, N, 1), len(every), _ctx(v)).tolist())
        assert every_keep == every and every_keep != asked  # whatever the question, every object
        small = set(objects_oracle_select(torch.zeros(T, N, 1), budget(0.1, T * N), _ctx(v)).tolist())
        assert len(every) < budget(0.1, T * N) or small <= every  # at 10%: object tokens only, when they fill K
        checked += 1
    assert checked >= 5
    with pytest.raises(ValueError, match="annotations"):
        objects_oracle_select(torch.zeros(T, N, 1), 4, SelectionContext(grid=(T, GH, GW)))


@pytest.mark.unit
def test_asked_share_counts_the_kept_tokens_on_the_question_objects():
    checked = 0
    for v, asked, every in partly_asked_videos(T):
        off = sorted(set(range(T * N)) - every)[:5]
        ctx = _ctx(v)
        assert asked_share(torch.tensor(sorted(asked)), ctx) == 1.0
        assert asked_share(torch.tensor(off), ctx) == 0.0
        assert asked_share(torch.tensor(sorted(every)), ctx) == pytest.approx(len(asked) / len(every))
        half = sorted(asked)[:2] + off[:2]
        assert asked_share(torch.tensor(half), ctx) == 0.5
        checked += 1
    assert checked >= 5
    v = make_video(WorldConfig(frames=T, min_objects=1, max_objects=1), sample_rng(0, "eval", "video", 0))
    keep = torch.arange(4)
    assert asked_share(keep, _ctx(v)) is None  # every object is asked about: nothing to tell apart
    assert asked_share(keep, SelectionContext(grid=(T, GH, GW))) is None  # no annotations
    assert asked_share(keep, SelectionContext(grid=(T // 2, GH, GW), frame_hw=(64, 64), objects=v["objects"],
                                              question_objects=[v["objects"][0]["id"]])) is None  # other frame count


@pytest.mark.slow
def test_compiled_score_selector_matches_eager_and_falls_back_when_compiling_fails(monkeypatch):
    """``compile=True`` keeps exactly the eager selector's tokens; with no working C++ compiler
    (a real inductor failure: the compiler it is told to use does not exist) it warns once and
    runs eagerly."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    from pipeline.config import PolicyConfig
    from pipeline.select import make_score_selector
    from pipeline.trainer import init_policy

    policy = init_policy(24, PolicyConfig(hidden=16, layers=1, heads=2), seed=0).eval()
    with torch.no_grad():  # a head that ranks tokens (its weight starts at zero)
        policy.head.weight.normal_()
    X = torch.randn(T, N, 24)
    ctx = SelectionContext(grid=(T, GH, GW))
    eager = make_score_selector(policy)(X, 26, ctx)
    assert torch.equal(make_score_selector(policy, compile=True)(X, 26, ctx), eager)

    torch._dynamo.reset()
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++-compiler",))
    broken = make_score_selector(policy, compile=True)
    with pytest.warns(RuntimeWarning, match="torch.compile of the SCORE policy failed"):
        assert torch.equal(broken(X, 26, ctx), eager)
    assert torch.equal(broken(X, 26, ctx), eager)  # eager from now on, no second warning needed
    torch._dynamo.reset()

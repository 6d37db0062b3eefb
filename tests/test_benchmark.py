"""The benchmark job: pure helpers (benchmarks/shapes.py, benchmarks/run.py) and
``jobs/benchmark.py --quick`` end to end.

The end-to-end test runs the real job as a subprocess (its own local Ray cluster, a random
score-tiny-shaped model, a small shapes world, one short Ray stage) and writes its report to a tmp
path, never to the repository's BENCHMARKS.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_mllm

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- helpers
@pytest.mark.slow
def test_lm_params_match_built_model():
    """The analytic parameter count (used for full-depth FLOPs) equals what lm_dims counts on a
    built model of the same shape; the built model has the real 14x14 grid per frame."""
    from benchmarks.shapes import LM_SHAPES, build_shaped_mllm, lm_params
    from pipeline.evaluation import lm_dims
    from pipeline.mllm import reference

    shape = LM_SHAPES["qwen2-0.5b"]
    ad = build_shaped_mllm(shape, 1, reference.build_tokenizer())
    dims = lm_dims(ad)
    assert dims == {"params": lm_params(shape, 1), "layers": 1, "hidden": 896}
    assert ad.visual_grid(32) == (32, 14, 14)
    # Qwen2-0.5B: ~360M non-embedding parameters at full depth; Qwen2-7B: ~6.5B
    assert 3.5e8 < lm_params(shape) < 3.7e8
    assert 6.4e9 < lm_params(LM_SHAPES["qwen2-7b"]) < 6.6e9


@pytest.mark.unit
def test_prefill_rows_ratios():
    from benchmarks.shapes import prefill_rows
    from pipeline.evaluation import prefill_flops

    dims = {"params": 1000, "layers": 2, "hidden": 8}
    rows = prefill_rows({1.0: 2.0, 0.5: 1.0, 0.1: 0.5}, dims, full_len=110, tokens=100)
    by = {r["retention"]: r for r in rows}
    assert by[1.0]["speedup"] == 1.0 and by[1.0]["flops_limit"] == 1.0
    assert by[0.5]["k"] == 50 and by[0.5]["length"] == 60 and by[0.5]["speedup"] == 2.0
    ratio = prefill_flops(dims, 20) / prefill_flops(dims, 110)
    assert by[0.1]["flops_limit"] == pytest.approx(1 / ratio, rel=1e-3)
    assert by[0.1]["efficiency"] == pytest.approx(4.0 * ratio, rel=1e-3)
    with pytest.raises(ValueError, match="full-token"):
        prefill_rows({0.5: 1.0}, dims, 110, 100)


@pytest.mark.unit
def test_deepstack_counts_in_prefill_flops():
    """DeepStack's adds (levels x kept visual tokens x hidden) are part of the FLOPs, so a pruned
    row's ratio counts the kept tokens' features; Qwen3-8B's analytic size is its published
    ~6.95B non-embedding parameters."""
    from benchmarks.shapes import QWEN3_8B, lm_dims_of, lm_params, mllm_prefill_flops, prefill_rows
    from pipeline.evaluation import prefill_flops

    dims = {"params": 1000, "layers": 3, "hidden": 8, "deepstack_levels": 3}
    assert mllm_prefill_flops(dims, 50, 40) == prefill_flops(dims, 50) + 3 * 40 * 8
    assert mllm_prefill_flops({k: v for k, v in dims.items() if k != "deepstack_levels"}, 50, 40) == prefill_flops(dims, 50)
    rows = {r["retention"]: r for r in prefill_rows({1.0: 2.0, 0.1: 0.5}, dims, full_len=110, tokens=100)}
    ratio = (prefill_flops(dims, 20) + 3 * 10 * 8) / (prefill_flops(dims, 110) + 3 * 100 * 8)
    assert rows[0.1]["flops_ratio"] == pytest.approx(ratio, abs=1e-5)
    assert 6.9e9 < lm_params(QWEN3_8B) < 7.0e9
    assert lm_dims_of(QWEN3_8B, 1, deepstack_levels=3)["deepstack_levels"] == 1  # level l follows layer l
    assert lm_dims_of(QWEN3_8B, deepstack_levels=3) == {"params": lm_params(QWEN3_8B), "layers": 36, "hidden": 4096,
                                                        "deepstack_levels": 3}


@pytest.mark.slow
def test_family_shapes_are_the_real_classes_and_layouts():
    """Qwen3-VL-8B / InternVL3.5-8B shapes build the families' real classes through their adapters:
    analytic LM size = what lm_dims counts, each family's own grid (32 frames -> 16x256 for Qwen3-VL,
    32x256 for InternVL) and prompt layout (a timestamp + markers per step; "FrameK: <img>...</img>")."""
    from benchmarks.shapes import FAMILY_SHAPES, build_family_mllm, lm_dims_of
    from pipeline.data.prompts import qa_prompt
    from pipeline.evaluation import lm_dims

    prompt = qa_prompt("what color is the circle ?")
    for name, cls, grid, levels in (("qwen3-vl-8b", "Qwen3VLForConditionalGeneration", (16, 16, 16), 1),
                                    ("internvl3.5-8b", "InternVLForConditionalGeneration", (32, 16, 16), 0)):
        shape = FAMILY_SHAPES[name]
        ad = build_family_mllm(shape, 1)
        assert type(ad.model).__name__ == cls, name
        dims = lm_dims(ad)
        assert dims == lm_dims_of(shape.lm, 1), name
        assert getattr(ad, "deepstack_levels", 0) == levels, name
        assert ad.visual_grid(32) == grid, name
        T, N = grid[0], grid[1] * grid[2]
        tpl = ad._template(prompt, None, T, N)
        assert int((tpl.slot >= 0).sum()) == T * N, name
        text = ad.tokenizer.convert_ids_to_tokens(tpl.ids[tpl.slot < 0].tolist())
        if name == "qwen3-vl-8b":
            assert text.count("<|vision_start|>") == text.count("<|vision_end|>") == text.count("seconds") == 16
        else:
            assert text.count("<img>") == text.count("</img>") == text.count("frame") == 32
        del ad


@pytest.mark.unit
def test_length_buckets_cover_rows_within_budget():
    from pipeline.trainer import length_buckets

    kept = [5, 1, 9, 3, 3, 7, 2, 8]
    b = length_buckets(kept)
    assert len(b) == 1 and sorted(b[0]) == list(range(8))
    b = length_buckets(kept, max_tokens=20)
    assert sorted(i for bk in b for i in bk) == list(range(8))
    for bk in b:
        assert len(bk) == 1 or len(bk) * max(kept[i] for i in bk) <= 20
    flat = [kept[i] for bk in b for i in bk]
    assert flat == sorted(kept)  # ascending length order across buckets
    assert all(len(bk) <= 3 for bk in length_buckets(kept, max_rows=3))


@pytest.mark.unit
def test_score_packed_equals_one_batch():
    """Padding-aware scoring (CE_full apart, masked rows length-sorted into buckets, CE_full from a
    cache) gives what the rollout's single padded adapter.score call gives."""
    from benchmarks.shapes import padding_stats
    from pipeline.trainer import score_packed
    from pipeline.mllm.loader import adapter_for

    model, tok = build_tiny_mllm("llava_onevision")
    ad = adapter_for(model, tok)
    g = torch.Generator().manual_seed(0)
    B, G, T = 3, 4, 4
    X = torch.randn(B, T, 4, 32, generator=g)
    M = T * 4
    masks = torch.rand(B, G, M, generator=g) < torch.tensor([0.9, 0.4, 0.15]).view(B, 1, 1)
    masks[..., 0] = True
    prompts = ["<video> what color is the circle", "<video> describe the video", "<video> which way"]
    targets = ["red", "a square moves left", "up"]
    keep = torch.cat([torch.ones(B, 1, M, dtype=torch.bool), masks], 1)
    ref = ad.score(X, keep, prompts, targets)
    ce_full, ce, stats = score_packed(ad, X, masks, prompts, targets)
    torch.testing.assert_close(ce_full, ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ce, ref[:, 1:], atol=1e-5, rtol=1e-5)
    assert stats["calls"] == 2 and stats["padded_visual_tokens"] <= B * G * M
    _, ce2, stats2 = score_packed(ad, X, masks, prompts, targets, ce_full=ce_full, max_tokens=12)
    torch.testing.assert_close(ce2, ref[:, 1:], atol=1e-5, rtol=1e-5)
    assert stats2["calls"] > 1 and stats2["padded_visual_tokens"] <= stats["padded_visual_tokens"]
    ps = padding_stats(ad.masked_batch(X, keep, prompts, targets).lengths)
    assert ps["rows"] == B * (G + 1) and 0.0 <= ps["waste"] < 1.0


@pytest.mark.unit
def test_wait_and_idle_fractions():
    from benchmarks.shapes import idle_fractions, wait_fractions

    w = wait_fractions([5.0, 0.1, 0.1, 0.0], [6.0, 1.0, 1.0, 1.0])
    assert w["all"] == pytest.approx(5.2 / 9.0, abs=1e-4) and w["steady"] == pytest.approx(0.2 / 3.0, abs=1e-4)
    calls = [("a", 0.0, 1.0), ("a", 1.5, 2.5), ("a", 2.5, 3.5), ("b", 0.0, 1.0), ("b", 1.0, 2.0), ("b", 2.0, 3.0)]
    i = idle_fractions(calls, skip_first=0)
    assert i["per_actor"]["a"] == pytest.approx(0.5 / 3.5, abs=1e-4) and i["per_actor"]["b"] == 0.0
    assert i["calls"] == 6 and i["mean"] == pytest.approx(0.5 / 3.5 / 2, abs=1e-4)


@pytest.mark.unit
def test_report_keeps_notes_after_marker(tmp_path):
    from benchmarks.run import END_MARK, write_report

    out = tmp_path / "B.md"
    write_report(out, f"# figures v1\n{END_MARK}\n")
    out.write_text(out.read_text() + "## Notes\nhand-written\n")
    write_report(out, f"# figures v2\n{END_MARK}\n")
    text = out.read_text()
    assert "figures v2" in text and "figures v1" not in text and text.endswith("## Notes\nhand-written\n")


# ------------------------------------------------------------------------------------- the job
@pytest.mark.slow
def test_benchmark_prefill_family_rows(tmp_path):
    """``--sections prefill`` prints and reports the Qwen3-VL-8B and InternVL3.5-8B rows (quick: 2
    frames at each family's own grid, 1 of 36 layers on a CPU): structure only, not wall time."""
    out, js = tmp_path / "B.md", tmp_path / "b.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "benchmark.py"), "--quick", "--sections", "prefill", "--lms", "",
                        "--families", "qwen3-vl-8b,internvl3.5-8b", "--out", str(out), "--json-out", str(js)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    pre = json.loads(js.read_text())["prefill"]
    assert set(pre) == {"score-tiny", "qwen3-vl-8b", "internvl3.5-8b"}
    for name, steps, levels in (("qwen3-vl-8b", 1, 1), ("internvl3.5-8b", 2, 0)):
        m = pre[name]
        assert (m["hidden"], m["full_layers"], m["tokens_per_frame"], m["video_frames"]) == (4096, 36, 256, 2), name
        assert m["frames"] == steps and m["visual_tokens"] == steps * 256, name
        assert (m["deepstack_levels"], m["deepstack_levels_full_depth"]) == (levels, 3 if levels else 0), name
        assert m["full_length"] > m["visual_tokens"] + steps, name  # the per-step/per-frame text is there
        assert [r["retention"] for r in m["rows"]] == [1.0, 0.5, 0.25, 0.1, 0.05], name
        limits = [r["flops_limit"] for r in m["rows"]]
        assert limits[0] == 1.0 and limits == sorted(limits), name
        assert all(r["prefill_ms"] > 0 and r["speedup"] > 0 for r in m["rows"]), name
    md = out.read_text()
    assert "| qwen3-vl-8b (1/36, 1x256, 2 frames) | 10% |" in md and "| internvl3.5-8b (1/36, 2x256, 2 frames) | 10% |" in md
    assert "DeepStack levels run: 1 of 3" in md


@pytest.mark.ray
@pytest.mark.slow
def test_benchmark_quick_end_to_end(tmp_path):
    out = tmp_path / "BENCH.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "benchmark.py"), "--quick", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    seconds = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("headline", "machine", "prefill", "scoring", "actors", "weight_sync", "data", "stage", "seconds"):
        assert key in s, key
    assert s["out"] == str(out)

    def finite_pos(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0

    # 1. prefill: score-tiny and a Qwen2-0.5B-shaped LM, every retention, speedups finite, limits >= 1
    assert set(s["prefill"]) >= {"score-tiny", "qwen2-0.5b"}
    for name, m in s["prefill"].items():
        rets = [r["retention"] for r in m["rows"]]
        assert rets == [1.0, 0.5, 0.25, 0.1, 0.05], name
        for r in m["rows"]:
            assert finite_pos(r["speedup"]) and finite_pos(r["flops_limit"]) and r["flops_limit"] >= 1.0, (name, r)
        assert m["rows"][-1]["flops_limit"] > m["rows"][1]["flops_limit"]
        assert finite_pos(m["compressor_pct_measured"]) and finite_pos(m["compressor_flops_pct"])
    q = s["prefill"]["qwen2-0.5b"]
    assert q["hidden"] == 896 and q["tokens_per_frame"] == 196 and q["full_layers"] == 24
    # 2. scoring: throughputs and the padding-aware gain at low keep ratios
    sc = s["scoring"]
    for r in sc["rows"]:
        for k in ("score_seq_s", "bare_seq_s", "packed_seq_s", "packed_cached_seq_s"):
            assert finite_pos(r[k]), (k, r)
        assert math.isfinite(r["overhead_vs_bare"]) and 0.0 <= r["pad_waste"] < 1.0
    assert sc["rows"][-1]["pad_waste"] > sc["rows"][-1]["pad_waste_packed"]
    assert finite_pos(sc["rollout"]["rollout_seq_s"])
    # 3. actors, 4. weight sync, 5. data, 6. stage
    a = s["actors"]
    assert finite_pos(a["one_actor_seq_s"]) and finite_pos(a["two_actors_seq_s"]) and finite_pos(a["scaling_2_vs_1"])
    assert finite_pos(a["cache_gain_cpu"])
    ws = s["weight_sync"]
    assert all(finite_pos(r["publish_ms"]) and finite_pos(r["pull_ms"]) for r in ws["rows"])
    assert all(0 < r["publish_call_ms"] <= r["publish_ms"] for r in ws["rows"])
    for v in ws["state_mb_per_record"].values():
        assert v["bfloat16"] * 2 == pytest.approx(v["float32"], abs=2e-3)
    for k in ("pseudo_ray_data", "video_ray_data", "video_decode_in_process", "world_synthesis_in_process"):
        assert s["data"][k]["clips"] > 0 and finite_pos(s["data"][k]["clips_s"]), k
    st = s["stage"]
    assert st["steps"] == 3 and finite_pos(st["rollouts_per_s_end_to_end"]) and finite_pos(st["steps_per_s_end_to_end"])
    assert 0.0 <= st["learner_data_wait"]["all"] <= 1.0 and finite_pos(st["weight_sync_ms_median"])
    assert st["rollout_actor_idle"]["calls"] >= 1
    h = s["headline"]
    assert finite_pos(h["prefill_speedup_10pct/qwen2-0.5b"]) and finite_pos(h["actors_scaling_2_vs_1"])

    md = out.read_text()
    for head in ("# Benchmarks", "## 1. Prefill speedup", "## 2. Rollout scoring", "## 3. Rollout actors",
                 "## 4. Weight sync", "## 5. Data ingest", "## 6. One Ray stage", "--quick", "Machine:"):
        assert head in md, head
    assert "| qwen2-0.5b (2/24, 8x196) | 10% |" in md
    print(f"benchmark --quick took {seconds:.0f} s")

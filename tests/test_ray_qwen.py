"""One Ray stage and its evaluation with the Qwen2.5-VL and the Qwen3-VL adapters, on tiny random models.

Each model (the family's tiny builder, ``pipeline.mllm.registry.family(kind)``: patch 4, spatial
merge 2, temporal patch 2, out width 32; Qwen3-VL with DeepStack features, which the rollouts,
the scoring and the evaluation carry with the kept tokens) is saved with ``save_pretrained`` plus a
``preprocessor_config.json`` fixing 16x16 frames (2x2 tokens per step), so the rollout actors and
the evaluation job load it from disk through ``load_mllm`` like a real checkpoint. Qwen merges
every 2 frames into one token step: the 4-frame clips become ``T' = 2`` steps of 4 tokens. Two
learner steps with real rollouts and the real DeepSpeed learner, then the evaluation job on two
held-out videos of a small generated world.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import WorldConfig, load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
STEPS, FRAMES, SIZE = 2, 4, 16
T_PRIME = FRAMES // 2  # Qwen's temporal merge (temporal_patch_size 2)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def qwen_assets(request, tmp_path_factory):
    """``root/world`` (8 images, 2 held-out videos), ``root/qwen`` (the tiny model of the family
    ``request.param`` in save_pretrained layout) and ``root/cfg.yaml``."""
    from pipeline.data.world import generate_world
    from pipeline.mllm.registry import family

    kind = request.param
    root = tmp_path_factory.mktemp(f"{kind}-stage")
    generate_world(WorldConfig(images=8, videos=2, heldout_videos=2, frames=FRAMES, size=32, grid=2, object_size=0.25,
                               jitter=0, max_objects=2), root / "world", progress=False)
    model, tok = family(kind).build_tiny()
    model.save_pretrained(root / "qwen")
    tok.save_pretrained(root / "qwen")
    (root / "qwen" / "preprocessor_config.json").write_text(json.dumps({"size": {"height": SIZE, "width": SIZE}}))
    stage = {"steps": STEPS, "batch_size": 2, "group_size": 2, "lr": 3e-3}
    tree = {
        "run": {"name": "qwen", "storage": str(root / "runs"), "seed": 0, "call_timeout_s": 60},
        "data": {"image_shards": str(root / "world" / "images"), "video_shards": str(root / "world" / "videos"),
                 "frame_size": SIZE, "pseudo_images": 2, "pseudo_repeat": 2, "video_frames": FRAMES, "batch_size": 2},
        "mllm": {"path": str(root / "qwen"), "kind": kind},
        "policy": {"hidden": 32, "layers": 1, "heads": 2},
        "stage": {"pseudo_video": stage, "real_video": stage},
        "rollout": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5, "max_staleness": 2},
        "learner": {"num_workers": 1, "cpus_per_worker": 0.5, "zero_stage": 1, "fit_timeout_s": 600},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(tree))
    return root


def _evaluate_job():
    """``jobs/evaluate.py`` as a module (run in-process, as tests/test_baselines_eval.py does)."""
    sys.path.insert(0, str(ROOT / "jobs"))
    spec = importlib.util.spec_from_file_location("job_evaluate_qwen", ROOT / "jobs" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_qwen_stage_and_evaluation(ray_cluster, qwen_assets, tmp_path, monkeypatch, capsys):
    from actors.stage import run_stage
    from pipeline.policy import ScorePolicy

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    cfg = load_config(qwen_assets / "cfg.yaml")
    s = run_stage(cfg, "pseudo_video", log=None)
    assert s["steps_done"] == STEPS and s["final_version"] == STEPS and not s["exhausted"]
    assert s["start_sha"] != s["final_sha"]  # the DeepSpeed learner changed the weights
    assert all(math.isfinite(s[part]["reward"]) for part in ("first", "last")), (s["first"], s["last"])
    policy = ScorePolicy.from_pretrained(s["policy"])
    assert policy.embed_dim == 32  # Qwen2.5-VL's merger output width

    # the rollout records the actors produce carry Qwen's merged grid: X is [B, T', N, D] with
    # T' = frames / 2 (the same RolloutWorker the stage's actor pool runs, called in-process)
    import ray

    from actors import data_stream as stream
    from actors.policy_store import create_store, store_name
    from actors.rollout import RolloutWorker, columns_to_records
    from pipeline.trainer import RolloutBatch

    name = store_name("qwen-records", "pseudo_video")
    store = create_store(name)
    try:
        ray.get(store.publish.remote(0, policy.state_dict()), timeout=60)
        samples = stream.pseudo_video_dataset(cfg, 0).take_batch(2, batch_format="numpy")
        assert samples["frames"].shape[1] == FRAMES
        (out,) = list(RolloutWorker(cfg.model_dump(), "pseudo_video", name, seed=1)(samples))
    finally:
        ray.kill(store)
    rb = RolloutBatch.from_records(columns_to_records(out))
    assert rb.X.shape == (2, T_PRIME, 4, 32) and rb.grid == (2, 2) and rb.num_tokens == T_PRIME * 4
    assert rb.ce.isfinite().all() and rb.dce.isfinite().all()

    out = tmp_path / "eval"
    summary = _evaluate_job().main([
        "--mllm", str(qwen_assets / "qwen"), "--compressor", s["policy"], "--world", str(qwen_assets / "world"),
        "--methods", "score,uniform", "--retention", "0.5", "--out", str(out), "--limit", "2",
        "--timing-videos", "1", "--timing-repeats", "1", "--no-overlays"])
    capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    assert res["setup"]["grid"] == [T_PRIME, 2, 2] and res["setup"]["tokens_per_video"] == T_PRIME * 4
    assert res["setup"]["frames"] == FRAMES and res["setup"]["videos"] == 2
    assert 0.0 <= res["full"]["accuracy"] <= 1.0 and 0.0 <= res["full"]["option_accuracy"] <= 1.0
    assert {(r["method"], r["retention"]) for r in res["rows"]} == {("score", 0.5), ("uniform", 0.5)}
    for row in res["rows"]:
        assert row["n"] == 2 and row["k"] == T_PRIME * 2  # K = ceil(0.5 * 8)
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["option_accuracy"] <= 1.0
    assert set(summary["accuracy"]) == {"score", "uniform"} and summary["videos"] == 2

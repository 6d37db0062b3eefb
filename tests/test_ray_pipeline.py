"""Distributed pipeline on a real local Ray cluster: PolicyStore, rollout actor pool, DeepSpeed
learner in Ray Train, one stage end to end, and the curriculum as Ray jobs.

Tiny everything: a random LLaVA-OneVision (16x16 frames -> 2x2 tokens per frame, D=32) saved to a
tmp dir so actors load it with ``load_mllm``; a 16-image / 8-video shapes world; a policy of
hidden 32 and one layer; 3 steps per stage. DeepSpeed's shm comm op compiles once (~30 s) into
torch's extension cache (``~/.cache/torch_extensions``); later runs reuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import build_tiny_mllm
from pipeline.config import Config, WorldConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """``root/world/{images,videos}``, ``root/mllm`` (tiny LLaVA-OV) and ``root/cfg.yaml``."""
    from pipeline.data.world import generate_world

    root = tmp_path_factory.mktemp("raypipe")
    generate_world(WorldConfig(images=16, videos=8, frames=4, size=32, grid=2, object_size=0.25, jitter=0,
                               max_objects=2), root / "world", progress=False)
    model, tok = build_tiny_mllm("llava_onevision")
    model.save_pretrained(root / "mllm")
    tok.save_pretrained(root / "mllm")
    stage = {"steps": STEPS, "batch_size": 2, "group_size": 4, "lr": 3e-3}
    tree = {
        "run": {"name": "t", "storage": str(root / "runs"), "seed": 0, "call_timeout_s": 60},
        "data": {"image_shards": str(root / "world" / "images"), "video_shards": str(root / "world" / "videos"),
                 "frame_size": 16, "pseudo_images": 2, "pseudo_repeat": 2, "video_frames": 4, "batch_size": 2},
        "mllm": {"path": str(root / "mllm")},
        "policy": {"hidden": 32, "layers": 1, "heads": 2},
        "stage": {"pseudo_video": stage, "real_video": stage},
        "rollout": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5, "max_staleness": 2},
        "learner": {"num_workers": 1, "cpus_per_worker": 0.5, "zero_stage": 1, "fit_timeout_s": 600},  # the first run compiles the shm comm op
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(tree))
    return root


def _cfg(assets: Path, *overrides: str) -> Config:
    return load_config(assets / "cfg.yaml", list(overrides))


def _scalars(logdir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


# ------------------------------------------------------------------------------------- units
def test_filter_stale_drops_and_counts():
    from actors.learner import filter_stale, largest_shape_group

    recs = [{"policy_version": v, "X": np.zeros((2, 4, 3)), "mask_bits": np.zeros((4, 1))} for v in (0, 1, 2, 3, 5, 6)]
    kept, dropped = filter_stale(recs, current_version=5, max_staleness=2)
    assert [r["policy_version"] for r in kept] == [3, 5, 6] and dropped == 3
    kept, dropped = filter_stale(recs, current_version=5, max_staleness=0)
    assert [r["policy_version"] for r in kept] == [5, 6] and dropped == 4
    assert filter_stale([], 3, 1) == ([], 0)
    odd = recs[:2] + [{"policy_version": 0, "X": np.zeros((3, 4, 3)), "mask_bits": np.zeros((4, 2))}]
    group, left_out = largest_shape_group(odd)
    assert len(group) == 2 and left_out == 1


def test_config_learner_section():
    cfg = Config()
    assert cfg.learner.num_workers == 1 and cfg.learner.zero_stage in (0, 1, 2)
    with pytest.raises(Exception, match="zero_stage"):
        load_config(None, ["learner.zero_stage=3"])


def test_policy_store_and_rollout_worker(ray_cluster, assets):
    """The store versions weights; a RolloutWorker (called in-process) pulls the newest version
    between batches, stamps it on its records, and a repeated batch counts as a retry."""
    import ray
    import torch

    from actors.policy_store import create_store, store_name
    from actors.rollout import RolloutWorker, columns_to_records
    from pipeline.data import stream
    from pipeline.trainer import RolloutBatch, init_policy

    cfg = _cfg(assets)
    name = store_name("unit", "pseudo_video")
    store = create_store(name)
    try:
        assert ray.get(store.version.remote(), timeout=30) == -1
        worker = RolloutWorker(cfg.model_dump(), "pseudo_video", name, seed=1)
        samples = stream.pseudo_video_dataset(cfg, 0).take_batch(2, batch_format="numpy")
        out = list(worker(samples))
        assert len(out) == 1 and list(out[0]["policy_version"]) == [0, 0] and list(out[0]["attempt"]) == [1, 1]
        rb = RolloutBatch.from_records(columns_to_records(out[0]))
        assert rb.size == 2 and rb.group_size == 4 and rb.X.shape == (2, 4, 4, 32)

        pol = init_policy(32, cfg.policy, 0)
        with torch.no_grad():
            pol.head.bias.fill_(-3.0)  # keep prob ~0.05: new weights are visible in the records
        ray.get(store.publish.remote(1, pol.state_dict()), timeout=30)
        with pytest.raises(ray.exceptions.RayTaskError, match="older"):
            ray.get(store.publish.remote(0, pol.state_dict()), timeout=30)
        assert ray.get(store.version.remote(), timeout=30) == 1
        out2 = list(worker(samples))  # the same batch again: attempt 2, counted as a retry
        r2 = columns_to_records(out2[0])
        assert [int(r["policy_version"]) for r in r2] == [1, 1] and [int(r["attempt"]) for r in r2] == [2, 2]
        assert float(np.mean(r2[0]["old_logits"])) < -2.0
        assert ray.get(store.retries.remote(), timeout=30) == 1
        v, sd = ray.get(store.latest.remote(), timeout=30)
        assert v == 1 and set(sd) == set(pol.state_dict())
    finally:
        ray.kill(store)


# ------------------------------------------------------------------------------------- one stage
def test_stage_end_to_end(ray_cluster, assets, monkeypatch):
    """Rollout actor pool (Ray Data) -> DeepSpeed learner (Ray Train), streaming: learner steps
    happen, the PolicyStore version advances with them, rollouts carry versions within the
    staleness bound, TensorBoard has the scalars, the final policy is saved."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    from train_stage import run_stage
    from pipeline.policy import ScorePolicy

    cfg = _cfg(assets, "run.name=e2e")
    lines: list[str] = []
    s = run_stage(cfg, "pseudo_video", log=lines.append)
    assert s["steps_done"] == STEPS and s["final_version"] == STEPS and not s["exhausted"]
    assert s["store"]["version"] == STEPS and s["store"]["batches"] >= STEPS and s["retries"] == 0
    assert s["start_sha"] != s["final_sha"]  # the learner changed the weights
    assert any("[pseudo_video] 3 steps" in ln for ln in lines)
    pol = ScorePolicy.from_pretrained(s["policy"])
    assert pol.embed_dim == 32 and Path(s["policy"]) == assets / "runs" / "e2e" / "pseudo_video" / "policy"

    sc = _scalars(Path(s["tensorboard"]))
    for tag in ("reward", "dce/min", "sparsity/kept_ratio", "adv/std", "policy/entropy", "policy/version",
                "policy/version_lag", "rollout/dropped_stale", "data/quarantined", "rollouts/s", "timing/data",
                "timing/rollout", "timing/learn", "timing/weight_sync"):
        assert tag in sc and len(sc[tag]) == STEPS, tag
    assert sc["policy/version"] == [1.0, 2.0, 3.0]
    lags = sc["policy/version_lag"]
    assert all(0 <= lag <= cfg.rollout.max_staleness for lag in lags)  # records carry their versions


# ------------------------------------------------------------------------------------- curriculum
def test_curriculum_as_ray_jobs(assets):
    """``python jobs/train_curriculum.py`` with no cluster: starts a local head with the job
    server, runs both stages as Ray jobs (stage 2 from stage 1's policy), prints the JSON summary
    last; a re-run (new head, no job history) skips both finished stages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "jobs" / "train_curriculum.py"), "--config", str(assets / "cfg.yaml"),
           "--run", "cur"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    run_dir = assets / "runs" / "cur"
    assert summary["final_policy"] == f"{run_dir}/final/policy/"
    assert summary["tensorboard"] == f"{run_dir}/tensorboard/"
    assert (run_dir / "final" / "policy" / "model.safetensors").is_file()
    st = summary["stages"]
    assert st["pseudo_video"]["job"] == "cur-pseudo_video" and st["real_video"]["job"] == "cur-real_video"
    assert st["real_video"]["init_from"] == f"{run_dir}/pseudo_video/policy"
    for stage in ("pseudo_video", "real_video"):
        assert st[stage]["steps_done"] == STEPS and st[stage]["final_version"] == STEPS
        assert "reward" in _scalars(run_dir / "tensorboard" / stage)
    assert "| [pseudo_video] 3 steps" in p.stdout  # the stage job's log was streamed

    p2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    again = json.loads(p2.stdout.strip().splitlines()[-1])
    assert all(again["stages"][s]["skipped"] for s in ("pseudo_video", "real_video"))

"""The DeepSpeed learner with two data-parallel ranks (gloo on CPU), as ``configs/cluster-large.yaml``
runs it: fed a hand-built stream of real rollout records through Ray Train, every step after the
first finds each rank's whole batch stale (``max_staleness: 0``, records of version 0). Such a rank
still joins the gradient all-reduce with a zero loss, so no rank hangs; the ledger gathered from
both ranks accounts for every record, the drops are counted, and the final policy is saved."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import Config, StageConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS, BATCH, WORKERS, G = 3, 2, 2, 4


def _records(adapter) -> list[dict]:
    """``STEPS * BATCH * WORKERS`` real rollout records of policy version 0 (tiny LLaVA-OV)."""
    from pipeline import trainer as tr
    from pipeline.config import PolicyConfig

    pol = tr.init_policy(adapter.hidden_size, PolicyConfig(hidden=32, layers=1, heads=2), 0)
    scfg = StageConfig(steps=STEPS, batch_size=BATCH, group_size=G)
    out = []
    for i in range(STEPS * WORKERS):
        rng = np.random.default_rng(i)
        samples = [{"sample_id": f"vid:{i}-{j}", "kind": "pseudo_video", "caption": "a red circle",
                    "frames": rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)} for j in range(BATCH)]
        for r in tr.rollout(adapter, pol, samples, scfg, tr.step_generator(0, i), 0).to_records():
            out.append(r | {"epoch": 0})
    return out


def test_two_ranks_with_all_stale_batches(ray_cluster, tiny_mllm, tmp_path):
    import ray

    from actors.learner import make_trainer
    from actors.policy_store import create_store, store_name

    records = _records(tiny_mllm("llava_onevision"))
    stage = {"steps": STEPS, "batch_size": BATCH, "group_size": G, "lr": 3e-3}
    cfg = Config.model_validate({
        "run": {"name": "two-ranks", "storage": str(tmp_path), "seed": 0, "call_timeout_s": 60},
        "policy": {"hidden": 32, "layers": 1, "heads": 2},
        "stage": {"pseudo_video": stage, "real_video": stage},
        "rollout": {"max_staleness": 0},
        "learner": {"num_workers": WORKERS, "cpus_per_worker": 0.5, "zero_stage": 1, "fit_timeout_s": 600,
                    "prefetch_batches": 0, "image_every": 0},
        "checkpoint": {"every": 0},
    })
    name = store_name("two-ranks", "pseudo_video")
    store = create_store(name)
    stage_dir = tmp_path / "two-ranks" / "pseudo_video"
    try:
        trainer = make_trainer(cfg, "pseudo_video", ray.data.from_items(records), store=name,
                               stage_dir=str(stage_dir), tensorboard=None)
        trainer.fit()
        version = ray.get(store.version.remote(), timeout=60)
    finally:
        ray.kill(store)

    summary = json.loads((stage_dir / "learner_summary.json").read_text())
    assert summary["workers"] == WORKERS and summary["steps_done"] == STEPS
    assert summary["final_version"] == STEPS == version  # every step published, stale ones too
    # step 0 learns one batch per rank; steps 1.. find every record one version behind
    stale = (STEPS - 1) * BATCH * WORKERS
    assert summary["dropped_stale"] == stale and summary["dropped_shape"] == 0
    ledger = json.loads((stage_dir / "ledger.json").read_text())
    assert [e["step"] for e in ledger] == list(range(STEPS))
    assert len(ledger[0]["ids"]) == BATCH * WORKERS and ledger[0]["dropped"] == []
    assert all(e["ids"] == [] and len(e["dropped"]) == BATCH * WORKERS for e in ledger[1:])
    consumed = sorted(k for e in ledger for k in e["ids"] + e["dropped"])
    assert consumed == sorted(f"0:{r['sample_id']}" for r in records)  # each record once, from both ranks
    assert summary["start_sha"] != summary["final_sha"]
    assert (stage_dir / "policy" / "model.safetensors").is_file()

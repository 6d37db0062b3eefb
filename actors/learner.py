"""Learner: Ray Train ``TorchTrainer`` whose workers train the policy with DeepSpeed.

Data flow (DESIGN.md section 2): the driver passes the streaming rollout dataset (sample stream ->
``map_batches(RolloutWorker, ActorPoolStrategy)``) as ``datasets={"rollouts": ds}``; every worker
reads its shard with ``ray.train.get_dataset_shard("rollouts").iter_batches(batch_size)``, so the
rollout actors and the learner run at the same time and a rollout lags the learner by at most the
pipeline depth (blocks in flight + ``learner.prefetch_batches``). Per learner step:

1. next rollout batch (``timing/data``); records older than ``rollout.max_staleness`` versions are
   dropped and counted (:func:`filter_stale`; ``rollout/dropped_stale``);
2. split advantages + clipped surrogate (``pipeline.trainer.advantages`` / ``surrogate`` on the
   DeepSpeed engine), ``engine.backward`` + ``engine.step`` (``timing/learn``; the client optimizer
   is ``torch.optim.AdamW`` - DeepSpeed's own Adam JIT-compiles C++ ops);
3. rank 0 publishes weights ``v+1`` to the stage's PolicyStore (``timing/weight_sync``: the
   call's serialization plus the wait for the previous publish's reply - one is in flight at a
   time, so the store's work overlaps the next step);
4. ``ray.train.report(metrics)`` on every rank; rank 0 writes the step's TensorBoard scalars.

At the end rank 0 saves the policy (``save_pretrained``) to ``<stage dir>/policy`` and writes
``<stage dir>/learner_summary.json``. With several workers the ranks agree (all-reduce) on whether
every rank still has data, so no rank waits in a collective for one that ran dry; a rank whose
whole batch is stale still runs the step with zero loss so the gradient all-reduce stays aligned.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline import storage
from pipeline.config import Config

# learner metric names (TensorBoard tags) in addition to pipeline.trainer's
DROPPED_STALE = "rollout/dropped_stale"  # cumulative records dropped for staleness
DROPPED_SHAPE = "rollout/dropped_shape"  # cumulative records dropped: shape differs from the batch's
RETRIES = "rollout/retries"  # rollout batches retried after an actor died (cumulative)
QUARANTINED = "data/quarantined"  # samples quarantined so far
RECORDS = "rollout/records"  # records used this step
CACHE_HIT = "rollout/cache_hit_rate"  # rollout actors' X / CE_full LRU hits per lookup (cumulative)
CKPT_RETRIES = "checkpoint/upload_retries"  # cumulative upload retries (storage errors survived)
CKPT_FAILURES = "checkpoint/failures"  # checkpoints given up after all retries (cumulative)
CKPT_UPLOAD_S = "checkpoint/upload_s"  # seconds the last background upload took


def filter_stale(records: Sequence[Mapping[str, Any]], current_version: int, max_staleness: int
                 ) -> tuple[list[Mapping[str, Any]], int]:
    """``(kept, dropped)``: records whose ``policy_version`` lags ``current_version`` by more than
    ``max_staleness`` are dropped (a record from the future - impossible - is kept)."""
    kept = [r for r in records if int(current_version) - int(r["policy_version"]) <= int(max_staleness)]
    return kept, len(records) - len(kept)


def largest_shape_group(records: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], int]:
    """Records of the most common ``(X, mask_bits)`` shape and state dtype (one RolloutBatch needs
    one of each) and how many others were left out."""
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((np.shape(r["X"]), np.shape(r["mask_bits"]), str(r.get("x_dtype", "float32"))), []).append(r)
    best = max(groups.values(), key=len) if groups else []
    return best, len(records) - len(best)


def deepspeed_config(cfg: Config, stage: str) -> dict[str, Any]:
    scfg = getattr(cfg.stage, stage)
    return {
        "train_micro_batch_size_per_gpu": scfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": scfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.learner.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _save_policy(policy: Any, dest: str, cfg: Config) -> str:
    """``save_pretrained`` to a local directory or an ``s3://`` prefix."""
    if not storage.is_s3(dest):
        return str(policy.save_pretrained(dest))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        policy.save_pretrained(tmp)
        return storage.upload_dir(tmp, dest, cfg.data.s3)


def _all_ranks_true(flag: bool, world: int) -> bool:
    if world <= 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch global RNG states as JSON (restored by :func:`set_rng_state`)."""
    import base64
    import random

    import torch

    np_state = np.random.get_state()
    return {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *[float(x) if isinstance(x, float) else int(x) for x in np_state[2:]]],
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    import base64
    import random

    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))


def ledger_key(epoch: Any, sample_id: Any) -> str:
    """A consumed sample in the ledger: ``"<epoch>:<sample id>"`` (ids repeat across epochs)."""
    return f"{int(epoch)}:{sample_id}"


def consumed_by_epoch(ledger: Sequence[Mapping[str, Any]]) -> dict[int, list[str]]:
    """``{epoch: [sample ids]}`` the learner took off the stream (learned or dropped-and-counted)."""
    out: dict[int, list[str]] = {}
    for entry in ledger:
        for key in list(entry.get("ids", [])) + list(entry.get("dropped", [])):
            e, sid = key.split(":", 1)
            out.setdefault(int(e), []).append(sid)
    return out


def _gather(obj: Any, world: int) -> list[Any]:
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


class _Checkpoints:
    """The learner's side of pipeline/checkpoint.py: stage this rank's files (DeepSpeed's own
    ``save_checkpoint`` for the optimizer, ``save_pretrained`` + ``state.json`` + ``ledger.json`` on
    rank 0) and hand them to the background :class:`~pipeline.checkpoint.CheckpointWriter`."""

    def __init__(self, cfg: Config, root: str, rank: int, world: int):
        from pipeline.checkpoint import CheckpointWriter

        self.cfg, self.root, self.rank = cfg, root, rank
        self.writer = CheckpointWriter(root, cfg.checkpoint, rank=rank, world=world, s3=cfg.data.s3)
        self.window: list[float] = []  # best_metric since the last checkpoint

    def due(self, step: int, last: int) -> bool:
        every = self.cfg.checkpoint.every
        return step == last or (every > 0 and (step + 1) % every == 0)

    def save(self, engine: Any, step: int, state: dict[str, Any], ledger: list[dict[str, Any]]) -> None:
        from pipeline.checkpoint import checkpoint_name, stage_local

        d = stage_local()
        engine.save_checkpoint(str(d / "deepspeed"), tag=checkpoint_name(step))  # collective: every rank
        if self.rank == 0:  # (DeepSpeed writes the model states on rank 0 only; ranks' optimizer shards differ by name)
            engine.module.save_pretrained(d / "policy")
            (d / "state.json").write_text(json.dumps(state | {"rng": rng_state()}, sort_keys=True, default=float))
            (d / "ledger.json").write_text(json.dumps(ledger))
        metric = float(np.mean(self.window)) if self.window else None
        self.window = []
        self.writer.save(step, d, metric)


def _resume_engine(engine: Any, ref: Mapping[str, Any], cfg: Config) -> None:
    """Load DeepSpeed's optimizer state of a checkpoint into ``engine`` (weights were already read
    from safetensors; DeepSpeed's module copy must agree with them)."""
    import tempfile

    from pipeline import checkpoint as ck
    from pipeline import trainer as tr

    with tempfile.TemporaryDirectory(prefix="score-resume-") as tmp:
        local = ck.download(ref["path"], Path(tmp), cfg.data.s3)
        sha = tr.weights_sha(engine.module)
        tag = ck.checkpoint_name(ref["step"])
        path, _ = engine.load_checkpoint(str(local / "deepspeed"), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise ck.CheckpointError(f"checkpoint {ref['path']}: DeepSpeed found no state under deepspeed/{tag}")
    if tr.weights_sha(engine.module) != sha:
        raise ck.CheckpointError(f"checkpoint {ref['path']}: DeepSpeed's model states disagree with policy/model.safetensors")


def mask_image(record: Mapping[str, Any], sampled: Any, logits: Any, grid: tuple[int, int, int],
               retention: float = 0.1) -> np.ndarray:
    """TensorBoard image of one rollout record: its frames, one sampled Bernoulli mask, and the
    policy's deterministic top-K at ``retention`` (what inference would keep)."""
    from pipeline.plots import mask_strip
    from pipeline.select import topk_keep

    T, gh, gw = grid
    top = np.zeros(T * gh * gw, dtype=bool)
    top[topk_keep(logits, retention).numpy()] = True
    return mask_strip(np.asarray(record["thumb"]), [np.asarray(sampled, bool).reshape(T, gh, gw),
                                                    top.reshape(T, gh, gw)])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker loop (see module doc). ``config``: ``cfg`` (Config dump), ``stage``,
    ``store`` (PolicyStore actor name), ``stage_dir``, ``tensorboard``, ``init_policy``,
    ``quarantine`` (a QuarantineLog or None), ``resume`` (``{path, step, state}`` of a verified
    checkpoint, or None)."""
    import deepspeed
    import ray
    import ray.train
    import torch

    from actors.policy_store import get_store
    from actors.rollout import columns_to_records
    from pipeline import checkpoint as ck
    from pipeline import trainer as tr
    from pipeline.metrics import MetricsWriter, ProgressLine, mean_metrics, timed
    from pipeline.policy import ScorePolicy

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cfg = Config.model_validate(config["cfg"])
    stage = config["stage"]
    scfg = getattr(cfg.stage, stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    timeout = cfg.run.call_timeout_s
    store = get_store(config["store"], timeout) if rank == 0 else None
    quarantine = config.get("quarantine")
    resume = config.get("resume")
    rstate: dict[str, Any] = resume["state"] if resume else {}
    start_step = int(resume["step"]) + 1 if resume else 0
    version = int(rstate.get("version", 0))
    counters = dict(rstate.get("counters", {}))
    dropped_stale, dropped_shape = int(counters.get("dropped_stale", 0)), int(counters.get("dropped_shape", 0))
    ledger: list[dict[str, Any]] = []
    if resume and rank == 0:
        ledger = json.loads(storage.read_bytes(storage.join(resume["path"], "ledger.json"), cfg.data.s3))
    writer = (MetricsWriter(config["tensorboard"], purge_step=start_step or None)
              if rank == 0 and config.get("tensorboard") else None)
    ckpts = _Checkpoints(cfg, storage.join(config["stage_dir"], "checkpoints"), rank, world)
    progress = ProgressLine(stage, scfg.steps, start_step, cfg.learner.progress_every_s) if rank == 0 else None

    shard = ray.train.get_dataset_shard("rollouts")
    batches = iter(shard.iter_batches(batch_size=scfg.batch_size, batch_format="numpy",
                                      prefetch_batches=cfg.learner.prefetch_batches))

    t_start = time.perf_counter()
    engine = None
    history: list[dict[str, float]] = []
    exhausted = False
    t_last = time.perf_counter()
    publishing = None  # the PolicyStore's reply to the last publish (rank 0)
    try:
        for step in range(start_step, scfg.steps):
            m: dict[str, float] = {}
            with timed(m, "data"):
                batch = next(batches, None)
            if not _all_ranks_true(batch is not None, world):
                exhausted = True
                break
            records = columns_to_records(batch)
            kept, n_stale = filter_stale(records, version, cfg.rollout.max_staleness)
            dropped_stale += n_stale
            scale = 1.0 if kept else 0.0  # all stale: a zero-loss step keeps collectives aligned
            use, n_shape = largest_shape_group(kept if kept else records)
            dropped_shape += n_shape if kept else 0
            used = {id(r) for r in use} if kept else set()
            rb = tr.RolloutBatch.from_records(use)
            if engine is None:
                if resume:
                    policy = load_checkpoint_policy(resume["path"], cfg)
                elif config.get("init_policy"):
                    policy = ScorePolicy.from_pretrained(config["init_policy"])
                else:  # the rollout actors start from the same seeded weights (version 0)
                    policy = tr.init_policy(int(rb.X.shape[-1]), cfg.policy, cfg.run.seed)
                opt = torch.optim.AdamW(policy.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay)
                engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=opt,
                                                       config=deepspeed_config(cfg, stage))
                if resume:
                    _resume_engine(engine, resume, cfg)
                    set_rng_state(rstate["rng"])
                start_sha = rstate.get("start_sha") or tr.weights_sha(engine.module)
            dev = engine.device
            lr = tr.lr_at(step, scfg)
            for g in engine.optimizer.param_groups:
                g["lr"] = lr
            adv = tr.advantages(rb, scfg)
            m.update(tr.batch_metrics(rb, adv))
            X, masks = rb.X.to(dev), rb.unpacked_masks().to(dev)
            old, adv_d = rb.old_logits.to(dev), adv.to(dev)
            passes = []
            engine.train()
            with timed(m, "learn"):
                for _ in range(scfg.ppo_epochs):
                    out = tr.surrogate(engine, X, rb.grid, masks, old, adv_d, scfg, rb.shift)
                    engine.backward(out["loss"] * scale)
                    engine.step()
                    gn = engine.get_global_grad_norm()
                    passes.append({
                        tr.LOSS: float(out["loss"].detach()), tr.PG_LOSS: float(out["pg_loss"]),
                        tr.ENTROPY: float(out["entropy"]), tr.CLIP_FRAC: float(out["clip_frac"]),
                        tr.APPROX_KL: float(out["approx_kl"]), tr.RATIO: float(out["ratio"]),
                        tr.KEEP_PROB: float(out["keep_prob"]),
                        tr.GRAD_NORM: float(gn) if gn is not None else float("nan"),
                    })
            m.update(mean_metrics(passes))
            lag = float(version - rb.policy_version.float().mean())
            version += 1
            if rank == 0:
                # one publish in flight: the state is serialized into the call here (so the next
                # optimizer step cannot change it), and the store's reply is awaited only before
                # the next publish, off this step's critical path
                with timed(m, "weight_sync"):
                    if publishing is not None:
                        ray.get(publishing, timeout=timeout)
                    publishing = store.publish.remote(version, engine.module.state_dict())
            # the ledger: every record taken off the stream this step, learned or dropped (counted)
            keys = [ledger_key(r.get("epoch", 0), r["sample_id"]) for r in records]
            learned = [k for r, k in zip(records, keys) if id(r) in used]
            dropped = [k for r, k in zip(records, keys) if id(r) not in used]
            parts = _gather((learned, dropped), world)
            if rank == 0:
                ledger.append({"step": step, "ids": [k for p in parts for k in p[0]],
                               "dropped": [k for p in parts for k in p[1]]})
            if cfg.checkpoint.best_metric in m:
                ckpts.window.append(m[cfg.checkpoint.best_metric])
            due = ckpts.due(step, scfg.steps - 1)
            if due:
                with timed(m, "checkpoint"):
                    ckpts.save(engine, step, {
                        "stage": stage, "step": step, "version": version, "run": cfg.run.name,
                        "weights_sha": tr.weights_sha(engine.module), "start_sha": start_sha,
                        "counters": {"dropped_stale": dropped_stale, "dropped_shape": dropped_shape},
                        "config": cfg.model_dump(mode="json"), "metrics": mean_metrics(history[-5:] + [m]),
                        "lr_schedule": {"step": step, "lr": lr}, "world": world, "created": time.time(),
                    }, ledger)
            now = time.perf_counter()
            m.update({
                tr.LR: lr, tr.VERSION: float(version), tr.VERSION_LAG: lag,
                DROPPED_STALE: float(dropped_stale), DROPPED_SHAPE: float(dropped_shape), RECORDS: float(len(use)) * scale,
                "timing/rollout": float(np.mean([float(r.get("rollout_s", 0.0)) for r in use])),
                CACHE_HIT: float(np.mean([float(r.get("cache_hit_rate", 0.0)) for r in use])),
                tr.ROLLOUTS_PER_S: len(use) * world * rb.group_size / max(now - t_last, 1e-9),
            })
            st = ckpts.writer.stats()
            m.update({CKPT_RETRIES: float(st["retries"]), CKPT_FAILURES: float(st["failures"]),
                      CKPT_UPLOAD_S: float(st["last_upload_s"])})
            t_last = now
            if rank == 0 and (step % cfg.learner.log_every == 0 or step == scfg.steps - 1):
                m[RETRIES] = float(ray.get(store.retries.remote(), timeout=timeout))
                if quarantine is not None:
                    m[QUARANTINED] = float(quarantine.total())
            history.append(m)
            if writer is not None and cfg.learner.image_every and step % cfg.learner.image_every == 0 and "thumb" in use[0]:
                T = int(rb.X.shape[1])
                writer.image(f"masks/{stage}", mask_image(use[0], rb.unpacked_masks()[0, 0], rb.old_logits[0],
                                                          (T, *rb.grid)), step)
            if progress is not None and (line := progress.update(step, m, (tr.KEPT, tr.SAFE_FRAC, tr.REWARD))):
                print(line, flush=True)
            if writer is not None and (due or step % cfg.learner.log_every == 0 or step == scfg.steps - 1):
                writer.log(step, m)
                if due:  # TensorBoard is durable up to every checkpoint (a resume purges what follows)
                    writer.flush()
            ray.train.report({k: v for k, v in m.items() if np.isfinite(v)} | {"step": step})
        if publishing is not None:  # the last version is in the store before the stage reports done
            ray.get(publishing, timeout=timeout)
    finally:
        if writer is not None:
            writer.close()
        ckpt_stats = ckpts.writer.close(cfg.checkpoint.commit_timeout_s)

    if rank == 0:
        policy_dir = None
        summary: dict[str, Any] = {"stage": stage, "steps_done": len(history), "exhausted": exhausted,
                                   "start_step": start_step, "resumed_from": resume["path"] if resume else None,
                                   "checkpoints": ckpt_stats | {"root": ckpts.root}}
        # a stage resumed from its last step's checkpoint has nothing left to do but save
        module = engine.module if engine is not None else (load_checkpoint_policy(resume["path"], cfg) if resume else None)
        if module is not None:
            start_sha = start_sha if engine is not None else rstate.get("start_sha", "")
            policy_dir = _save_policy(module, config["stage_dir"].rstrip("/") + "/policy", cfg)
            seconds = time.perf_counter() - t_start
            rollouts = int(sum(h.get(RECORDS, 0.0) for h in history)) * world * scfg.group_size
            summary.update({
                "final_version": version, "dropped_stale": dropped_stale, "dropped_shape": dropped_shape,
                "retries": int(ray.get(store.retries.remote(), timeout=timeout)),
                "quarantined": quarantine.counts() if quarantine is not None else {},
                "seconds": round(seconds, 3), "rollouts": rollouts,
                "rollouts_per_s": rollouts / seconds if seconds > 0 else 0.0,
                "first": mean_metrics(history[:5]), "last": mean_metrics(history[-5:]),
                "start_sha": start_sha, "final_sha": tr.weights_sha(module), "policy": policy_dir,
                "workers": world, "zero_stage": cfg.learner.zero_stage,
                "steps_total": start_step + len(history),
            })
            storage.write_bytes(storage.join(config["stage_dir"], "ledger.json"), json.dumps(ledger).encode(), cfg.data.s3)
        storage.write_bytes(storage.join(config["stage_dir"], "learner_summary.json"),
                            (json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n").encode(), cfg.data.s3)


def load_checkpoint_policy(ckpt_path: str, cfg: Config) -> Any:
    """A checkpoint's policy, read with safetensors (``s3://`` checkpoints are downloaded first)."""
    import tempfile

    from pipeline.policy import ScorePolicy

    with tempfile.TemporaryDirectory(prefix="score-policy-") as tmp:
        if storage.is_s3(ckpt_path):
            for name in ("model.safetensors", "config.json"):
                (Path(tmp) / name).write_bytes(storage.read_bytes(storage.join(ckpt_path, "policy", name), cfg.data.s3))
            return ScorePolicy.from_pretrained(tmp)
        return ScorePolicy.from_pretrained(Path(ckpt_path) / "policy")


def make_trainer(cfg: Config, stage: str, rollouts_ds: Any, *, store: str, stage_dir: str, tensorboard: str | None,
                 init_policy: str | None = None, quarantine: Any = None, resume: Mapping[str, Any] | None = None) -> Any:
    """The stage's ``TorchTrainer`` (``fit()`` not called). Ray Train's own results go to
    ``<stage dir>/ray_train`` on the same storage (an ``s3://`` stage dir passes the project's S3
    filesystem, custom endpoint included, as ``storage_filesystem``)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    lc = cfg.learner
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(lc.health_check_interval_s))
    resources: dict[str, float] = {"CPU": lc.cpus_per_worker}
    if lc.use_gpu:
        resources["GPU"] = 1
    backend = lc.backend if lc.backend != "auto" else ("nccl" if lc.use_gpu else "gloo")
    ray_storage = storage.join(stage_dir, "ray_train")
    fs = None
    if storage.is_s3(ray_storage):
        fs, ray_storage = storage.filesystem(ray_storage, cfg.data.s3)
    else:
        ray_storage = str(Path(ray_storage).resolve())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "stage": stage, "store": store, "stage_dir": stage_dir,
                           "tensorboard": tensorboard, "init_policy": init_policy, "quarantine": quarantine,
                           "resume": dict(resume) if resume else None},
        scaling_config=ScalingConfig(num_workers=lc.num_workers, use_gpu=lc.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=backend),
        datasets={"rollouts": rollouts_ds},
        run_config=RunConfig(name=f"{cfg.run.name}-{stage}", storage_path=ray_storage, storage_filesystem=fs),
    )

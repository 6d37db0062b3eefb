"""Learner: Ray Train ``TorchTrainer`` whose workers train the policy with DeepSpeed.

Data flow (docs/design.md): the driver passes the streaming rollout dataset (sample stream ->
``map_batches(RolloutWorker, ActorPoolStrategy)``) as ``datasets={"rollouts": ds}``; every worker
reads its shard with ``ray.train.get_dataset_shard("rollouts").iter_batches(batch_size)``, so the
rollout actors and the learner run at the same time and a rollout lags the learner by at most the
pipeline depth (blocks in flight + ``learner.prefetch_batches``). Per learner step:

1. next rollout batch (``timing/data``); records older than ``rollout.max_staleness`` versions are
   dropped and counted (:func:`filter_stale`; ``rollout/dropped_stale``);
2. :func:`pipeline.update.ppo_update`, the single-process trainer's update, through
   :class:`DeepSpeedOptimizer` (``engine.backward`` + ``engine.step``; ``timing/learn``);
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

# learner metric names (TensorBoard tags) in addition to pipeline.update's
DROPPED_STALE = "rollout/dropped_stale"  # cumulative records dropped for staleness
DROPPED_SHAPE = "rollout/dropped_shape"  # cumulative records dropped: token grid, width, G or dtype differs from the batch's
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
    """Records of the most common token grid and width ``(N, D)``, group size ``G`` and state
    dtype (one RolloutBatch needs one of each; samples of different ``T'`` are padded by
    ``RolloutBatch.from_records``) and how many others were left out."""
    groups: dict[tuple, list] = {}
    for r in records:
        key = (np.shape(r["X"])[1:], np.shape(r["mask_bits"])[0], str(r.get("x_dtype", "float32")))
        groups.setdefault(key, []).append(r)
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


def _gather(obj: Any, world: int) -> list[Any]:
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


class DeepSpeedOptimizer:
    """The learner's :class:`pipeline.update.Optimizer`: the engine's backward (gradients
    all-reduced across ranks) and step (clipped to ``stage.max_grad_norm`` by DeepSpeed).

    A gradient whose norm is not finite is never applied, on every rank alike (the norm is of the
    all-reduced gradient): ZeRO 1/2's optimizer detects it and skips its step by itself
    (``engine.was_step_applied()``); without ZeRO the engine would step, so the norm is checked
    here first."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.module = engine  # forward through the engine (it owns the module's device and hooks)

    def backward(self, loss: Any) -> None:
        self.engine.backward(loss)

    def step(self) -> tuple[float, bool]:
        import torch

        if self.engine.zero_optimization_stage() == 0:  # no ZeRO optimizer: check before the engine steps
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            gn = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if not np.isfinite(gn):
                self.engine.zero_grad()
                return gn, False
            self.engine.step()
            return gn, True
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        gn = float(norm) if norm is not None else float("nan")
        return gn, bool(self.engine.was_step_applied()) and np.isfinite(gn)

    def set_lr(self, lr: float) -> None:
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr


def build_engine(cfg: Config, stage: str, embed_dim: int, init_policy: str | None, resume: Mapping[str, Any] | None
                 ) -> DeepSpeedOptimizer:
    """The policy (a resumed checkpoint's, ``init_policy``'s, or the seeded fresh one the rollout
    actors also start from as version 0) inside a DeepSpeed engine with AdamW as client optimizer
    (DeepSpeed's own Adam JIT-compiles C++ ops); a resume also loads the optimizer and RNG states."""
    import deepspeed

    from pipeline import checkpoint as ck
    from pipeline.policy import ScorePolicy
    from pipeline.trainer import init_policy as fresh_policy
    from pipeline.update import make_optimizer

    if resume:
        policy = ck.load_policy(resume["path"], cfg.data.s3)
    elif init_policy:
        policy = ScorePolicy.from_pretrained(init_policy, s3=cfg.data.s3)
    else:
        policy = fresh_policy(embed_dim, cfg.policy, cfg.run.seed)
    scfg = getattr(cfg.stage, stage)
    engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=make_optimizer(policy, scfg),
                                           config=deepspeed_config(cfg, stage))
    if resume:
        _resume_engine(engine, resume, cfg)
        ck.set_rng_state(resume["state"]["rng"])
    return DeepSpeedOptimizer(engine)


def _resume_engine(engine: Any, ref: Mapping[str, Any], cfg: Config) -> None:
    """Load DeepSpeed's optimizer state of a checkpoint into ``engine`` (weights were already read
    from safetensors; DeepSpeed's module copy must agree with them)."""
    import tempfile

    from pipeline import checkpoint as ck
    from pipeline.trainer import weights_sha

    with tempfile.TemporaryDirectory(prefix="score-resume-") as tmp:
        local = ck.download(ref["path"], Path(tmp), cfg.data.s3)
        sha = weights_sha(engine.module)
        tag = ck.checkpoint_name(ref["step"])
        path, _ = engine.load_checkpoint(str(local / "deepspeed"), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise ck.CheckpointError(f"checkpoint {ref['path']}: DeepSpeed found no state under deepspeed/{tag}")
    if weights_sha(engine.module) != sha:
        raise ck.CheckpointError(f"checkpoint {ref['path']}: DeepSpeed's model states disagree with policy/model.safetensors")


def usable_records(records: Sequence[Mapping[str, Any]], version: int, max_staleness: int
                   ) -> tuple[list[Mapping[str, Any]], float, int, int]:
    """``(use, loss_scale, stale, other_shape)`` of one rank's batch: the fresh records of the
    largest shape group. A batch that is all stale is still used with ``loss_scale`` 0, so the
    rank joins the gradient all-reduce of its step (its records count as dropped)."""
    kept, stale = filter_stale(records, version, max_staleness)
    if not kept:
        use, _ = largest_shape_group(records)
        return use, 0.0, stale, 0
    use, other_shape = largest_shape_group(kept)
    return use, 1.0, stale, other_shape


class Publisher:
    """Rank 0's side of the PolicyStore: one publish in flight. The weights are serialized into the
    call at once (the next optimizer step cannot change them) and its reply is awaited only before
    the next publish, off the step's critical path."""

    def __init__(self, store: Any, timeout_s: float):
        self.store, self.timeout_s, self.pending = store, timeout_s, None

    def publish(self, version: int, state_dict: Mapping[str, Any]) -> None:
        self.wait()
        self.pending = self.store.publish.remote(version, state_dict)

    def wait(self) -> None:
        import ray

        if self.pending is not None:
            ray.get(self.pending, timeout=self.timeout_s)
            self.pending = None

    def retries(self) -> int:
        import ray

        return int(ray.get(self.store.retries.remote(), timeout=self.timeout_s))


class Ledger:
    """Every record a step took off the stream, learned or dropped-and-counted, gathered from all
    ranks on rank 0 (``ledger.json``: what a resumed stage skips, so each sample is used once per
    epoch)."""

    def __init__(self, entries: list[dict[str, Any]], rank: int, world: int):
        self.entries, self.rank, self.world = entries, rank, world

    def record(self, step: int, records: Sequence[Mapping[str, Any]], used: Sequence[Mapping[str, Any]],
               scale: float, stale: int, other_shape: int) -> tuple[int, int]:
        """Add the step's records of every rank; returns its ``(stale, other_shape)`` drops summed
        over ranks (so every rank's counters, and a checkpoint's, count the whole stage)."""
        from pipeline.checkpoint import ledger_key

        learned_ids = {id(r) for r in used} if scale > 0 else set()
        keys = [(ledger_key(r.get("epoch", 0), r["sample_id"]), id(r) in learned_ids) for r in records]
        parts = _gather(([k for k, ok in keys if ok], [k for k, ok in keys if not ok], stale, other_shape), self.world)
        if self.rank == 0:
            self.entries.append({"step": step, "ids": [k for p in parts for k in p[0]],
                                 "dropped": [k for p in parts for k in p[1]]})
        return sum(p[2] for p in parts), sum(p[3] for p in parts)


class Checkpoints:
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

    def observe(self, m: Mapping[str, float]) -> None:
        if self.cfg.checkpoint.best_metric in m:
            self.window.append(m[self.cfg.checkpoint.best_metric])

    def save(self, engine: Any, step: int, state: dict[str, Any], ledger: list[dict[str, Any]]) -> None:
        from pipeline.checkpoint import checkpoint_name, rng_state, stage_local

        d = stage_local()
        engine.save_checkpoint(str(d / "deepspeed"), tag=checkpoint_name(step))  # collective: every rank
        if self.rank == 0:  # (DeepSpeed writes the model states on rank 0 only; ranks' optimizer shards differ by name)
            engine.module.save_pretrained(d / "policy")
            (d / "state.json").write_text(json.dumps(state | {"rng": rng_state()}, sort_keys=True, default=float))
            (d / "ledger.json").write_text(json.dumps(ledger))
        metric = float(np.mean(self.window)) if self.window else None
        self.window = []
        self.writer.save(step, d, metric)

    def stats(self) -> dict[str, float]:
        st = self.writer.stats()
        return {CKPT_RETRIES: float(st["retries"]), CKPT_FAILURES: float(st["failures"]),
                CKPT_UPLOAD_S: float(st["last_upload_s"])}


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


def record_metrics(use: Sequence[Mapping[str, Any]], scale: float, world: int, group_size: int,
                   seconds: float) -> dict[str, float]:
    """What the rollout records of a step say about the rollout side."""
    from pipeline.update import ROLLOUTS_PER_S

    return {RECORDS: float(len(use)) * scale,
            "timing/rollout": float(np.mean([float(r.get("rollout_s", 0.0)) for r in use])),
            CACHE_HIT: float(np.mean([float(r.get("cache_hit_rate", 0.0)) for r in use])),
            ROLLOUTS_PER_S: len(use) * world * group_size / max(seconds, 1e-9)}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker loop (see module doc). ``config``: ``cfg`` (Config dump), ``stage``,
    ``store`` (PolicyStore actor name), ``stage_dir``, ``tensorboard``, ``init_policy``,
    ``quarantine`` (a QuarantineLog or None), ``resume`` (``{path, step, state}`` of a verified
    checkpoint, or None)."""
    import ray.train
    import torch

    from actors.policy_store import get_store
    from actors.rollout import columns_to_records
    from pipeline import update as up
    from pipeline.metrics import MetricsWriter, ProgressLine, mean_metrics, timed
    from pipeline.trainer import RolloutBatch, weights_sha

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cfg, stage = Config.model_validate(config["cfg"]), config["stage"]
    scfg, lc, window = getattr(cfg.stage, stage), cfg.learner, cfg.learner.summary_window
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    resume, quarantine = config.get("resume"), config.get("quarantine")
    rstate: dict[str, Any] = resume["state"] if resume else {}
    start_step, version = (int(resume["step"]) + 1 if resume else 0), int(rstate.get("version", 0))
    dropped = {"dropped_stale": 0, "dropped_shape": 0} | {k: int(v) for k, v in rstate.get("counters", {}).items()}
    lead = rank == 0
    publisher = Publisher(get_store(config["store"], cfg.run.call_timeout_s), cfg.run.call_timeout_s) if lead else None
    ledger = Ledger(json.loads(storage.read_bytes(storage.join(resume["path"], "ledger.json"), cfg.data.s3))
                    if resume and lead else [], rank, world)
    writer = MetricsWriter(config["tensorboard"], purge_step=start_step or None) if lead and config.get("tensorboard") else None
    ckpts = Checkpoints(cfg, storage.join(config["stage_dir"], "checkpoints"), rank, world)
    progress = ProgressLine(stage, scfg.steps, start_step, lc.progress_every_s) if lead else None
    batches = iter(ray.train.get_dataset_shard("rollouts").iter_batches(
        batch_size=scfg.batch_size, batch_format="numpy", prefetch_batches=lc.prefetch_batches))

    opt, start_sha, history, exhausted = None, rstate.get("start_sha", ""), [], False
    t_start = t_last = time.perf_counter()
    try:
        for step in range(start_step, scfg.steps):
            m: dict[str, float] = {}
            with timed(m, "data"):
                batch = next(batches, None)
            if not _all_ranks_true(batch is not None, world):
                exhausted = True
                break
            records = columns_to_records(batch)
            use, scale, n_stale, n_shape = usable_records(records, version, cfg.rollout.max_staleness)
            rb = RolloutBatch.from_records(use)
            if opt is None:
                opt = build_engine(cfg, stage, int(rb.X.shape[-1]), config.get("init_policy"), resume)
                start_sha = start_sha or weights_sha(opt.engine.module)
            lr = up.lr_at(step, scfg)
            opt.set_lr(lr)
            with timed(m, "learn"):
                m.update(up.ppo_update(opt, rb, scfg, loss_scale=scale))
            lag = float(version - rb.policy_version.float().mean())
            version += 1
            if publisher is not None:
                with timed(m, "weight_sync"):
                    publisher.publish(version, opt.engine.module.state_dict())
            n_stale, n_shape = ledger.record(step, records, use, scale, n_stale, n_shape)
            dropped["dropped_stale"] += n_stale
            dropped["dropped_shape"] += n_shape
            ckpts.observe(m)
            if due := ckpts.due(step, scfg.steps - 1):
                with timed(m, "checkpoint"):
                    ckpts.save(opt.engine, step, {
                        "stage": stage, "step": step, "version": version, "run": cfg.run.name,
                        "weights_sha": weights_sha(opt.engine.module), "start_sha": start_sha,
                        "counters": dropped, "config": cfg.model_dump(mode="json"),
                        "metrics": mean_metrics(history[-window:] + [m]), "lr_schedule": {"step": step, "lr": lr},
                        "world": world, "created": time.time()}, ledger.entries)
            now = time.perf_counter()
            m.update({up.LR: lr, up.VERSION: float(version), up.VERSION_LAG: lag,
                      DROPPED_STALE: float(dropped["dropped_stale"]), DROPPED_SHAPE: float(dropped["dropped_shape"]),
                      **record_metrics(use, scale, world, rb.group_size, now - t_last), **ckpts.stats()})
            t_last = now
            if lead and (step % lc.log_every == 0 or step == scfg.steps - 1):
                m[RETRIES] = float(publisher.retries())
                m.update({QUARANTINED: float(quarantine.total())} if quarantine is not None else {})
            history.append(m)
            if lead:
                _log_step(writer, progress, cfg, stage, step, m, rb, use[0], due)
            ray.train.report({k: v for k, v in m.items() if np.isfinite(v)} | {"step": step})
        if publisher is not None:  # the last version is in the store before the stage reports done
            publisher.wait()
    finally:
        if writer is not None:
            writer.close()
        ckpt_stats = ckpts.writer.close(cfg.checkpoint.commit_timeout_s)
    if lead:
        _write_summary(cfg, config, stage, opt, resume, {
            "steps_done": len(history), "exhausted": exhausted, "start_step": start_step,
            "checkpoints": ckpt_stats | {"root": ckpts.root}, "final_version": version,
            **dropped, "start_sha": start_sha,
            "seconds": time.perf_counter() - t_start, "history": history, "workers": world,
            "retries": publisher.retries(), "quarantined": quarantine.counts() if quarantine is not None else {},
        }, ledger.entries)


def _log_step(writer: Any, progress: Any, cfg: Config, stage: str, step: int, m: dict[str, float], rb: Any,
              record: Mapping[str, Any], due: bool) -> None:
    """Rank 0's TensorBoard scalars (and a mask image every ``learner.image_every`` steps) and its
    progress line."""
    from pipeline.update import KEPT, REWARD, SAFE_FRAC

    lc, last = cfg.learner, getattr(cfg.stage, stage).steps - 1
    if writer is not None and lc.image_every and step % lc.image_every == 0 and "thumb" in record:
        t = rb.sample_steps()[0]  # the first sample's own T' (a padded batch's longest may be more)
        own = t * rb.grid[0] * rb.grid[1]
        writer.image(f"masks/{stage}", mask_image(record, rb.unpacked_masks()[0, 0, :own], rb.old_logits[0, :own],
                                                  (t, *rb.grid)), step)
    if progress is not None and (line := progress.update(step, m, (KEPT, SAFE_FRAC, REWARD))):
        import sys  # straight to stdout: Ray Train's patched print would also log it (twice in the job log)

        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    if writer is not None and (due or step % lc.log_every == 0 or step == last):
        writer.log(step, m)
        if due:  # TensorBoard is durable up to every checkpoint (a resume purges what follows)
            writer.flush()


def _write_summary(cfg: Config, config: Mapping[str, Any], stage: str, opt: DeepSpeedOptimizer | None,
                   resume: Mapping[str, Any] | None, run: dict[str, Any], ledger: list[dict[str, Any]]) -> None:
    """Rank 0, at the end: the stage's final policy (``<stage dir>/policy``), ``ledger.json`` and
    ``learner_summary.json``. A stage resumed from its last step's checkpoint has nothing left to do
    but save that checkpoint's policy."""
    from pipeline.checkpoint import load_policy
    from pipeline.metrics import mean_metrics
    from pipeline.trainer import weights_sha

    history, seconds, window = run.pop("history"), run.pop("seconds"), cfg.learner.summary_window
    summary: dict[str, Any] = {"stage": stage, "resumed_from": resume["path"] if resume else None,
                               **{k: run[k] for k in ("steps_done", "exhausted", "start_step", "checkpoints")}}
    module = opt.engine.module if opt is not None else (load_policy(resume["path"], cfg.data.s3) if resume else None)
    if module is not None:
        scfg = getattr(cfg.stage, stage)
        rollouts = int(sum(h.get(RECORDS, 0.0) for h in history)) * run["workers"] * scfg.group_size
        summary.update(run, **{
            "seconds": round(seconds, 3), "rollouts": rollouts, "rollouts_per_s": rollouts / seconds if seconds > 0 else 0.0,
            "first": mean_metrics(history[:window]), "last": mean_metrics(history[-window:]),
            "final_sha": weights_sha(module), "zero_stage": cfg.learner.zero_stage,
            "steps_total": run["start_step"] + len(history),
            "policy": _save_policy(module, config["stage_dir"].rstrip("/") + "/policy", cfg),
        })
        storage.write_bytes(storage.join(config["stage_dir"], "ledger.json"), json.dumps(ledger).encode(), cfg.data.s3)
    storage.write_bytes(storage.join(config["stage_dir"], "learner_summary.json"),
                        (json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n").encode(), cfg.data.s3)

def make_trainer(cfg: Config, stage: str, rollouts_ds: Any, *, store: str, stage_dir: str, tensorboard: str | None,
                 init_policy: str | None = None, quarantine: Any = None, resume: Mapping[str, Any] | None = None) -> Any:
    """The stage's ``TorchTrainer`` (``fit()`` not called). Ray Train's own results go to
    ``<stage dir>/ray_train`` on the same storage (an ``s3://`` stage dir passes the project's S3
    filesystem, custom endpoint included, as ``storage_filesystem``).

    Quiet by construction: Ray Train logs at WARNING (its worker-group notices stay in its files
    under the Ray session's ``logs/train/``; its per-report ``Reporting training result N:
    TrainingReport(...)`` is dropped: :func:`actors.logs.quiet_train_worker`), workers print
    unpatched (``RAY_TRAIN_ENABLE_PRINT_PATCH=0``, which Ray Train passes from this process to its
    workers), DeepSpeed is told its accelerator (``DS_ACCELERATOR``, so it does not guess and warn
    "Setting accelerator to CPU"), and the ingest options are given without the deprecated
    ``exclude_resources`` that Ray Train's default sets (a ``RayDeprecationWarning`` per stage)."""
    import functools

    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.logs import quiet_train_worker

    lc = cfg.learner
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(lc.health_check_interval_s))
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
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
    ex = DataContext.get_current().execution_options  # what DataConfig.default_ingest_options carries over
    ingest = ExecutionOptions(resource_limits=ex.resource_limits, preserve_order=ex.preserve_order,
                              verbose_progress=ex.verbose_progress)
    accelerator = os.environ.get("DS_ACCELERATOR") or ("cuda" if lc.use_gpu else "cpu")
    return TorchTrainer(
        functools.partial(quiet_train_worker, train_loop_per_worker),
        train_loop_config={"cfg": cfg.model_dump(), "stage": stage, "store": store, "stage_dir": stage_dir,
                           "tensorboard": tensorboard, "init_policy": init_policy, "quarantine": quarantine,
                           "resume": dict(resume) if resume else None},
        scaling_config=ScalingConfig(num_workers=lc.num_workers, use_gpu=lc.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=backend),
        datasets={"rollouts": rollouts_ds},
        dataset_config=DataConfig(execution_options=ingest),
        run_config=RunConfig(name=f"{cfg.run.name}-{stage}", storage_path=ray_storage, storage_filesystem=fs,
                             logging_config=LoggingConfig(log_level="WARNING"),
                             worker_runtime_env={"env_vars": {"DS_ACCELERATOR": accelerator}}),
    )

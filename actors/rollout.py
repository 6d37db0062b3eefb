"""Rollout actors: frozen-MLLM replicas in a Ray Data actor pool.

:class:`RolloutWorker` is a callable class for ``Dataset.map_batches``; :func:`rollout_dataset`
wires it onto a sample stream with an autoscaling ``ActorPoolStrategy(min_actors, max_actors)``
and the per-replica resources of ``cfg.rollout`` (``num_gpus=1`` on clusters, fractional CPUs
here). Each actor loads the frozen MLLM once (``load_mllm(cfg.mllm)``), and for every batch:

0. waits at the store's staleness gate (:meth:`~actors.policy_store.PolicyStore.try_admit`):
   the batch starts only when it will reach the learner at most ``rollout.max_staleness`` policy
   versions after the one it is rolled out with (see :meth:`RolloutWorker.wait_admission`);
1. pulls the newest policy version from the stage's :class:`~actors.policy_store.PolicyStore`
   (only when it changed; between batches, never inside one);
2. registers the batch with the store (a batch that a restarted actor processes again - Ray Data
   restarts a dead pool actor, ``max_restarts=-1``, and retries its batch - gets ``attempt > 1``
   and is counted as a retry);
3. runs :func:`pipeline.trainer.rollout` on the batch (samples of different frame counts are
   padded there and scored each at its own length) and yields the rollout records columnar (``RolloutBatch.to_records`` layout, ``X`` in ``rollout.state_dtype``:
   the MLLM's own by default, so a bf16 model ships half of float32's bytes) plus ``rollout_s``
   (seconds the batch's rollout took), ``attempt``, ``actor`` (which replica made it), ``epoch``
   (the data epoch the sample came from: the learner's consumed-sample ledger is kept per epoch),
   ``cache_hit_rate`` (of the actor's LRU of ``X`` and ``CE_full``, ``rollout.cache_mb``: a sample
   seen again skips the vision tower and the all-tokens scoring row), and, when
   ``learner.image_every > 0``, ``thumb`` (uint8 ``[T, s, s, 3]`` frames of ``learner.image_size``
   pixels for the learner's TensorBoard mask overlays).

The gate only works because every Ray Data task of the pool holds exactly one batch:
:func:`rollout_dataset` re-blocks the sample stream to ``batch_size`` rows per block first. A map
task's outputs leave the actor only when the task has consumed its whole input bundle, and the
pool's bundler merges small blocks but never splits big ones, so without it one task would get a
whole shard's block (several batches) and a batch waiting at the gate inside that task would hold
back the finished batches before it - the learner would never see them (deadlock).

Masks are drawn from a CPU generator seeded by ``(stage seed, sample ids, policy version)``, so a
retried batch with the same version draws the same masks.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from typing import Any, Iterator, Mapping

import numpy as np

from pipeline.config import Config


def records_to_columns(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Row dicts -> ``{column: array}``: stacked when every value is an array of one shape, else an
    object array (strings, scalars, and the arrays of records of different ``T'``, which Ray Data
    keeps as a variable-shaped tensor column)."""
    out: dict[str, np.ndarray] = {}
    for c in records[0]:
        vals = [r[c] for r in records]
        if isinstance(vals[0], np.ndarray) and len({v.shape for v in vals}) == 1:
            out[c] = np.stack(vals)
        elif isinstance(vals[0], (int, np.integer)) and not isinstance(vals[0], bool):
            out[c] = np.asarray(vals, dtype=np.int64)
        elif isinstance(vals[0], (float, np.floating)):
            out[c] = np.asarray(vals, dtype=np.float64)
        else:
            arr = np.empty(len(vals), dtype=object)
            arr[:] = vals
            out[c] = arr
    return out


def columns_to_records(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    cols = list(batch)
    n = len(batch[cols[0]]) if cols else 0
    return [{c: batch[c][i] for c in cols} for i in range(n)]


def batch_key(sample_ids: list[str], epochs: list[int]) -> str:
    """One rollout batch's identity: its samples AND their data epochs. Real videos keep their ids
    in every epoch, so without the epoch a later epoch's batch would look like a retry of the
    first one (and pass the staleness gate uncounted)."""
    tagged = [f"{e}/{i}" for e, i in zip(epochs, sample_ids)]
    return f"{zlib.crc32(','.join(tagged).encode()):08x}:{len(tagged)}:{tagged[0]}"


def gate_slack_batches(world: int, max_staleness: int, prefetch_batches: int) -> int:
    """Batches the staleness gate admits beyond ``(updates + max_staleness + 1) * world``: what
    the path from the pool to the learner holds back, minus what ``max_staleness`` already covers.

    The learner's update ``u`` needs ``(u + 1) * world`` batches, but a finished batch reaches a
    rank only after more have been rolled out:

    * each rank's ``iter_batches(prefetch_batches=P)`` pulls the next ``P`` batches before it
      hands out the current one (Ray Data's ``prefetch_batches_locally``): ``P * world``;
    * Ray Train splits the stream with ``streaming_split(world, equal=True, locality_hints=...)``,
      whose OutputSplitter keeps ``F * world - 1`` bundles buffered while it finds none stored on
      a rank's node - the case for small rollout blocks, which are inlined instead of put in the
      object store (``F`` = ``$RAY_DATA_DEFAULT_OUTPUT_SPLITTER_MAX_BUFFERING_FACTOR``, default 2;
      0 there, or ``DataConfig(enable_shard_locality=False)``, leaves the equal split's
      ``world - 1``).

    So ``(u + 1 + P) * world + F * world - 1`` batches must be admitted for update ``u``; without
    the slack a small ``max_staleness`` would stall the learner. The held-back batches are why a
    bound below about ``P + F`` versions cannot be met (the learner drops what is older)."""
    factor = float(os.environ.get("RAY_DATA_DEFAULT_OUTPUT_SPLITTER_MAX_BUFFERING_FACTOR", "2"))
    held = max(int(world) - 1, math.ceil(factor * int(world)) - 1)
    need = int(prefetch_batches) * int(world) + held
    return max(0, need - int(max_staleness) * int(world))


class RolloutWorker:
    """``map_batches`` callable: sample batch (numpy columns) -> rollout record batches."""

    def __init__(self, cfg: dict | Config, stage: str, store: str, seed: int, init_policy_dir: str | None = None):
        import torch

        from pipeline.mllm.loader import load_mllm

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.cfg = cfg if isinstance(cfg, Config) else Config.model_validate(cfg)
        self.stage = stage
        self.stage_cfg = getattr(self.cfg.stage, stage)
        self.seed = int(seed)
        self.store_name = store
        self.store = None
        self.adapter = load_mllm(self.cfg.mllm, s3=self.cfg.data.s3)
        self.init_policy_dir = init_policy_dir
        self.policy = None
        self.version = -1
        self.actor = f"{os.getpid()}"
        self.thumb_size = self.cfg.learner.image_size if self.cfg.learner.image_every > 0 else 0
        self.batches = 0
        # what does not depend on the policy (X, CE_full), across this actor's batches and epochs
        from pipeline.cache import ByteLRU
        from pipeline.trainer import STATE_DTYPES

        self.cache = ByteLRU.from_mb(self.cfg.rollout.cache_mb)
        name = self.cfg.rollout.state_dtype
        self.state_dtype = self.adapter.dtype if name == "auto" else STATE_DTYPES[name]
        # staleness gate: rows one learner update consumes (every rank takes batch_size rows per
        # step), and the batches the learner's input split holds back (see gate_slack_batches)
        world = int(self.cfg.learner.num_workers)
        self.rows_per_version = int(self.stage_cfg.batch_size) * world
        self.slack_rows = int(self.stage_cfg.batch_size) * gate_slack_batches(
            world, int(self.cfg.rollout.max_staleness), int(self.cfg.learner.prefetch_batches))

    # ------------------------------------------------------------------ policy sync
    def _store(self):
        if self.store is None:
            from actors.policy_store import get_store

            self.store = get_store(self.store_name, self.cfg.run.call_timeout_s)
        return self.store

    def sync_policy(self) -> int:
        """Pull the newest weights when the store has a newer version; returns the version used."""
        import ray
        import torch

        from actors.policy_store import to_torch_state
        from pipeline.policy import ScorePolicy
        from pipeline.trainer import init_policy

        version, state = ray.get(self._store().latest_if_newer.remote(self.version), timeout=self.cfg.run.call_timeout_s)
        if self.policy is None:
            if self.init_policy_dir:
                self.policy = ScorePolicy.from_pretrained(self.init_policy_dir, map_location=self.adapter.device,
                                                           s3=self.cfg.data.s3)
            else:  # the learner starts from the same seeded weights (version 0)
                self.policy = init_policy(self.adapter.hidden_size, self.cfg.policy, self.cfg.run.seed).to(self.adapter.device)
            self.policy.eval()
            self.version = 0
        if state is not None:
            with torch.no_grad():
                self.policy.load_state_dict({k: v.to(self.adapter.device) for k, v in to_torch_state(state).items()})
            self.version = int(version)
        return self.version

    def wait_admission(self, key: str, rows: int) -> float:
        """Block until the store's staleness gate admits batch ``key`` (polling with a short
        back-off); returns the seconds waited. Fails open - the batch starts anyway (counted by the
        store as ``gate_forced``) with a warning - when the learner published no new version for
        ``2 * run.call_timeout_s`` while the batch waited (a learner stalled that long, or an
        ordering the gate did not foresee: never a deadlock, at worst a stale batch the learner
        drops and counts), or when the store is gone (the stage is over)."""
        import ray

        store = self._store()
        args = (key, int(rows), int(self.cfg.rollout.max_staleness), self.rows_per_version, self.slack_rows)
        t0 = last = time.monotonic()
        limit = 2.0 * float(self.cfg.run.call_timeout_s)
        seen, pause, force = None, 0.01, False
        try:
            while True:
                ok, version = ray.get(store.try_admit.remote(*args, force), timeout=self.cfg.run.call_timeout_s)
                now = time.monotonic()
                if ok:
                    if force:
                        print(f"[rollout {self.actor}] staleness gate: no new policy version for {now - last:.0f} s; "
                              f"batch {key} starts anyway", flush=True)
                    return now - t0
                if version != seen:  # the learner is making progress: keep waiting
                    seen, last = version, now
                force = now - last > limit
                time.sleep(pause)
                pause = min(0.1, pause * 1.5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            print(f"[rollout {self.actor}] staleness gate unavailable ({type(e).__name__}); batch {key} starts",
                  flush=True)
            return time.monotonic() - t0

    # ------------------------------------------------------------------ one batch
    def __call__(self, batch: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        import ray

        from pipeline.data.video import resize_rgb
        from pipeline.trainer import rollout, step_generator

        samples = columns_to_records(batch)
        if not samples:
            return
        ids = [str(s["sample_id"]) for s in samples]
        key = batch_key(ids, [int(s.get("epoch", 0)) for s in samples])
        self.wait_admission(key, len(ids))
        version = self.sync_policy()  # after the gate: the newest weights when the batch starts
        attempt = int(ray.get(self._store().begin_batch.remote(key, self.actor), timeout=self.cfg.run.call_timeout_s))
        # one rollout for the whole batch, whatever its frame counts (the rollout pads them)
        gen = step_generator(self.seed, (zlib.crc32(",".join(ids).encode()) << 20) + version)
        t0 = time.perf_counter()
        rb = rollout(self.adapter, self.policy, samples, self.stage_cfg, gen, version, seed=self.seed,
                     cache=self.cache, state_dtype=self.state_dtype)
        dt = time.perf_counter() - t0
        recs = rb.to_records()
        hit = self.cache.hit_rate()
        for s, r in zip(samples, recs):  # same order as the batch
            r.update(rollout_s=dt, attempt=attempt, actor=self.actor, epoch=int(s.get("epoch", 0)),
                     cache_hit_rate=hit)
            if self.thumb_size:  # small frames for the learner's mask-overlay images
                r["thumb"] = np.stack([resize_rgb(f, self.thumb_size) for f in np.asarray(s["frames"])])
        self.batches += 1
        yield records_to_columns(recs)
        self._store().end_batch.remote(key)  # fire and forget: bookkeeping only


def rollout_dataset(samples_ds: Any, cfg: Config, stage: str, store: str, seed: int,
                    init_policy_dir: str | None = None) -> Any:
    """``samples_ds.map_batches(RolloutWorker, compute=ActorPoolStrategy(min, max), ...)``: a lazy,
    streaming dataset of rollout records."""
    import ray.data

    r = cfg.rollout
    bs = getattr(cfg.stage, stage).batch_size
    extra: dict[str, Any] = {"num_gpus": r.num_gpus} if r.num_gpus > 0 else {}
    # one batch per block, so one batch per pool task: a task's outputs reach the learner only
    # when the task ends, and a batch waiting at the staleness gate must not hold back the
    # finished ones (streaming re-blocking; row order unchanged)
    samples_ds = samples_ds.repartition(target_num_rows_per_block=bs, strict=True)
    return samples_ds.map_batches(
        RolloutWorker,
        fn_constructor_kwargs=dict(cfg=cfg.model_dump(), stage=stage, store=store, seed=int(seed),
                                   init_policy_dir=init_policy_dir),
        # (Ray Data's pool actors default to max_restarts=-1, max_task_retries=-1: a replica that
        # dies is restarted and the batch it was working on runs again - tested by killing one)
        compute=ray.data.ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors),
        batch_size=bs,
        batch_format="numpy",
        num_cpus=r.num_cpus,
        zero_copy_batch=True,
        **extra,
    )

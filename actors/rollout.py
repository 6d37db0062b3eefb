"""Rollout actors: frozen-MLLM replicas in a Ray Data actor pool.

:class:`RolloutWorker` is a callable class for ``Dataset.map_batches``; :func:`rollout_dataset`
wires it onto a sample stream with an autoscaling ``ActorPoolStrategy(min_actors, max_actors)``
and the per-replica resources of ``cfg.rollout`` (``num_gpus=1`` on clusters, fractional CPUs
here). Each actor loads the frozen MLLM once (``load_mllm(cfg.mllm)``), and for every batch:

1. pulls the newest policy version from the stage's :class:`~actors.policy_store.PolicyStore`
   (only when it changed; between batches, never inside one);
2. registers the batch with the store (a batch that a restarted actor processes again - Ray Data
   restarts a dead pool actor, ``max_restarts=-1``, and retries its batch - gets ``attempt > 1``
   and is counted as a retry);
3. runs :func:`pipeline.trainer.rollout` on each group of equal-length samples and yields the
   rollout records columnar (``RolloutBatch.to_records`` layout) plus ``rollout_s`` (seconds the
   group's rollout took), ``attempt``, ``actor`` (which replica made it) and ``epoch`` (the data
   epoch the sample came from: the learner's consumed-sample ledger is kept per epoch), and, when
   ``learner.image_every > 0``, ``thumb`` (uint8 ``[T, s, s, 3]`` frames of ``learner.image_size``
   pixels for the learner's TensorBoard mask overlays).

Masks are drawn from a CPU generator seeded by ``(stage seed, sample ids, policy version)``, so a
retried batch with the same version draws the same masks.
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Any, Iterator, Mapping

import numpy as np

from pipeline.config import Config

# extra columns next to the RolloutBatch.to_records layout
EXTRA_COLUMNS = ("rollout_s", "attempt", "actor", "epoch")


def records_to_columns(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Row dicts -> ``{column: array}``: stacked when every value is an array of one shape, else an
    object array (strings, scalars)."""
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


def batch_key(sample_ids: list[str]) -> str:
    return f"{zlib.crc32(','.join(sample_ids).encode()):08x}:{len(sample_ids)}:{sample_ids[0]}"


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
                self.policy = ScorePolicy.from_pretrained(self.init_policy_dir, map_location=self.adapter.device)
            else:  # the learner starts from the same seeded weights (version 0)
                self.policy = init_policy(self.adapter.hidden_size, self.cfg.policy, self.cfg.run.seed).to(self.adapter.device)
            self.policy.eval()
            self.version = 0
        if state is not None:
            with torch.no_grad():
                self.policy.load_state_dict({k: v.to(self.adapter.device) for k, v in to_torch_state(state).items()})
            self.version = int(version)
        return self.version

    # ------------------------------------------------------------------ one batch
    def __call__(self, batch: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        import ray

        from pipeline.data.video import resize_rgb
        from pipeline.trainer import rollout, step_generator

        samples = columns_to_records(batch)
        if not samples:
            return
        ids = [str(s["sample_id"]) for s in samples]
        version = self.sync_policy()
        key = batch_key(ids)
        attempt = int(ray.get(self._store().begin_batch.remote(key, self.actor), timeout=self.cfg.run.call_timeout_s))
        groups: dict[tuple, list] = {}
        for s in samples:
            groups.setdefault(tuple(np.shape(s["frames"])), []).append(s)
        for group in groups.values():
            gids = [str(s["sample_id"]) for s in group]
            gen = step_generator(self.seed, (zlib.crc32(",".join(gids).encode()) << 20) + version)
            t0 = time.perf_counter()
            rb = rollout(self.adapter, self.policy, group, self.stage_cfg, gen, version, seed=self.seed)
            dt = time.perf_counter() - t0
            recs = rb.to_records()
            for s, r in zip(group, recs):  # same order as the group
                r.update(rollout_s=dt, attempt=attempt, actor=self.actor, epoch=int(s.get("epoch", 0)))
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
    extra: dict[str, Any] = {"num_gpus": r.num_gpus} if r.num_gpus > 0 else {}
    return samples_ds.map_batches(
        RolloutWorker,
        fn_constructor_kwargs=dict(cfg=cfg.model_dump(), stage=stage, store=store, seed=int(seed),
                                   init_policy_dir=init_policy_dir),
        # (Ray Data's pool actors default to max_restarts=-1, max_task_retries=-1: a replica that
        # dies is restarted and the batch it was working on runs again - tested by killing one)
        compute=ray.data.ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors),
        batch_size=getattr(cfg.stage, stage).batch_size,
        batch_format="numpy",
        num_cpus=r.num_cpus,
        zero_copy_batch=True,
        **extra,
    )

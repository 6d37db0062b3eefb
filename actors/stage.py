"""One curriculum stage on Ray: sample stream -> rollout actor pool -> DeepSpeed learner.

:func:`run_stage` is the driver ``jobs/train_stage.py`` runs (also as the Ray job that
``jobs/train_curriculum.py`` submits per stage):

1. finds the checkpoint to resume from (before any Ray work, so a bad ``--resume`` fails fast),
   connects to Ray (``ensure_ray``: ``$RAY_ADDRESS`` inside a job, else ``run.ray_address``, else a
   local cluster) and checks the cluster has the CPUs/GPUs the learner and the minimum rollout
   pool need;
2. creates the stage's PolicyStore actor (version 0 = ``init_policy`` when given);
3. builds the streaming dataset ``<stage samples>.map_batches(RolloutWorker,
   compute=ActorPoolStrategy(min_actors, max_actors))`` (enough epochs of the shards for
   ``steps * batch_size * learner.num_workers`` samples) and hands it to the TorchTrainer as
   ``datasets={"rollouts": ds}``;
4. runs ``fit()`` under ``learner.fit_timeout_s`` and returns the learner's summary.

Layout: ``<storage>/<run>/<stage>/{policy/, learner_summary.json, ledger.json, checkpoints/, ray_train/}``
and ``<storage>/<run>/tensorboard/<stage>/`` (TensorBoard needs a local path; with ``s3://``
storage the event files go under ``runs/<run>/tensorboard``).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.config import Config
from pipeline.trainer import STAGES
# environment every stage process wants (the curriculum passes it in the job's runtime_env)
DEFAULT_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               # Ray Train's input split holds no extra rollout batches back waiting for locality
               # (it would add a version of staleness; see actors.rollout.gate_slack_batches)
               "RAY_DATA_DEFAULT_OUTPUT_SPLITTER_MAX_BUFFERING_FACTOR": "0",
               # Ray Train's workers print through its logger AND their stdout (every line twice in
               # the job's log); unpatched, a worker's print is one line of its stdout
               "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
               # no tqdm bars from every actor loading the MLLM ("Loading weights") in the job's log
               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def stage_paths(cfg: Config, stage: str) -> dict[str, str]:
    from pipeline import storage

    base = storage.join(cfg.run.storage, cfg.run.name)
    if not storage.is_s3(base):
        base = str(Path(base).resolve())
    tb_base = base if not storage.is_s3(base) else str(Path("runs", cfg.run.name).resolve())
    return {"run": base, "stage": storage.join(base, stage), "tensorboard": str(Path(tb_base, "tensorboard", stage))}


def check_resources(cfg: Config, resources: dict[str, float]) -> None:
    """Raise ``RuntimeError`` naming what is missing when the cluster cannot hold the learner plus
    the minimum rollout pool (plus one reader task's CPU)."""
    lc, rc = cfg.learner, cfg.rollout
    need = {"CPU": lc.num_workers * lc.cpus_per_worker + rc.min_actors * rc.num_cpus,
            "GPU": (lc.num_workers if lc.use_gpu else 0) + rc.min_actors * rc.num_gpus}
    missing = {k: v - resources.get(k, 0.0) for k, v in need.items() if v > resources.get(k, 0.0) + 1e-9}
    if missing:
        have = {k: resources.get(k, 0.0) for k in need}
        raise RuntimeError(
            f"cluster too small for this stage: need {need} (learner {lc.num_workers} x {lc.cpus_per_worker} CPU"
            f"{' + 1 GPU' if lc.use_gpu else ''}, rollout pool min {rc.min_actors} x {rc.num_cpus} CPU"
            f" + {rc.num_gpus} GPU), have {have}; missing {missing}")


def _epoch_size(cfg: Config, stage: str) -> int:
    """Samples one pass over the shards yields (upper bound, read from metadata only)."""
    from pipeline.data import readers

    from pipeline.data.sources import epoch_size

    d = cfg.data
    n = epoch_size(d, stage)  # llava (its index), webdataset (tar headers), hf_parquet (metadata)
    if n is not None:
        return n
    if stage == "pseudo_video":
        import pyarrow.parquet as pq

        from pipeline import storage

        n = 0
        for p in readers.list_image_shards(d.image_shards, d.s3):
            fs, path = storage.filesystem(p, d.s3)
            with fs.open_input_file(path) as f:
                n += pq.ParquetFile(f).metadata.num_rows // d.pseudo_images
        return n
    n = 0
    for p in readers.list_video_annotations(d.video_shards, d.s3):
        n += sum(1 for e in readers.read_video_index(p, d.s3) if isinstance(e, dict))
    return n


def samples_dataset(cfg: Config, stage: str, quarantine: Any, skip: dict[int, list[str]] | None = None
                    ) -> tuple[Any, int]:
    """The stage's sample stream, repeated for enough epochs to feed ``steps * batch_size * workers``
    samples (epoch ``e`` of stage 1 regroups images with seed ``run.seed + e``, like the
    single-process trainer), each row tagged with its ``epoch``; ``skip[e]`` are the sample ids
    of epoch ``e`` a resumed stage already consumed. Returns ``(dataset, epochs)``."""
    from actors import data_stream as stream

    scfg = getattr(cfg.stage, stage)
    skip = skip or {}
    per_epoch = max(1, _epoch_size(cfg, stage))
    epochs = max(1, math.ceil(scfg.steps * scfg.batch_size * cfg.learner.num_workers / per_epoch))  # every rank takes a batch per step
    if stage == "pseudo_video":
        ds = stream.pseudo_video_dataset(cfg, int(cfg.run.seed), skip_ids=skip, quarantine=quarantine, epochs=epochs)
    else:
        ds = stream.video_dataset(cfg, skip_ids=skip, quarantine=quarantine, epochs=epochs)
    return ds, epochs


def find_checkpoint(cfg: Config, stage: str, resume: str | None = None,
                    log: Callable[[str], Any] | None = print) -> Any:
    """The checkpoint a stage resumes from: ``resume`` (a checkpoint directory, verified; an error
    names it when it is incomplete or corrupted) or else the newest complete one under
    ``<stage dir>/checkpoints`` (damaged ones are reported and skipped), or None."""
    from pipeline import checkpoint as ck

    if resume:
        ref = ck.verify(resume.rstrip("/"), cfg.data.s3)
        if ref.state.get("stage") != stage:
            raise ck.CheckpointError(f"checkpoint {resume} belongs to stage {ref.state.get('stage')!r}, not {stage!r}")
        return ref
    from pipeline import storage

    return ck.resolve(storage.join(stage_paths(cfg, stage)["stage"], "checkpoints"), cfg.data.s3, warn=log)


def _local_dashboard(cfg: Config) -> dict[str, Any]:
    """For a local cluster this process is about to start: its dashboard port, named to every
    process of the cluster as ``RAY_API_SERVER_ADDRESS``. Ray Train's placement-group cleaner (an
    actor) asks the state API whether the run's controller lives; without an address it looks
    for "the" local cluster and, with another one on the machine, fails with a traceback in the
    log ("Found multiple active Ray instances") or asks the wrong one. (A stage job gets the
    address in its runtime_env from the curriculum.) Empty when connecting to a cluster."""
    import ray

    if ray.is_initialized() or cfg.run.ray_address or os.environ.get("RAY_ADDRESS"):
        return {}
    from actors.ray_utils import free_port

    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # before ray.init: its processes inherit it
    return {"dashboard_port": port}


def run_stage(cfg: Config, stage: str, *, init_policy: str | None = None, resume: str | None = None,
              log: Callable[[str], Any] | None = print) -> dict[str, Any]:
    """Run one stage on the connected (or a fresh local) Ray cluster; returns the stage summary.
    Resumes from ``resume`` or, when not given, from the stage's newest complete checkpoint."""
    import ray

    from actors.learner import make_trainer
    from actors.policy_store import create_store, store_name
    from actors.rollout import rollout_dataset
    from pipeline import storage
    from actors.quarantine import QuarantineLog
    from actors.ray_utils import RayTimeoutError, ensure_ray
    from pipeline.trainer import stage_seed, summary_line

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    from pipeline.mllm.loader import check_model_dir, resolve_frame_multiple

    check_model_dir(cfg)  # before any Ray work, as a bad --resume below
    from pipeline.data.sources import check_sources

    check_sources(cfg.data)  # a data mixture naming a missing file: a ConfigError, before any Ray work
    cfg = resolve_frame_multiple(cfg)  # data.frame_multiple 0: the model's temporal patch, for the data tasks
    ref = find_checkpoint(cfg, stage, resume, log)  # before any Ray work: a bad --resume fails fast
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(cfg.learner.health_check_interval_s))
    # a local cluster gets the dashboard: Ray Train's placement-group cleaner polls the state API
    resources = ensure_ray(cfg.run.ray_address, include_dashboard=True, timeout_s=cfg.run.call_timeout_s,
                           **_local_dashboard(cfg))
    check_resources(cfg, resources)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False

    paths = stage_paths(cfg, stage)
    if init_policy and not storage.is_s3(init_policy):  # Ray workers run in other directories
        init_policy = str(Path(init_policy).resolve())
    seed = stage_seed(int(cfg.run.seed), stage)
    name = store_name(cfg.run.name, stage)
    store = create_store(name)
    if init_policy:
        from pipeline.policy import ScorePolicy

        ray.get(store.publish.remote(0, ScorePolicy.from_pretrained(init_policy, s3=cfg.data.s3).state_dict()),
                timeout=cfg.run.call_timeout_s)
    skip: dict[int, list[str]] = {}
    if ref is not None:
        from pipeline.checkpoint import consumed_by_epoch, load_policy

        ledger = json.loads(storage.read_bytes(storage.join(ref.path, "ledger.json"), cfg.data.s3))
        skip = consumed_by_epoch(ledger)
        version = int(ref.state["version"])
        ray.get(store.publish.remote(version, load_policy(ref.path, cfg.data.s3).state_dict()), timeout=cfg.run.call_timeout_s)
        if log:
            log(f"[{stage}] resuming from {ref.path}: step {ref.step + 1}, policy v{version}, "
                f"{sum(map(len, skip.values()))} samples already consumed")
    quarantine = QuarantineLog()
    samples, epochs = samples_dataset(cfg, stage, quarantine, skip)
    rollouts = rollout_dataset(samples, cfg, stage, name, seed, init_policy_dir=init_policy)
    trainer = make_trainer(cfg, stage, rollouts, store=name, stage_dir=paths["stage"],
                           tensorboard=paths["tensorboard"], init_policy=init_policy, quarantine=quarantine,
                           resume={"path": ref.path, "step": ref.step, "state": ref.state} if ref else None)
    scfg = getattr(cfg.stage, stage)
    if log:
        log(f"[{stage}] run {cfg.run.name}: {scfg.steps} steps x {scfg.batch_size} samples x G={scfg.group_size}; "
            f"rollout pool {cfg.rollout.min_actors}..{cfg.rollout.max_actors} x {cfg.rollout.num_cpus} CPU; "
            f"learner {cfg.learner.num_workers} worker(s) ZeRO-{cfg.learner.zero_stage}; {epochs} data epoch(s)")

    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t0 = time.perf_counter()
    th = threading.Thread(target=fit, name=f"fit-{stage}", daemon=True)
    th.start()
    th.join(cfg.learner.fit_timeout_s)
    if th.is_alive():
        raise RayTimeoutError(f"[{stage}] TorchTrainer.fit did not finish within {cfg.learner.fit_timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    seconds = time.perf_counter() - t0
    try:
        summary = json.loads(storage.read_bytes(storage.join(paths["stage"], "learner_summary.json"), cfg.data.s3))
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"[{stage}] the learner wrote no summary ({e})") from None
    store_stats = ray.get(store.stats.remote(), timeout=cfg.run.call_timeout_s)
    ray.kill(store)
    summary.update(stage_seconds=round(seconds, 3), epochs=epochs, store=store_stats, init_from=init_policy,
                   tensorboard=paths["tensorboard"], stage_dir=paths["stage"])
    if log:
        log(summary_line(summary))
    return summary

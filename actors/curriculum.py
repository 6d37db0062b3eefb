"""The two-stage curriculum, each stage its own Ray job (driven by ``jobs/train_curriculum.py``).

1. Connects to Ray (:func:`connect`): inside a Ray job (``$RAY_ADDRESS``) or with
   ``run.ray_address`` it uses that cluster's job server; otherwise it starts a local head WITH the
   dashboard/job server (:class:`LocalHead`, needs ``ray[default]``) that the caller stops at the end.
2. For each stage (``pseudo_video`` then ``real_video``) submits ``jobs/train_stage.py`` with
   ``JobSubmissionClient.submit_job(submission_id=f"{run}-{stage}")``; a re-run skips a stage whose
   job already SUCCEEDED on this cluster, or (a new cluster, where the job history is gone) whose
   finished outputs (``learner_summary.json`` with all steps + ``policy/``) are in storage; a
   failed/stopped job is resubmitted as ``{run}-{stage}-r<N>``.
   Environment variables go in the job's ``runtime_env`` (never set inside the job's script). The
   stage's log is streamed (polling ``get_job_logs``) whole to ``<run>/logs/<stage>.log`` and, its
   own lines only (progress, summary: :func:`actors.logs.for_console`), to the caller's log; the
   stage must end SUCCEEDED within ``run.job_timeout_s``. Stage 2 starts from stage 1's final policy
   (``--init-policy <storage>/<run>/pseudo_video/policy``), or, with ``grounding.epochs``, from its
   grounding warm start: ``jobs/ground_policy.py`` (``{run}-grounding``) writes
   ``<storage>/<run>/grounding/policy`` between the stages (pipeline/grounding.py).
3. With ``validation.video_shards`` set, submits ``jobs/select_policy.py`` (``{run}-select``), which
   scores the last stage's kept checkpoints on the validation videos and names the best (with
   ``validation.average_last``: writes and scores the weight average of the last ones).
4. Copies that policy (without validation: the last stage's policy) to
   ``<storage>/<run>/final/policy/`` and evaluates it (``{run}-eval``, unless ``evaluate=False``).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from actors.logs import for_console, plain, run_log_dir, shown_path, strip_ansi
from actors.ray_utils import free_port
from actors.stage import DEFAULT_ENV
from pipeline.config import Config
from pipeline.trainer import STAGES

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_env(cfg: Config, api_server: str | None = None) -> dict[str, str]:
    """Environment of a stage job (its runtime_env): single-threaded BLAS on shared CPUs, a fast
    Ray Train report cadence, a cached DeepSpeed extension dir, the quiet settings of
    :data:`actors.stage.DEFAULT_ENV`, the cluster's job/state API server (``api_server``, as
    ``RAY_API_SERVER_ADDRESS``: Ray Train's placement-group cleaner asks it whether the run's
    controller lives, instead of guessing among the machine's clusters), and whatever auth/S3
    settings the caller has (passed through, never read or stored here)."""
    env = DEFAULT_ENV | {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(cfg.learner.health_check_interval_s),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    if api_server:
        env["RAY_API_SERVER_ADDRESS"] = api_server
    # DeepSpeed's compiled ops: torch's own cache (~/.cache/torch_extensions) unless the caller says otherwise
    for k in ("TORCH_EXTENSIONS_DIR", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REQUEST_CHECKSUM_CALCULATION",
              "AWS_RESPONSE_CHECKSUM_VALIDATION", "AWS_EC2_METADATA_DISABLED"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def _die_with_parent() -> None:
    """(In the child, Linux) SIGTERM when the curriculum driver dies, even by kill -9: the head
    and the stage job it runs stop with it, so a re-run never races an orphaned job."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalHead:
    """A local Ray head WITH the dashboard/job server, owned by this process: ``ray start --head
    --block`` as a child process on free ports (the dashboard agent's default port 52365 may be
    held by another local cluster, which leaves a second head with "No available agent"), its own
    ``--temp-dir`` (so its address file never redirects other processes' ``ray.init()``), token auth
    on (``RAY_AUTH_MODE=token``, the token file Ray itself manages). :meth:`stop` ends exactly it."""

    def __init__(self, num_cpus: int | None = None, timeout_s: float = 120.0):
        import subprocess
        import tempfile

        ray_exe = str(Path(sys.executable).with_name("ray"))
        self.tmp = tempfile.mkdtemp(prefix="score-ray-", dir="/tmp")
        port, dash, agent, grpc, rtenv, metrics, client = (free_port() for _ in range(7))
        cmd = [ray_exe, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
               f"--runtime-env-agent-port={rtenv}", f"--metrics-export-port={metrics}",
               f"--ray-client-server-port={client}", f"--temp-dir={self.tmp}", "--disable-usage-stats"]
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus}")
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # this process's job client sends the token
        self.log = open(Path(self.tmp) / "ray-start.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ),
                                     preexec_fn=_die_with_parent)
        self.address = f"127.0.0.1:{port}"
        self.url = f"http://127.0.0.1:{dash}"

    @property
    def logs(self) -> Path:
        """Ray's own logs of this head's session (every process's output, Ray Train's and Ray Data's files)."""
        return Path(self.tmp) / "session_latest" / "logs"

    def stop(self, timeout_s: float = 60.0, keep_logs: str | Path | None = None) -> None:
        """Stop the head and remove its temp dir; ``keep_logs``: first copy its session logs there."""
        import shutil
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` stops the processes it started
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        if keep_logs is not None and self.logs.is_dir():
            try:
                shutil.copytree(self.logs, keep_logs, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                                ignore=shutil.ignore_patterns("*.sock", "*.pipe"))
                shutil.copy2(Path(self.tmp) / "ray-start.log", Path(keep_logs) / "ray-start.log")
            except (OSError, shutil.Error):
                pass  # logs are a courtesy: never fail a finished run on them
        shutil.rmtree(self.tmp, ignore_errors=True)


def connect(cfg: Config) -> tuple[str, "LocalHead | None"]:
    """``(job server url, local head or None)``: the job server of ``$RAY_ADDRESS`` /
    ``run.ray_address`` (an ``http://`` address is used as is), or a fresh :class:`LocalHead`."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or cfg.run.ray_address
    if address and address.startswith("http"):  # already the job server's address
        return address, None
    if address:
        from actors.ray_utils import _check_reachable

        if address not in ("auto", "local"):
            _check_reachable(address, cfg.run.call_timeout_s)
        import logging

        ctx = ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)  # not "Connecting to ..."
        url = ctx.dashboard_url
        ray.shutdown()
        if not url:
            raise RuntimeError(f"the cluster at {address} has no dashboard/job server (start it with ray[default])")
        return url if url.startswith("http") else f"http://{url}", None
    head = LocalHead(timeout_s=cfg.run.call_timeout_s)
    return head.url, head


def _wait_job_server(client_factory: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client = client_factory()
            client.list_jobs()
            return client
        except Exception as e:  # noqa: BLE001
            if time.monotonic() > deadline:
                raise TimeoutError(f"job server not reachable within {timeout_s:.0f} s: {e}") from None
            time.sleep(0.5)


def stage_entrypoint(cfg_path: str | None, overrides: list[str], stage: str, run: str, storage: str,
                     init_policy: str | None = None, resume: str | None = None, script: str = "train_stage.py") -> str:
    """The shell command of a per-stage job: ``jobs/<script> --stage ... --run ... --storage ...``
    plus the config, the overrides and, for training, ``--init-policy`` / ``--resume``."""
    parts = [sys.executable, str(ROOT / "jobs" / script), "--stage", stage, "--run", run, "--storage", storage]
    if cfg_path:
        parts += ["--config", cfg_path]
    for o in overrides:
        parts += ["--set", o]
    if init_policy:
        parts += ["--init-policy", init_policy]
    if resume:
        parts += ["--resume", resume]
    return " ".join(shlex.quote(p) for p in parts)


def run_job(client: Any, submission_id: str, entrypoint: str, env: dict[str, str], timeout_s: float,
            log: Callable[[str], Any] = print, poll_s: float = 1.0, log_file: str | Path | None = None,
            show: Callable[[str], str | None] | None = None) -> tuple[str, str]:
    """Submit (unless a job with that id exists), stream its log, wait for a terminal status.
    Every line of the log goes to ``log_file`` (when given; without colour codes); ``log`` gets
    ``"  | " + text`` for the lines ``show`` returns a text for (default: every line as it is).
    Returns ``(status, full_log)``."""
    try:
        client.get_job_info(submission_id)
    except Exception:  # noqa: BLE001  (not found: submit it)
        submit_deadline = time.monotonic() + min(timeout_s, 120.0)
        while True:
            try:
                client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env={"env_vars": env})
                break
            except RuntimeError as e:  # a fresh head's job agent registers a few seconds after the server
                if "agent" not in str(e).lower() or time.monotonic() > submit_deadline:
                    raise
                time.sleep(1.0)
    out = None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "w", encoding="utf-8")
    shown = 0
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            status = _status(client, submission_id) or "PENDING"
            logs = client.get_job_logs(submission_id)
            new = logs[shown:]
            if status not in TERMINAL:  # a line still being written waits for its end
                new = new[: new.rfind("\n") + 1]
            if new:
                shown += len(new)
                if out is not None:
                    out.write(strip_ansi(new))
                    out.flush()
                for line in new.splitlines():
                    text = line if show is None else show(line)
                    if text is not None:
                        log(f"  | {text}")
            if status in TERMINAL:
                return status, logs
            if time.monotonic() > deadline:
                client.stop_job(submission_id)
                raise TimeoutError(f"job {submission_id} not finished within {timeout_s:.0f} s (stopped)"
                                   + (f"; its log: {log_file}" if log_file else ""))
            time.sleep(poll_s)
    finally:
        if out is not None:
            out.close()


def job_log_path(logs_dir: Path, run: str, sid: str) -> Path:
    """``<logs dir>/<job id without the run name>.log``: ``pseudo_video.log``, ``pseudo_video-r1.log``, ``eval.log``."""
    name = sid[len(run) + 1:] if sid.startswith(f"{run}-") else sid
    return logs_dir / f"{name}.log"


class JobFailed(RuntimeError):
    """A stage / selection / evaluation job ended other than SUCCEEDED (the message has its last log lines)."""


def failure(what: str, sid: str, status: str, logs: str, log_file: Path | None) -> JobFailed:
    """The error of a job that did not succeed: its last log lines, and where the whole log is."""
    tail = "\n".join(plain(ln) for ln in logs.strip().splitlines()[-20:])
    where = f" (whole log: {shown_path(log_file)})" if log_file else ""
    return JobFailed(f"{what} (job {sid}) ended {status}; last log lines{where}:\n{tail}")


def _last_json(logs: str) -> dict[str, Any]:
    for line in reversed(logs.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def run_once(client: Any, base: str, entrypoint: str, env: dict[str, str], cfg: Config,
             log: Callable[[str], Any], what: str, logs_dir: Path | None = None) -> tuple[str, str]:
    """A one-shot job (the selection, the evaluation) under the first unused id of ``base``,
    ``base-r1``, ...: ``(id, full log)``; raises, naming ``what``, unless it SUCCEEDED. Its log
    goes whole to ``<logs dir>/<what>.log``, its own lines to ``log``."""
    sid, n = base, 0
    while _status(client, sid) in TERMINAL:
        n += 1
        sid = f"{base}-r{n}"
    log_file = job_log_path(logs_dir, cfg.run.name, sid) if logs_dir is not None else None
    log(f"[curriculum] {what}: job {sid} submitted" + (f" (log: {shown_path(log_file)})" if log_file else ""))
    status, logs = run_job(client, sid, entrypoint, env, cfg.run.job_timeout_s, log=log, log_file=log_file,
                           show=for_console if log_file else None)
    if status != "SUCCEEDED":
        raise failure(what, sid, status, logs, log_file)
    return sid, logs


def _status(client: Any, sid: str) -> str | None:
    try:
        st = client.get_job_status(sid)
    except Exception:  # noqa: BLE001
        return None
    return str(getattr(st, "value", st))


def run_curriculum(cfg: Config, cfg_path: str | None, overrides: list[str], client: Any,
                   log: Callable[[str], Any] = print, resume: str | None = None,
                   evaluate: bool = True, api_server: str | None = None) -> dict[str, Any]:
    """Both stages (see module doc). ``resume``: a checkpoint directory; its stage gets
    ``--resume`` (earlier stages must have finished), later stages start as usual. Without it each
    stage job resumes from its own newest complete checkpoint by itself. ``api_server``: the
    cluster's job server URL (see :func:`job_env`)."""
    from pipeline import storage
    from pipeline.checkpoint import verify
    from pipeline.trainer import summary_line

    resume_stage = verify(resume.rstrip("/"), cfg.data.s3).state.get("stage") if resume else None

    run = cfg.run.name
    root = cfg.run.storage if storage.is_s3(cfg.run.storage) else str(Path(cfg.run.storage).resolve())
    run_dir = storage.join(root, run)
    logs_dir = run_log_dir(run_dir, run)
    env = job_env(cfg, api_server)
    stages: dict[str, Any] = {}
    init_policy: str | None = None
    for stage in STAGES:
        base = f"{run}-{stage}"
        # a re-run skips a SUCCEEDED stage (same cluster: job status; a new cluster: the stage's
        # finished outputs in storage); a failed/stopped attempt gets the next free retry id
        sid, n = base, 0
        while (st := _status(client, sid)) in ("FAILED", "STOPPED"):
            n += 1
            sid = f"{base}-r{n}"
        done = finished_stage(cfg, run_dir, stage) if st is None else None
        if done is not None:
            log(f"[curriculum] {stage}: finished outputs in {storage.join(run_dir, stage)}, skipping")
            log(f"  | {summary_line(done)}")
            summary = dict(done, job=None, skipped=True)
        else:
            skipped = st == "SUCCEEDED"
            log_file = job_log_path(logs_dir, run, sid)
            log(f"[curriculum] {stage}: job {sid} " + ("already SUCCEEDED, skipping" if skipped else "submitted")
                + f" (log: {shown_path(log_file)})")
            entry = stage_entrypoint(cfg_path, overrides, stage, run, root, init_policy,
                                     resume if stage == resume_stage else None)
            status, logs = run_job(client, sid, entry, env, cfg.run.job_timeout_s,
                                   log=(lambda s: None) if skipped else log, log_file=log_file, show=for_console)
            if status != "SUCCEEDED":
                raise failure(f"stage {stage}", sid, status, logs, log_file)
            summary = _last_json(logs)
            summary.update(job=sid, skipped=skipped)
            if skipped and summary.get("stage"):
                log(f"  | {summary_line(summary)}")
        stages[stage] = summary
        init_policy = summary.get("policy") or storage.join(run_dir, stage, "policy")
        if stage == STAGES[0] and cfg.grounding.epochs:
            init_policy = run_grounding_job(cfg, cfg_path, overrides, client, run_dir, init_policy, env, log, logs_dir)
    selection = (run_selection_job(cfg, cfg_path, overrides, client, root, env, log, logs_dir)
                 if cfg.validation.video_shards else None)
    final = storage.join(run_dir, "final", "policy")
    src = storage.join(selection["chosen"]["checkpoint"], "policy") if selection else init_policy
    for name in ("config.json", "model.safetensors"):
        storage.write_bytes(storage.join(final, name), storage.read_bytes(storage.join(src, name), cfg.data.s3), cfg.data.s3)
    evaluation = run_evaluation_job(cfg, client, run_dir, final, env, log, logs_dir) if evaluate else None
    return {
        "run": run, "run_dir": run_dir, "logs": str(logs_dir),
        "final_policy": final.rstrip("/") + "/",
        "tensorboard": stage_tensorboard_root(cfg, run_dir),
        "stage_dirs": {s: storage.join(run_dir, s) for s in STAGES},
        "eval_results": storage.join(run_dir, "eval", "results.json"),
        "evaluation": evaluation,
        "selection": None if selection is None else {
            "chosen_step": selection["chosen"]["step"], "chosen": _scores(selection, "chosen"),
            "averaged_steps": selection["chosen"].get("averaged"),
            "last_step": selection["last"]["step"], "last": _scores(selection, "last"),
            "candidates": len(selection["candidates"]), "job": selection.get("job")},
        "stages": {s: {k: v for k, v in d.items() if k not in ("first", "last")} |
                   {"first": _pick(d.get("first")), "last": _pick(d.get("last"))} for s, d in stages.items()},
    }


def _scores(selection: dict[str, Any], which: str) -> dict[str, float]:
    """A candidate's accuracy per retention and its score, from ``selection.json``."""
    c = selection[which]
    return {k: c[k] for k in (*(f"{r:g}" for r in selection["retentions"]), "score")}


def run_selection_job(cfg: Config, cfg_path: str | None, overrides: list[str], client: Any, root: str,
                      env: dict[str, str], log: Callable[[str], Any] = print, logs_dir: Path | None = None
                      ) -> dict[str, Any]:
    """``jobs/select_policy.py`` on the last stage as a Ray job (``<run>-select``) under the storage
    ``root``: the checkpoint whose policy becomes the final one. A re-run with ``selection.json``
    in storage reads it."""
    from pipeline import storage
    from pipeline.validation import describe

    stage = STAGES[-1]
    path = storage.join(root, cfg.run.name, stage, "selection", "selection.json")
    try:
        done = json.loads(storage.read_bytes(path, cfg.data.s3))
        log(f"[curriculum] select: already chose {describe(done['chosen'])} ({path}), skipping")
        return done
    except Exception:  # noqa: BLE001  (not there yet)
        pass
    entry = stage_entrypoint(cfg_path, overrides, stage, cfg.run.name, root, script="select_policy.py")
    sid, logs = run_once(client, f"{cfg.run.name}-select", entry, env, cfg, log, "select", logs_dir)
    return _last_json(logs) | {"job": sid}


def run_grounding_job(cfg: Config, cfg_path: str | None, overrides: list[str], client: Any, run_dir: str,
                      init_policy: str, env: dict[str, str], log: Callable[[str], Any] = print,
                      logs_dir: Path | None = None) -> str:
    """``jobs/ground_policy.py`` (the grounding warm start, pipeline/grounding.py) on stage 1's
    policy as a Ray job (``<run>-grounding``); returns the warm-started policy stage 2 starts
    from, ``<run dir>/grounding/policy``. A re-run with that policy in storage reuses it."""
    from pipeline import storage

    out = storage.join(run_dir, "grounding", "policy")
    try:
        storage.read_bytes(storage.join(out, "config.json"), cfg.data.s3)
        log(f"[curriculum] grounding: warm-started policy in {out}, skipping")
        return out
    except Exception:  # noqa: BLE001  (not there yet)
        pass
    parts = [sys.executable, str(ROOT / "jobs" / "ground_policy.py"), "--init-policy", init_policy, "--out", out]
    if cfg_path:
        parts += ["--config", cfg_path]
    for o in overrides:
        parts += ["--set", o]
    run_once(client, f"{cfg.run.name}-grounding", " ".join(shlex.quote(x) for x in parts), env, cfg, log,
             "grounding", logs_dir)
    return out


def eval_world(cfg: Config) -> Path | None:
    """The world directory whose held-out videos the evaluation uses: the folder above
    ``data.video_shards`` when it holds a ``world.json`` (a world made by jobs/make_world.py)."""
    from pipeline import storage

    if storage.is_s3(cfg.data.video_shards):
        return None
    root = Path(cfg.data.video_shards).resolve().parent
    return root if (root / "world.json").is_file() else None


def run_evaluation_job(cfg: Config, client: Any, run_dir: str, final_policy: str, env: dict[str, str],
                       log: Callable[[str], Any] = print, logs_dir: Path | None = None) -> dict[str, Any] | None:
    """``jobs/evaluate.py`` on the final policy as the run's last Ray job (``<run>-eval``), writing
    ``<run dir>/eval/``; returns its JSON summary (None, said in the log, when there is no world to
    evaluate on). A re-run with the results already in storage reads them instead."""
    from pipeline import storage

    world = eval_world(cfg)
    if world is None:
        log(f"[curriculum] eval: no world.json next to data.video_shards={cfg.data.video_shards!r}; "
            "evaluate with jobs/evaluate.py --world DIR")
        return None
    out = storage.join(run_dir, "eval")
    try:
        done = json.loads(storage.read_bytes(storage.join(out, "summary.json"), cfg.data.s3))
        if done.get("compressor") == final_policy:
            log(f"[curriculum] eval: results already in {out}, skipping")
            return done
    except Exception:  # noqa: BLE001  (not there yet)
        pass
    parts = [sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--mllm", cfg.mllm.path, "--compressor", final_policy,
             "--world", str(world), "--out", out, "--limit", str(cfg.reference.eval_videos)]
    sid, logs = run_once(client, f"{cfg.run.name}-eval", " ".join(shlex.quote(p) for p in parts), env, cfg, log, "eval",
                         logs_dir)
    summary = _last_json(logs) | {"compressor": final_policy, "job": sid}
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, sort_keys=True, default=float).encode(),
                        cfg.data.s3)
    return summary


def finished_stage(cfg: Config, run_dir: str, stage: str) -> dict[str, Any] | None:
    """The learner summary of a stage that already finished in storage (all its steps or its
    data, and a saved policy), else None."""
    from pipeline import storage

    d = storage.join(run_dir, stage)
    try:
        summary = json.loads(storage.read_bytes(storage.join(d, "learner_summary.json"), cfg.data.s3))
        storage.read_bytes(storage.join(d, "policy", "config.json"), cfg.data.s3)
    except Exception:  # noqa: BLE001
        return None
    steps = getattr(cfg.stage, stage).steps
    if summary.get("steps_done", 0) < steps and not summary.get("exhausted"):
        return None
    return summary


def stage_tensorboard_root(cfg: Config, run_dir: str) -> str:
    from pipeline import storage

    base = run_dir if not storage.is_s3(run_dir) else str(Path("runs", cfg.run.name).resolve())
    return base.rstrip("/") + "/tensorboard/"


def _pick(m: dict | None) -> dict:
    keys = ("reward", "dce/safe_frac", "sparsity/kept_ratio", "policy/keep_prob", "policy/version_lag", "rollouts/s")
    return {k: m[k] for k in keys if m and k in m}

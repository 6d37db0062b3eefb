"""The two-stage curriculum, each stage its own Ray job (the driver is :mod:`actors.curriculum`).

    python jobs/train_curriculum.py --config configs/demo.yaml [--run NAME] [--storage DIR]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_curriculum.py --config configs/demo.yaml

Validates the config (exit 1 with a one-line error before any Ray work), connects to Ray (or
starts a local head it stops at the end), runs both stages, the choice of the final policy on
validation videos and the evaluation as Ray jobs, and prints, as its LAST stdout line, a JSON
summary naming the run's paths and each stage's figures.

The console shows each job's own lines (progress with ETA, redrawn in place on a terminal; each
stage's summary; the selection; the evaluation's table); each job's whole log is in
``<run>/logs/<job>.log`` and a local head's Ray session logs end in ``<run>/logs/ray/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

try:
    import _bootstrap  # noqa: F401
except ImportError:
    pass

from pipeline.config import add_config_args, add_run_args, config_with_run_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p)
    add_run_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation job")
    args = p.parse_args(argv)
    cfg = config_with_run_args(args)  # validated (and --fresh applied) before any Ray work
    if args.resume:
        from pipeline.checkpoint import CheckpointError, verify

        try:
            verify(args.resume.rstrip("/"), cfg.data.s3)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
    cfg_path = str(Path(args.config).resolve()) if args.config else None
    overrides = [o for o in args.overrides if not o.startswith(("run.name=", "run.storage="))]

    if not (os.environ.get("RAY_ADDRESS") or cfg.run.ray_address):
        # a local head is started with token auth on; Ray reads the auth mode when it is imported
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from ray.job_submission import JobSubmissionClient

    from actors.curriculum import JobFailed, _wait_job_server, connect, run_curriculum
    from actors.logs import Console, run_log_dir, shown_path
    from pipeline import storage

    say = Console()
    root = cfg.run.storage if storage.is_s3(cfg.run.storage) else str(Path(cfg.run.storage).resolve())
    logs_dir = run_log_dir(storage.join(root, cfg.run.name), cfg.run.name)
    url, head = connect(cfg)
    if head is not None:
        say(f"[curriculum] run {cfg.run.name}: local Ray head {url}; each job's whole log in {shown_path(logs_dir)}/, "
            f"Ray's own in {head.logs} (kept in {shown_path(logs_dir / 'ray')}/ at the end)")
    else:
        say(f"[curriculum] run {cfg.run.name}: Ray cluster {url}; each job's whole log in {shown_path(logs_dir)}/, "
            f"Ray's own on the cluster (dashboard {url})")
    try:
        client = _wait_job_server(lambda: JobSubmissionClient(url), cfg.run.call_timeout_s)
        t0 = time.perf_counter()
        summary = run_curriculum(cfg, cfg_path, overrides, client, log=say, resume=args.resume,
                                 evaluate=not args.no_eval, api_server=url)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
    except (JobFailed, TimeoutError) as e:  # a job failed: its last log lines and where its whole log is
        say.close()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        say.close()
        if ray.is_initialized():
            ray.shutdown()
        if head is not None:
            head.stop(keep_logs=logs_dir / "ray")
    if summary.get("evaluation"):
        try:  # the evaluation's table (results.md: a title, the command, the table)
            md = storage.read_bytes(storage.join(summary["run_dir"], "eval", "results.md"), cfg.data.s3).decode()
            say("\n".join(ln for ln in md.splitlines() if ln.startswith("|")))
        except Exception:  # noqa: BLE001  (the summary below still names the results)
            pass
    say(f"[curriculum] done in {summary['seconds']:.0f} s: final policy {shown_path(summary['final_policy'])}"
        + (f", evaluation {shown_path(storage.join(summary['run_dir'], 'eval'))}/" if summary.get("evaluation") else "")
        + f"; TensorBoard: tensorboard --logdir {shown_path(summary['tensorboard'])}; logs {shown_path(logs_dir)}/")
    print(json.dumps(summary, sort_keys=True, default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

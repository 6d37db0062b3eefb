"""`make demo`: the whole pipeline on the embedded default, on this machine.

1. the shapes world (``world`` section) into the folder above ``data.image_shards`` (cached), and
   one pass of both Ray Data streams over it (samples per kind, quarantined with reasons, clips/s);
2. score-tiny, the reference MLLM, into ``mllm.path`` (cached by spec hash; ~15 min the first time);
3. the two-stage curriculum as Ray jobs (``jobs/train_curriculum.py``) on a local Ray head, then
   the choice of the final policy among the stage-2 checkpoints on the validation videos
   (``jobs/select_policy.py``);
4. (the curriculum's last Ray job) the evaluation of the trained compressor against every
   baseline (``jobs/evaluate.py``), whose table ends the output.

Each step is its own process, exactly as a user would run it; the commands are printed. The
console gets one line per phase saying where its outputs landed, the curriculum's own lines (a
progress line per stage, redrawn in place on a terminal; each stage's summary; the selection; the
evaluation table); the rest goes to ``<run>/logs/`` (each job's whole log, the score-tiny build's
output, Ray's session logs), which the console names.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401

from actors.logs import Console, run_log_dir, shown_path
from pipeline import storage
from pipeline.config import add_config_args, config_from_args
from pipeline.data.world import generate_world

JOBS = Path(__file__).resolve().parent


def ensure_world(cfg, say=print) -> Path:
    """Generate the world next to the configured shard dirs unless it is there with the same config."""
    if storage.is_s3(cfg.data.image_shards):
        raise SystemExit("error: the demo generates its world locally; data.image_shards must be a local path")
    root = Path(cfg.data.image_shards).parent
    marker = root / "world.json"
    if marker.exists() and marker.read_text() == cfg.world.model_dump_json(indent=2) + "\n":
        say(f"[demo] world: {shown_path(root)} (cached)")
        return root
    say(f"[demo] world: generating {cfg.world.images} images and {cfg.world.videos} videos into {shown_path(root)}")
    t0 = time.perf_counter()
    generate_world(cfg.world, root)
    say(f"[demo] world: {shown_path(root)} ({time.perf_counter() - t0:.0f} s)")
    return root


def stream_check(cfg, say=print) -> dict:
    """Stream stage 1 and stage 2 data once through Ray Data on a local cluster and summarise (one
    line; Ray's own output stays in its session logs, which the line names)."""
    import logging

    import ray

    from actors import data_stream as stream
    from actors.ray_utils import ensure_ray

    ensure_ray(cfg.run.ray_address, logging_level=logging.WARNING)  # not "Started a local Ray instance"
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # no per-operator progress on a non-terminal, no bars on a terminal
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # "Starting execution of Dataset ..." (in ray-data.log)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled. To enable ..."
    out, parts = {}, []
    try:
        node = ray._private.worker._global_node  # (no public API names the session dir)
        session = f" (Ray's logs: {Path(node.get_session_dir_path()) / 'logs'})" if node is not None else ""
    except Exception:  # noqa: BLE001
        session = ""
    try:
        for name, ds in (("pseudo_video", stream.pseudo_video_dataset(cfg, seed=cfg.run.seed)),
                         ("video", stream.video_dataset(cfg))):
            summary = stream.summarize_stream(ds)
            out[name] = {"samples": summary.samples, "clips_per_s": round(summary.clips_per_s, 1),
                         "quarantined": summary.quarantined}
            q = summary.quarantined_total
            parts.append(f"{name} {summary.samples} samples at {summary.clips_per_s:.1f} clips/s"
                         + (f" ({q} quarantined: {', '.join(f'{k} {v}' for k, v in sorted(summary.quarantined.items()))})"
                            if q else ""))
    finally:
        ray.shutdown()  # the curriculum starts its own head
    say(f"[demo] streams: {'; '.join(parts)}{session}")
    return out


def run(cmd: list[str], say=print, log_file: Path | None = None, allow: tuple[int, ...] = (0,)) -> str:
    """Run a job; return its last stdout line (its JSON summary). Its stdout goes to ``log_file``
    when given (its stderr - progress bars, errors - stays on the console), else to the console
    through ``say`` (a :class:`Console` redraws progress lines in place), all but JSON lines."""
    say("[demo] $ " + " ".join(shown_path(c) if c.startswith("/") else c for c in cmd)
        + (f"  (output: {shown_path(log_file)})" if log_file else ""))
    out = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "w", encoding="utf-8")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    last = ""
    try:
        for line in proc.stdout:
            if out is not None:
                out.write(line)
                out.flush()
            elif not line.startswith("{"):
                say(line.rstrip("\n"))
            if line.strip():
                last = line.strip()
    finally:
        if out is not None:
            out.close()
    if proc.wait() not in allow:
        raise SystemExit(f"error: {cmd[1]} exited with status {proc.returncode}"
                         + (f"; its output: {shown_path(log_file)}" if log_file else ""))
    return last


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default="configs/demo.yaml")
    args = ap.parse_args(argv)
    cfg = config_from_args(args)
    cfg_args = (["--config", args.config] if args.config else []) + [a for o in args.overrides for a in ("--set", o)]
    py = sys.executable
    if not (os.environ.get("RAY_ADDRESS") or cfg.run.ray_address):
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # local clusters with token auth, said explicitly (no notice)
    # no "Loading weights" / "Writing model shards" bars from every model load and save (the jobs
    # inherit it); score-tiny's own pre-training bar stays
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = cfg.run.storage if storage.is_s3(cfg.run.storage) else str(Path(cfg.run.storage).resolve())
    logs = run_log_dir(storage.join(root, cfg.run.name), cfg.run.name)
    say = Console()
    t0 = time.perf_counter()

    world = ensure_world(cfg, say)
    streams = stream_check(cfg, say)
    # score-tiny below its accuracy bar exits 1: the demo says so and goes on (it is a demo, not a gate)
    ref = json.loads(run([py, str(JOBS / "build_reference_mllm.py"), *cfg_args, "--world", str(world),
                          "--out", cfg.mllm.path], say, logs / "build_reference_mllm.log", allow=(0, 1)))
    say(f"[demo] score-tiny: {shown_path(cfg.mllm.path)} ({'cached' if ref.get('cached') else 'built'}), held-out QA "
        f"accuracy {ref['qa_accuracy']:.3f} (options {ref['option_accuracy']:.3f})")
    if ref["qa_accuracy"] < cfg.reference.min_qa_accuracy:
        say(f"[demo] WARNING: score-tiny held-out QA accuracy {ref['qa_accuracy']:.3f} is below the "
            f"{cfg.reference.min_qa_accuracy} bar; results below are on an under-trained reference model")
    # the curriculum's last job evaluates the final policy against every baseline (its table ends its output)
    cur = json.loads(run([py, str(JOBS / "train_curriculum.py"), *cfg_args], say))
    eval_dir = storage.join(cur["run_dir"], "eval")
    say(f"[demo] done in {(time.perf_counter() - t0) / 60:.0f} min: the run is in {shown_path(cur['run_dir'])}/ "
        f"(final/policy, eval/results.md, tensorboard/, logs/)")
    summary = {"streams": streams, "reference": {k: ref[k] for k in ("qa_accuracy", "option_accuracy", "cached")},
               "final_policy": cur["final_policy"], "tensorboard": cur["tensorboard"], "eval_dir": eval_dir,
               "evaluation": cur["evaluation"], "logs": str(logs)}
    print(json.dumps(summary, default=float))
    return summary


if __name__ == "__main__":
    main()

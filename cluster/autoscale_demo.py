"""The rollout actor pool scaling on one machine: Ray Data ActorPoolStrategy -> Ray autoscaler -> nodes.

    .venv/bin/python cluster/autoscale_demo.py [--max-actors 3] [--rows 40] [--idle-timeout-s 8]

The same chain as on Kubernetes (cluster/README.md, section 9), with Ray's fake multi-node
provider standing in for KubeRay: a real ``ray start --head --autoscaling-config`` head runs the
real Ray autoscaler (v1), whose provider ``fake_multinode`` starts each "node" as extra Ray
processes (raylet etc.) on this machine instead of a pod. (``ray.cluster_utils.AutoscalingCluster``
wraps the same thing but runs ``ray stop --force``, which would kill every other Ray cluster on the
machine, so this script starts and stops its own head instead, on a free port.)

* head: 1 CPU (the driver's read/throttle tasks), no GPU;
* node type ``rollout``: 1 CPU + 1 (logical) GPU (an actor takes both), ``min_workers 0``, ``max_workers = --max-actors``
  (the RayCluster's rollout group: minReplicas/maxReplicas);
* the pool: ``map_batches(Rollout, compute=ActorPoolStrategy(min_size=1, max_size=N), num_gpus=1)``,
  i.e. ``rollout.min_actors=1, max_actors=N, num_gpus=1``: every actor needs a rollout node.

The producer is fast for the first half of the rows (load: the pool's queue backs up, Ray Data adds
actors, each pending actor is GPU demand, the autoscaler adds rollout nodes) and slow for the
second half (the pool idles: Ray Data removes actors, their nodes go idle and the autoscaler
removes them after ``idle_timeout``). At the end the pool is gone and the nodes scale to 0.
Prints a timeline (seconds, rollout nodes alive, GPUs in use = actors) and a JSON summary as the
last line; exit 0 if the pool grew to >= 2 actors and the nodes shrank again.

Measured here (2 busy cores): nodes 0 -> 1 -> 2 -> 3 within 50 s, actors 1 -> 2 and back to 1 in
the slow half, pipeline done at 104 s, nodes 3 -> 0 by 112 s; exit 0. Too slow for ``make test``.
Nothing outside this script's own processes is touched: the head runs with ``--block`` and a private ``--temp-dir``; at the end its
process tree is terminated by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GPU_NODE = "rollout"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs_address: str, max_nodes: int, idle_timeout_s: float) -> dict:
    """A fake_multinode cluster config (Ray's fake_multi_node/example.yaml, trimmed)."""
    return {
        "cluster_name": "score-autoscale-demo",
        "max_workers": max_nodes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            GPU_NODE: {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 150 * 1024**2},
                       "node_config": {}, "min_workers": 0, "max_workers": max_nodes},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_head(head: subprocess.Popen, extra: set[int]) -> None:
    """Terminate the head (``ray start --block`` stops what it started on SIGTERM), then any
    process of its tree still alive (fake nodes are children of its autoscaler). Only PIDs that
    this script's head spawned."""
    import psutil

    pids = set(_descendants(head.pid)) | extra
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
    time.sleep(1)
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.terminate()
        except psutil.NoSuchProcess:
            continue
    gone, alive = psutil.wait_procs([p for p in map(_proc, pids) if p], timeout=10)
    for p in alive:
        p.kill()


def _proc(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-actors", type=int, default=3, help="pool max_size = max rollout nodes")
    ap.add_argument("--rows", type=int, default=40, help="batches through the pool (half fast, half slow)")
    ap.add_argument("--task-s", type=float, default=2.0, help="seconds one rollout batch takes")
    ap.add_argument("--gap-s", type=float, default=4.0, help="seconds between rows in the slow half")
    ap.add_argument("--idle-timeout-s", type=float, default=8.0, help="autoscaler idle timeout (idleTimeoutSeconds)")
    ap.add_argument("--timeout-s", type=float, default=420.0)
    args = ap.parse_args(argv)

    ray_cli = Path(sys.executable).with_name("ray")
    tmp = Path(tempfile.mkdtemp(prefix="score_as_"))
    import ray
    from ray._private.services import get_node_ip_address

    ip = get_node_ip_address()
    port = _free_port()
    gcs = f"{ip}:{port}"
    cfg = tmp / "autoscaling.json"
    cfg.write_text(json.dumps(autoscaling_config(gcs, args.max_actors, args.idle_timeout_s)))
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled",
               OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", f"--port={port}", f"--node-ip-address={ip}", "--num-cpus=1",
         "--num-gpus=0", f"--object-store-memory={200 * 1024**2}", f"--autoscaling-config={cfg}",
         f"--temp-dir={tmp}", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=open(tmp / "head.out", "w"), stderr=subprocess.STDOUT)
    seen: set[int] = set()
    timeline: list[tuple[float, int, int]] = []
    t0 = time.monotonic()
    try:
        os.environ["RAY_AUTH_MODE"] = "disabled"
        deadline = time.monotonic() + 90
        while True:
            try:
                ray.init(address=gcs, log_to_driver=False, logging_level="ERROR")
                break
            except Exception:  # noqa: BLE001  (head still starting)
                if head.poll() is not None or time.monotonic() > deadline:
                    print((tmp / "head.out").read_text()[-3000:], file=sys.stderr)
                    raise
                time.sleep(1)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False

        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                try:
                    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]
                    total = sum(n["Resources"].get("GPU", 0) for n in nodes)
                    used = total - ray.available_resources().get("GPU", 0)
                    timeline.append((round(time.monotonic() - t0, 1), len(nodes), int(round(used))))
                    seen.update(_descendants(head.pid))
                except Exception:  # noqa: BLE001
                    pass
                stop.wait(1.0)

        th = threading.Thread(target=watch, daemon=True)
        th.start()

        burst, task_s, gap_s = args.rows // 2, args.task_s, args.gap_s

        def produce(row: dict) -> dict:  # the sample stream: fast, then a trickle
            if row["id"] >= burst:
                time.sleep(gap_s)
            return row

        class Rollout:  # stands in for actors/rollout.py RolloutWorker (1 GPU each)
            def __call__(self, batch: dict) -> dict:
                time.sleep(task_s)
                batch["node"] = [ray.get_runtime_context().get_node_id()[:8]] * len(batch["id"])
                return batch

        ds = (ray.data.range(args.rows, override_num_blocks=args.rows)
              .map(produce, num_cpus=1)
              .map_batches(Rollout, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=args.max_actors),
                           num_gpus=1, num_cpus=1, batch_size=1))
        done = 0
        for _ in ds.iter_rows():
            done += 1
            if time.monotonic() - t0 > args.timeout_s:
                raise TimeoutError("pipeline did not finish in time")
        t_done = round(time.monotonic() - t0, 1)
        # the pool is gone: its nodes go idle and are removed after the idle timeout
        while time.monotonic() - t0 < args.timeout_s and (not timeline or timeline[-1][1] > 0):
            time.sleep(1)
        stop.set()
        th.join(5)
    finally:
        try:
            ray.shutdown()
        finally:
            stop_head(head, seen)

    peak_nodes = max((n for _, n, _ in timeline), default=0)
    peak_actors = max((a for _, _, a in timeline), default=0)
    i_peak = next(i for i, (_, _, a) in enumerate(timeline) if a == peak_actors) if timeline else 0
    during = [a for t, _, a in timeline[i_peak:] if t <= t_done]
    shrank_running = bool(during) and min(during) < peak_actors
    last = [(t, n, a) for t, n, a in timeline]
    changes = [x for i, x in enumerate(last) if i == 0 or x[1:] != last[i - 1][1:]]
    print("t(s)  rollout_nodes  actors(GPUs in use)")
    for t, n, a in changes:
        print(f"{t:6.1f}  {n:3d}  {a:3d}")
    summary = {"rows": done, "max_actors": args.max_actors, "peak_nodes": peak_nodes, "peak_actors": peak_actors,
               "pool_shrank_while_running": shrank_running, "pipeline_done_s": t_done,
               "nodes_at_end": timeline[-1][1] if timeline else None,
               "grew": peak_actors >= 2, "shrank": bool(timeline) and timeline[-1][1] < peak_nodes}
    ok = summary["grew"] and summary["shrank"]
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"logs (head, autoscaler monitor.log): {tmp}", file=sys.stderr)
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

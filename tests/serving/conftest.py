"""Fixtures of the serving tests: they run in the serving venv (``.venv-serve``: vLLM, transformers
< 5.20) and compare vLLM with the project's own path, which needs the MAIN venv (transformers
5.25, the adapters). The bridge is ``reference.py`` run by the main venv's python as a
subprocess: it writes the model, the compressor, the frames and the reference outputs into a
folder that both sides read.

Run them (what ``make test`` does, after building both venvs)::

    .venv-serve/bin/python -m pytest -q --confcutdir=tests/serving tests/serving

(``--confcutdir``: the repository's tests/conftest.py imports Ray, which the serving venv lacks.)
The main venv's python is ``$SCORE_MAIN_PYTHON``, else ``.venv/bin/python``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("vllm") is None:
    # the main venv (``pytest tests``): these tests run in the serving venv, nothing to collect here
    collect_ignore_glob = ["test_*.py"]

# engines in this very process: the plugin's record of selections is readable, and an engine
# starts in seconds instead of ~30 s for a spawned engine core
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = Path(__file__).with_name("reference.py")
#: families with a serving reference (reference.py builds them); Qwen3-VL joins here
FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
RETENTION = 0.1
KV_BYTES = 64 * 2**20  # the CPU backend otherwise reserves most of the machine's memory


def main_python() -> str:
    exe = os.environ.get("SCORE_MAIN_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
    if not Path(exe).exists():
        pytest.skip(f"the main venv's python ({exe}) is missing: make venv, or set SCORE_MAIN_PYTHON")
    return exe


@dataclass
class Reference:
    """What reference.py wrote: ``dir/model``, ``dir/policy``, frames and the JSON."""

    dir: Path
    data: dict
    frames: np.ndarray

    @property
    def model(self) -> str:
        return str(self.dir / "model")

    @property
    def policy(self) -> str:
        return str(self.dir / "policy")

    @property
    def metadata(self) -> dict:
        """The video's metadata as vLLM takes it next to the frames (every frame sampled, at fps)."""
        n, fps = len(self.frames), self.data["fps"]
        return {"fps": fps, "total_num_frames": n, "duration": n / fps, "frames_indices": list(range(n)),
                "video_backend": "opencv"}

    def prompt(self) -> dict:
        """The adapter's prompt ids with the video as ONE pad (vLLM's processor expands it), so
        both sides read the same tokens without a second tokenization."""
        return {"prompt_token_ids": self.data["prompt_ids_unexpanded"],
                "multi_modal_data": {"video": [(self.frames, self.metadata)]}}


def make_reference(out: Path, family: str, *extra: str) -> Reference:
    cmd = [main_python(), str(REFERENCE), str(out), "--family", family, "--retention", str(RETENTION), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if res.returncode:
        raise RuntimeError(f"reference.py failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return Reference(out, json.loads((out / "reference.json").read_text()), np.load(out / "frames.npy"))


@pytest.fixture(scope="session", params=FAMILIES)
def reference(request, tmp_path_factory) -> Reference:
    return make_reference(tmp_path_factory.mktemp(f"ref-{request.param}"), request.param)


@contextlib.contextmanager
def score_env(compressor: str | None, retention: float | str | None = None, **more: str):
    """The plugin's environment for one engine (set while it starts and serves, restored after)."""
    values = {"SCORE_COMPRESSOR": compressor, "SCORE_RETENTION": None if retention is None else str(retention),
              "SCORE_MIN_PER_FRAME": more.get("min_per_frame")}
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def engine(model: str, **kwargs):
    """An in-process vLLM engine for the tiny models (float32, eager, small KV cache)."""
    from vllm import LLM

    opts = dict(enforce_eager=True, dtype="float32", max_model_len=512, kv_cache_memory_bytes=KV_BYTES, seed=0,
                limit_mm_per_prompt={"image": 0, "video": 1})
    opts.update(kwargs)
    return LLM(model=model, **opts)


def python_exe() -> str:
    return sys.executable

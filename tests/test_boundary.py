"""The library/Ray boundary: ``pipeline/`` is the pure library and never imports ``ray``;
Ray code lives in ``actors/``. Every ``pipeline`` module is imported in a fresh interpreter where
``import ray`` fails, so a module-level or import-time dependency on Ray cannot hide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"


def _modules() -> list[str]:
    out = []
    for f in sorted(PIPELINE.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


_PROBE = r"""
import importlib, importlib.abc, sys

class _NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"pipeline imported {name}: the library must not depend on Ray")
        return None

sys.meta_path.insert(0, _NoRay())
failed = []
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except Exception as e:
        failed.append(f"{m}: {type(e).__name__}: {e}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_pipeline_module_imports_without_ray():
    mods = _modules()
    assert "pipeline.trainer" in mods and "pipeline.mllm.base" in mods  # the walk found the library
    r = subprocess.run([sys.executable, "-c", _PROBE, *mods], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_probe_catches_a_ray_import(tmp_path):
    """The guard itself works: a module that imports ray fails under it."""
    (tmp_path / "uses_ray.py").write_text("import ray\n")
    r = subprocess.run([sys.executable, "-c", _PROBE, "uses_ray"], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(tmp_path)}, timeout=60)
    assert r.returncode == 1 and "must not depend on Ray" in r.stdout


def test_no_pipeline_source_mentions_ray_imports_or_the_cluster_dir():
    """``grep -rn "import ray" pipeline/`` is empty, and the library never reads ``cluster/``."""
    for f in PIPELINE.rglob("*.py"):
        text = f.read_text()
        assert "import ray" not in text and "from ray" not in text, f
        assert '"cluster"' not in text and "cluster/" not in text, f

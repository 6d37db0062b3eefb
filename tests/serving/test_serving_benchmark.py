"""``jobs/benchmark.py --sections serving --quick`` in the serving venv: three engines (no pruning,
vLLM's EVS, SCORE) at concurrency 1 and 8, TTFT and req/s side by side (about a minute)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_serving_section_reports_the_three_modes_side_by_side(tmp_path):
    out = tmp_path / "serving.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("SCORE_COMPRESSOR", "SCORE_RETENTION", "SCORE_MIN_PER_FRAME"):
        env.pop(k, None)
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "benchmark.py"), "--sections", "serving", "--quick",
                          "--out", str(out), "--workdir", str(tmp_path / "work")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    rows = summary["serving"]["rows"]
    assert sorted((r["mode"], r["concurrency"]) for r in rows) == sorted(
        (m, c) for m in ("none", "evs", "score") for c in (1, 8))
    t, h, w = summary["serving"]["grid"]
    kept = {r["mode"]: r["kept"] for r in rows}
    assert kept["none"] == t * h * w and kept["score"] == -(-t * h * w // 10)  # ceil(0.1 * T'N)
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    assert kept["evs"] == compute_retained_tokens_count(h * w, t, 0.9)  # at least one whole step
    for r in rows:
        assert r["req_s"] > 0 and r["ttft_ms_median"] > 0
        assert (r["policy_ms_median"] is not None) == (r["mode"] == "score")
    assert 0 < summary["serving"]["policy_share_of_ttft"] < 1
    text = out.read_text()
    assert "## Serving: vLLM, no pruning vs EVS vs SCORE at retention 0.1" in text
    assert text.count("| score |") == 2 and "TTFT speedup vs none" in text
    # the --sections guard: serving runs alone
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "benchmark.py"), "--sections", "serving,prefill"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "runs alone" in bad.stderr

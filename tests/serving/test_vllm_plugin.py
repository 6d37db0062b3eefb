"""The SCORE compressor inside vLLM (serving/vllm_plugin.py) against the project's own path.

Every engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, conftest.py), on the
tiny model reference.py built with the project's registry; the reference outputs come from the
main venv. Greedy ids are compared where reference.py measured a gap between the best and the
second-best token of at least 1e-3 (float32 noise between the two implementations is ~1e-6).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES, KV_BYTES, RETENTION, engine, score_env
from serving import vllm_plugin

pytestmark = pytest.mark.slow  # each test starts a vLLM engine (seconds) or a server


def _generate(llm, ref, max_tokens: int | None = None):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens or ref.data["max_new_tokens"], logprobs=1)
    out = llm.generate(ref.prompt(), sp, use_tqdm=False)[0]
    ids = list(out.outputs[0].token_ids)
    lps = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, ids)]
    pads = sum(t == ref.data["video_token_id"] for t in out.prompt_token_ids)
    text = [t for t in out.prompt_token_ids if t != ref.data["video_token_id"]]
    return ids, lps, pads, text


def _text_ids(ref) -> list[int]:
    return [t for t in ref.data["prompt_ids"] if t != ref.data["video_token_id"]]


def _assert_same_greedy(ids, lps, expected: dict) -> None:
    assert expected["margin"] > 1e-3, f"reference greedy choices too close to compare ({expected['margin']})"
    assert ids == expected["ids"]
    assert lps == pytest.approx(expected["logprobs"], abs=1e-4)


def test_score_in_vllm_equals_the_project(reference):
    """SCORE_COMPRESSOR on: vLLM keeps exactly the project's top-K indices of the same X (K =
    ceil(r * T' * N) placeholders written by the front-end), and its greedy tokens and their
    log-probs equal the project's pruned generate."""
    ref = reference
    t, gh, gw = ref.data["grid"]
    with score_env(ref.policy, RETENTION):
        llm = engine(ref.model)
        before = len(vllm_plugin.selections)
        ids, lps, pads, text = _generate(llm, ref)
    assert len(vllm_plugin.selections) == before + 1
    sel = vllm_plugin.selections[-1]
    assert sel["grid"] == (t, gh, gw)
    assert sel["keep"] == ref.data["keep"]
    assert pads == ref.data["k"] == len(ref.data["keep"]) == math.ceil(RETENTION * t * gh * gw)
    assert text == _text_ids(ref)
    _assert_same_greedy(ids, lps, ref.data["score"])
    assert ids != ref.data["full"]["ids"]  # pruning changed the answer: the comparison can tell


def test_no_compressor_equals_the_unpruned_adapter(reference):
    """Without SCORE_COMPRESSOR the plugin changes nothing: every video token, and the greedy
    tokens of the project's unpruned adapter."""
    ref = reference
    t, gh, gw = ref.data["grid"]
    with score_env(None):
        llm = engine(ref.model)
        before = len(vllm_plugin.selections)
        ids, lps, pads, text = _generate(llm, ref)
    assert len(vllm_plugin.selections) == before
    assert pads == t * gh * gw
    assert text == _text_ids(ref)
    _assert_same_greedy(ids, lps, ref.data["full"])


def test_evs_runs_on_the_cpu_with_the_workaround(reference):
    """vLLM's own EVS (no compressor, --video-pruning-rate) on the CPU backend: without the
    plugin's CPUModelRunner fix it crashes (its pruned embeddings keep 4 position channels);
    with it, the EVS count (at least the first frame) and EVS's own mask are used."""
    ref = reference
    t, gh, gw = ref.data["grid"]
    n = gh * gw
    with score_env(None):
        llm = engine(ref.model, video_pruning_rate=1 - RETENTION)
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        assert runner.is_multimodal_pruning_enabled
        before = len(vllm_plugin.selections)
        ids, _, pads, _ = _generate(llm, ref)
    assert len(vllm_plugin.selections) == before  # EVS chose, not the compressor
    assert pads == max(n, int(t * n * RETENTION))
    assert len(ids) == ref.data["max_new_tokens"]


def test_retention_from_vllms_own_setting(reference):
    """``--video-pruning-rate 1-r`` with SCORE_COMPRESSOR and no SCORE_RETENTION: the same K."""
    ref = reference
    with score_env(ref.policy):
        llm = engine(ref.model, video_pruning_rate=1 - RETENTION)
        _, _, pads, _ = _generate(llm, ref, max_tokens=1)
    assert pads == ref.data["k"]
    assert vllm_plugin.selections[-1]["keep"] == ref.data["keep"]


# ------------------------------------------------------------------------------ bad input
def _text_only_model(ref, tmp_path: Path) -> str:
    """A Qwen2 text-only model folder (a family the plugin does not serve), config only: the
    check runs before any weight loads."""
    cfg = json.loads((Path(ref.model) / "config.json").read_text())["text_config"]
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    cfg.pop("rope_parameters", None)
    out = tmp_path / "qwen2-text"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(ref.model) / f, out / f)
    return str(out)


@pytest.mark.parametrize("case", ["width", "family", "retention_zero", "retention_above_one", "retention_text",
                                  "disagree", "question_aware", "not_a_compressor"])
def test_bad_input_fails_at_engine_start(reference, tmp_path, case):
    """Each is one ValueError naming the problem, raised while the engine is configured (before
    any weights load), never a silently different answer."""
    from pipeline.config import PolicyConfig
    from pipeline.policy import ScorePolicy

    ref = reference
    if ref.data["family"] != FAMILIES[0]:
        pytest.skip("the checks do not depend on the family: run once")
    model, compressor, retention, kwargs = ref.model, ref.policy, RETENTION, {}
    if case == "width":
        compressor = str(ScorePolicy(32, PolicyConfig(hidden=32, heads=2, layers=0)).save_pretrained(tmp_path / "p32"))
        match = r"reads 32-wide tokens, but .* embeds video tokens 64 wide"
    elif case == "family":
        model = _text_only_model(ref, tmp_path)
        match = r"unsupported model: .* is \['Qwen2ForCausalLM'\]; the plugin supports Qwen2_5_VLForConditionalGeneration"
    elif case == "retention_zero":
        retention, match = 0, r"SCORE_RETENTION=0 is outside \(0, 1\]"
    elif case == "retention_above_one":
        retention, match = 1.5, r"SCORE_RETENTION=1.5 is outside \(0, 1\]"
    elif case == "retention_text":
        retention, match = "ten percent", r"SCORE_RETENTION='ten percent' is not a number"
    elif case == "question_aware":
        compressor = str(ScorePolicy(64, PolicyConfig(hidden=32, heads=2, layers=0, question_aware=True)).save_pretrained(tmp_path / "pq"))
        match = r"is question-aware \(policy.question_aware\): vLLM prunes each video before its question is read"
    elif case == "disagree":
        kwargs, match = {"video_pruning_rate": 0.5}, r"SCORE_RETENTION=0.1 and --video-pruning-rate 0.5 disagree"
    else:
        compressor, match = str(tmp_path / "missing"), r"SCORE_COMPRESSOR=.*missing' is not a directory"
    with score_env(compressor, retention), pytest.raises(ValueError, match=match):
        engine(model, **kwargs)


# ------------------------------------------------------------------------------ unit: the two names
def test_count_and_mask_switch_with_the_environment(reference):
    """With SCORE off both replaced names are vLLM's EVS functions; on, the count is
    ceil(r*T'*N) for any rate spelling and the mask is the compressor's top-K of X."""
    if reference.data["family"] != FAMILIES[0]:
        pytest.skip("family-independent: run once")
    from vllm.multimodal.video_prune import evs

    from pipeline.policy import ScorePolicy
    from pipeline.select import topk_keep

    vllm_plugin.register()  # idempotent; an engine start would have run it
    t, gh, gw = 3, 4, 5
    X = torch.randn(t * gh * gw, 64, generator=torch.Generator().manual_seed(0))
    with score_env(None):
        assert vllm_plugin.retained_tokens_count(gh * gw, t, 0.9) == evs.compute_retained_tokens_count(gh * gw, t, 0.9)
        assert torch.equal(vllm_plugin.retention_mask(X, (t, 2 * gh, 2 * gw), 2, 0.9),
                           evs.compute_retention_mask(X, (t, 2 * gh, 2 * gw), 2, 0.9))
    with score_env(reference.policy):
        assert vllm_plugin.retained_tokens_count(gh * gw, t, 0.9) == 6  # ceil(0.1 * 60)
        assert vllm_plugin.retained_tokens_count(gh * gw, t, 1 - 0.25) == 15
        mask = vllm_plugin.retention_mask(X, (t, 2 * gh, 2 * gw), 2, 0.9)
    policy = ScorePolicy.from_pretrained(reference.policy).eval()
    with torch.no_grad():
        expect = topk_keep(policy(X.reshape(t, gh * gw, 64), (gh, gw)), k=6)
    assert mask.nonzero().flatten().tolist() == expect.tolist()
    import vllm.model_executor.models.qwen2_5_vl as q25

    assert q25.compute_retained_tokens_count is vllm_plugin.retained_tokens_count
    assert q25.compute_retention_mask is vllm_plugin.retention_mask


# ------------------------------------------------------------------------------ the OpenAI server
def test_openai_server_answers_a_video_chat_with_the_compressor(reference, tmp_path):
    """``python -m vllm.entrypoints.openai.api_server`` with SCORE_COMPRESSOR set answers an
    OpenAI chat request holding an mp4 video; its prompt holds exactly K video tokens."""
    import base64
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    import cv2

    from conftest import ROOT

    ref = reference
    t, gh, gw = ref.data["grid"]
    frames = ref.frames
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), ref.data["fps"], (frames.shape[2], frames.shape[1]))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SCORE_COMPRESSOR": ref.policy, "SCORE_RETENTION": str(RETENTION), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ref.model, "--served-model-name", "tiny",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
           "--kv-cache-memory-bytes", str(KV_BYTES), "--limit-mm-per-prompt", json.dumps({"image": 0, "video": 1}),
           "--media-io-kwargs", json.dumps({"video": {"num_frames": len(frames)}})]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("server did not start:\n" + (tmp_path / "server.log").read_text()[-4000:])
                time.sleep(1)
        url = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
        body = {"model": "tiny", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "describe the video :\n"},
                    {"type": "video_url", "video_url": {"url": url}},
                    {"type": "text", "text": "\nwhat color is the circle ?"}]}]}
        req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    server_log = (tmp_path / "server.log").read_text()
    assert "SCORE compressor" in server_log
    msg = reply["choices"][0]["message"]
    assert isinstance(msg["content"], str) and reply["usage"]["completion_tokens"] >= 1
    # the prompt is the project's layout of the same chat (reference.py) with K video tokens, not T'*N
    assert reply["usage"]["prompt_tokens"] == len(ref.data["prompt_ids"]) - t * gh * gw + ref.data["k"]


def test_qwen3_wrapper_collapse():
    """The bug-2 workaround's rewrite: the chat template's video triple becomes the bare pad (what
    transformers >= 5.20 does), and nothing else changes."""
    assert vllm_plugin.collapse_video_wrappers([1, 5, 7, 6, 2, 5, 6, 7], 5, 7, 6) == [1, 7, 2, 5, 6, 7]
    assert vllm_plugin.collapse_video_wrappers([5, 7], 5, 7, 6) == [5, 7]

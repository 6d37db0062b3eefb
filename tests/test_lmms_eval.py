"""The lmms-eval bridge (pipeline/lmms_eval_model.py, lmms_tasks/shapes_video_qa/): arguments and
prompts, the task's documents, batched decoding equal to the adapters' own, and through lmms-eval
itself (installed by `make test`: pyproject.toml's eval extra + lmms-eval without its requirements)
the cross-check against jobs/evaluate.py, batch size 1 vs 8, the offline CLI run and bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.data.prompts import qa_prompt
from pipeline.lmms_eval_model import (BadRequest, export_task, generate_batch, loglikelihood_batch, message_parts,
                                      parse_retention, render_prompt, resolve_method, task_documents)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "lmms_tasks"
HAVE_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
needs_lmms_eval = pytest.mark.skipif(not HAVE_LMMS_EVAL, reason="lmms-eval not installed (pip install -e '.[eval]' && "
                                     "pip install --no-deps lmms-eval==0.7.3; `make test` does)")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: one thread is as fast, and far faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _task_utils(jsonl: Path):
    """lmms_tasks/shapes_video_qa/utils.py imported as lmms-eval does (it resolves its JSONL on import)."""
    before = os.environ.get("SHAPES_VIDEO_QA_JSONL")
    os.environ["SHAPES_VIDEO_QA_JSONL"] = str(jsonl)
    try:
        spec = importlib.util.spec_from_file_location("shapes_utils", TASKS / "shapes_video_qa" / "utils.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if before is None:
            del os.environ["SHAPES_VIDEO_QA_JSONL"]
        else:
            os.environ["SHAPES_VIDEO_QA_JSONL"] = before
    return mod


# ------------------------------------------------------------------------------------ unit
@pytest.mark.unit
def test_arguments_are_checked_with_one_clear_error_each():
    assert parse_retention(0.1) == 0.1 and parse_retention("1") == 1.0
    for bad in (0, 0.0, -0.5, 1.5, "abc", None, float("nan")):
        with pytest.raises(ValueError, match=r"retention=.*\(0, 1\]"):
            parse_retention(bad)
    assert resolve_method(None, None) == "full" and resolve_method(None, "runs/x/policy") == "score"
    assert resolve_method("FastV", None) == "fastv" and resolve_method("uniform", "dir") == "uniform"
    with pytest.raises(ValueError, match=r"method='tome' is not a known method; known: score, random"):
        resolve_method("tome", None)
    with pytest.raises(ValueError, match="method=score needs compressor"):
        resolve_method("score", None)


@pytest.mark.unit
def test_messages_render_to_the_prompt_evaluate_scores(tiny_mllm, tmp_path):
    adapter = tiny_mllm("llava_onevision")
    doc = {"id": "v0", "video": "/data/v0.mp4", "question": "what color is the circle ?", "answer": "red",
           "options": ["blue", "red"], "type": "color"}
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps(doc) + "\n")
    utils = _task_utils(jsonl)
    assert utils.TEST_FILE == str(jsonl.resolve())
    prompt, video = render_prompt(adapter, message_parts(utils.doc_to_messages(doc)))
    assert prompt == qa_prompt(doc["question"]) and video == "/data/v0.mp4"
    assert utils.doc_to_target_index(doc) == 1 and utils.process_results(doc, ["red. it"]) == {"accuracy": 1.0}
    assert utils.process_results(doc, ["blue"]) == {"accuracy": 0.0}
    # one clear error each: no video, two videos, an image beside the video, a document without one
    text_only = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(BadRequest, match=r"doc 7: the request has no video \(it holds 1 text\)"):
        render_prompt(adapter, message_parts(text_only), where="doc 7")
    two = [{"role": "user", "content": [{"type": "video", "url": "a.mp4"}, {"type": "video", "url": "b.mp4"}]}]
    with pytest.raises(BadRequest, match="2 videos"):
        render_prompt(adapter, message_parts(two))
    img = [{"role": "user", "content": [{"type": "video", "url": "a.mp4"}, {"type": "image", "url": "a.png"}]}]
    with pytest.raises(BadRequest, match="image"):
        render_prompt(adapter, message_parts(img))
    # images only (a frame list, e.g. MVBench's frame folders): one video of those frames
    from pipeline.lmms_eval_model import FrameList

    frames = [np.full((8, 8, 3), i, dtype=np.uint8) for i in range(3)]
    fl = [{"role": "user", "content": [*({"type": "image", "url": f} for f in frames), {"type": "text", "text": "q ?"}]}]
    prompt, src = render_prompt(adapter, message_parts(fl))
    assert prompt == "<video> q ?" and isinstance(src, FrameList) and len(src) == 3
    with pytest.raises(BadRequest, match="no video"):
        render_prompt(adapter, message_parts([{"role": "user", "content": [{"type": "image", "url": frames[0]}]}]))
    with pytest.raises(ValueError, match="document 'x' has no video"):
        utils.doc_to_messages({"id": "x", "question": "q"})
    # a checkpoint with a chat template: the conversation, each turn's parts joined by a newline,
    # for the adapter to render (as training does); plain: one text, the parts joined by a space
    turns = message_parts([{"role": "system", "content": "be brief"}] + utils.doc_to_messages(doc))
    chat = SimpleNamespace(video_placeholder="<video>", chat=SimpleNamespace(plain=False))
    assert render_prompt(chat, turns)[0] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "<video>\nquestion : what color is the circle ? answer :"}]
    plain = SimpleNamespace(video_placeholder="<video>", chat=SimpleNamespace(plain=True))
    assert render_prompt(plain, turns)[0] == "be brief " + qa_prompt(doc["question"])
    with pytest.raises(BadRequest, match="role 'tool'"):
        render_prompt(chat, [("tool", [("text", "x")])] + turns)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["llava_onevision", "qwen2_vl", "idefics3", "qwen3_vl", "qwen3_5", "internvl"])
def test_batched_decoding_and_scoring_equal_the_adapter_row_by_row(tiny_mllm, kind):
    """Rows with different kept tokens (so different lengths: real padding) and prompts, decoded
    together, give each row's own ``adapter.generate``; scored together, its ``option_logprobs``
    (Qwen3-VL: with each row's DeepStack features; Qwen3.5: its linear-attention cache)."""
    adapter = tiny_mllm(kind)
    h, w = adapter.frame_size
    rng = np.random.default_rng(0)
    enc = [adapter.encode_video_with_side(rng.integers(0, 256, (4, h, w, 3), dtype=np.uint8)) for _ in range(4)]
    Xs, sides = [x for x, _ in enc], [s for _, s in enc]
    M = Xs[0].shape[0] * Xs[0].shape[1]
    keeps = [torch.arange(M), torch.arange(0, M, 2), torch.tensor([1, M - 1]), torch.randperm(M)[: M // 3].sort().values]
    prompts = [qa_prompt("what color is the circle ?"), qa_prompt("which object appears first"),
               "<video> describe the video .", qa_prompt("what shape is it")]
    got = generate_batch(adapter, Xs, keeps, prompts, max_new_tokens=6, sides=sides)
    assert got == [adapter.generate(x, k, p, max_new_tokens=6, side=s) for x, k, p, s in zip(Xs, keeps, prompts, sides)]
    assert all(got)  # something was generated
    first = got[0].split()[0]
    assert generate_batch(adapter, Xs[:1], keeps[:1], prompts[:1], 6, until=[first], sides=sides[:1])[0] == ""
    options = ["red", "blue green", "circle", "left"]
    scored = loglikelihood_batch(adapter, Xs, keeps, prompts, options, sides=sides)
    ref = [float(adapter.option_logprobs(x, k, p, [o], side=s)[0]) for x, k, p, o, s in zip(Xs, keeps, prompts, options, sides)]
    assert np.allclose([s[0] for s in scored], ref, atol=1e-4) and all(isinstance(s[1], bool) for s in scored)


# ------------------------------------------------------------------------------------ assets
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A small static world, a tiny LLaVA-OV pre-trained on it for a few hundred steps (accuracy
    well off zero, so the cross-check compares real numbers), fresh policies of width 32 and 64."""
    from pipeline.config import PolicyConfig, ReferenceConfig, WorldConfig
    from pipeline.data.world import generate_world
    from pipeline.mllm.reference import pretrain
    from pipeline.trainer import init_policy

    root = tmp_path_factory.mktemp("lmms")
    wcfg = WorldConfig(images=0, videos=0, heldout_videos=12, frames=4, size=32, grid=2, object_size=0.375, jitter=0,
                       min_objects=1, max_objects=2, motion=["static"])
    generate_world(wcfg, root / "world", progress=False)
    rcfg = ReferenceConfig(hidden=32, layers=2, heads=2, vision_hidden=16, patch=8, steps=400, binding_steps=200,
                           tokens_per_batch=512, warmup=10, eval_every=10**6, min_qa_accuracy=0.0)
    pretrain(rcfg, wcfg, root / "mllm", progress=False)
    init_policy(32, PolicyConfig(hidden=32, layers=1, heads=2), seed=0).save_pretrained(root / "policy")
    init_policy(64, PolicyConfig(hidden=32, layers=1, heads=2), seed=0).save_pretrained(root / "policy64")
    return root


@pytest.mark.slow
def test_task_documents_follow_the_evaluation_order(assets, tmp_path):
    from pipeline.config import MLLMConfig
    from pipeline.evaluation import load_eval_videos
    from pipeline.lmms_eval_model import main as cli, task_file

    from pipeline.mllm.loader import load_mllm

    adapter = load_mllm(MLLMConfig(path=str(assets / "mllm")))
    videos = load_eval_videos(adapter, str(assets / "world" / "heldout" / "videos"), 100, 4, 32)
    docs = task_documents(assets / "world")
    assert [d["id"] for d in docs] == [v.id for v in videos] and len(docs) == 12
    assert all(d["question"] == v.qa["question"] and d["answer"] == v.qa["answer"] and d["options"] == v.qa["options"]
               for d, v in zip(docs, videos))
    assert all(Path(d["video"]).is_absolute() and Path(d["video"]).is_file() for d in docs)
    out = export_task(assets / "world", tmp_path / "t.jsonl", limit=5)
    assert [json.loads(line) for line in out.read_text().splitlines()] == docs[:5]
    f = task_file(assets / "world")  # exported next to the world, again only when stale
    assert f == (assets / "world" / "heldout" / "shapes_video_qa.jsonl").resolve() and len(f.read_text().splitlines()) == 12
    mtime = f.stat().st_mtime_ns
    assert task_file(assets / "world") == f and f.stat().st_mtime_ns == mtime
    assert cli(["export-task", str(assets / "world"), "--out", str(tmp_path / "c.jsonl")]) == 0
    with pytest.raises(SystemExit, match="no held-out videos"):
        cli(["export-task", str(tmp_path / "nowhere")])


# ------------------------------------------------------------------------------------ through lmms-eval
def _evaluate(assets, model_args: str, task: str, batch_size: int, simple: bool = False, limit: int | None = None):
    """One in-process lmms-eval run of ``--model score`` on the assets' world: ``(metric, per-doc responses)``."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    res = simple_evaluate(model="score", model_args=f"pretrained={assets / 'mllm'},num_frames=4,{model_args}",
                          tasks=[task], batch_size=batch_size, force_simple=simple, limit=limit, bootstrap_iters=0,
                          log_samples=True, verbosity="WARNING", task_manager=TaskManager(include_path=str(TASKS)),
                          random_seed=None, numpy_random_seed=None, torch_random_seed=None)  # leave global RNGs alone
    metric = "acc,none" if task.endswith("_mc") else "accuracy,none"
    return res["results"][task][metric], [s["resps"] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture
def lmms_env(assets, tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval", reason="lmms-eval not installed (`make test` installs it)")
    monkeypatch.setenv("SHAPES_WORLD", str(assets / "world"))
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    return assets


@needs_lmms_eval
@pytest.mark.unit
def test_model_is_registered_through_the_entry_point():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="lmms_eval.models")}
    assert eps.get("score") == "pipeline.lmms_eval_model:manifest"
    from lmms_eval.models import get_model

    from pipeline.lmms_eval_model import ScoreChat, ScoreSimple

    assert get_model("score") is ScoreChat and get_model("score", force_simple=True) is ScoreSimple
    with pytest.raises(NotImplementedError, match="multi-round"):
        ScoreChat.generate_until_multi_round(None, [])


@needs_lmms_eval
@pytest.mark.slow
def test_accuracy_under_lmms_eval_equals_evaluate_job(lmms_env, tmp_path):
    """Same videos, method, retention (and seed): the task's accuracy equals results.json's
    ``accuracy`` (greedy answer, chat model, batched) and, as multiple choice, its ``option_accuracy``."""
    assets = lmms_env
    sys.path.insert(0, str(ROOT / "jobs"))
    spec = importlib.util.spec_from_file_location("job_evaluate", ROOT / "jobs" / "evaluate.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    ev.main(["--mllm", str(assets / "mllm"), "--compressor", str(assets / "policy"), "--world", str(assets / "world"),
             "--retention", "0.25,0.5", "--out", str(tmp_path / "eval"), "--limit", "12", "--methods", "score,random,fastv",
             "--timing-videos", "1", "--timing-repeats", "1", "--no-overlays"])
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {(r["method"], r["retention"]): r for r in res["rows"]}
    checks = [("retention=1.0", res["full"])] + [
        (f"method={m},retention={r}" + (f",compressor={assets / 'policy'}" if m == "score" else ""), rows[(m, r)])
        for m, r in (("score", 0.25), ("random", 0.25), ("random", 0.5), ("fastv", 0.25))]
    accs = set()
    for args, row in checks:
        acc, _ = _evaluate(assets, args, "shapes_video_qa", batch_size=4)
        opt, _ = _evaluate(assets, args, "shapes_video_qa_mc", batch_size=4, simple=True)
        assert (acc, opt) == (row["accuracy"], row["option_accuracy"]), (args, acc, opt, row)
        accs.add(acc)
    assert len(accs) > 1 and max(accs) > 0  # the compared numbers are not all the same (or all zero)
    # the simple class answers the same generate_until task the same way
    assert _evaluate(assets, "method=random,retention=0.25", "shapes_video_qa", 3, simple=True)[0] == rows[("random", 0.25)]["accuracy"]


@needs_lmms_eval
@pytest.mark.slow
def test_batch_size_8_answers_as_batch_size_1(lmms_env):
    assets = lmms_env
    for args in (f"compressor={assets / 'policy'},retention=0.25", "method=random,retention=0.5"):
        acc1, one = _evaluate(assets, args, "shapes_video_qa", batch_size=1)
        acc8, eight = _evaluate(assets, args, "shapes_video_qa", batch_size=8)
        assert one == eight and acc1 == acc8 and len(one) == 12
    _, one = _evaluate(assets, "method=uniform,retention=0.25", "shapes_video_qa_mc", batch_size=1, simple=True)
    _, eight = _evaluate(assets, "method=uniform,retention=0.25", "shapes_video_qa_mc", batch_size=8, simple=True)
    lls1 = np.array([[r[0][0] for r in doc] for doc in one])
    lls8 = np.array([[r[0][0] for r in doc] for doc in eight])
    assert np.allclose(lls1, lls8, atol=1e-4) and (lls1.argmin(1) == lls8.argmin(1)).all()


@needs_lmms_eval
@pytest.mark.slow
def test_cli_runs_offline_and_prints_the_table(lmms_env, tmp_path):
    """The issue's command, as a user runs it: `python -m lmms_eval --model score ... --batch_size 8`
    with the hub and datasets offline."""
    assets = lmms_env
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "SHAPES_WORLD": str(assets / "world"),
           "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "score", "--model_args",
                        f"pretrained={assets / 'mllm'},compressor={assets / 'policy'},retention=0.25,num_frames=4",
                        "--tasks", "shapes_video_qa", "--include_path", str(TASKS), "--batch_size", "8",
                        "--output_path", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("|shapes_video_qa")]
    assert len(table) == 1 and "accuracy" in table[0], r.stdout[-2000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("*results*.json")]
    assert results and "accuracy,none" in results[0]["results"]["shapes_video_qa"]


@needs_lmms_eval
@pytest.mark.slow
def test_bad_input_one_clear_error_each(lmms_env, tmp_path):
    from pipeline.lmms_eval_model import ScoreChat, ScoreSimple

    assets = lmms_env
    mllm = str(assets / "mllm")
    with pytest.raises(ValueError, match=r"trained for 64-wide tokens.*embeds 32-wide tokens"):
        ScoreChat(pretrained=mllm, compressor=str(assets / "policy64"), retention=0.1)
    with pytest.raises(ValueError, match="method='tome' is not a known method"):
        ScoreChat(pretrained=mllm, method="tome", retention=0.1)
    for r in (0, 1.5, "x"):
        with pytest.raises(ValueError, match="retention="):
            ScoreChat(pretrained=mllm, method="uniform", retention=r)
    with pytest.raises(ValueError, match="method=score needs compressor"):
        ScoreChat(pretrained=mllm, method="score", retention=0.1)
    with pytest.raises(TypeError, match=r"unknown model_args \['frames'\]"):
        ScoreChat(pretrained=mllm, frames=8)
    with pytest.raises(FileNotFoundError, match="compressor="):
        ScoreChat(pretrained=mllm, compressor=str(tmp_path / "none"), retention=0.1)
    # a document without a video: the task names it; a request without one: the model names it
    lm = ScoreChat(pretrained=mllm, method="uniform", retention=0.5, num_frames=4)
    utils = _task_utils(export_task(assets / "world", tmp_path / "docs.jsonl"))
    lm.task_dict = {"t": {"test": [{"id": "nov", "question": "what ?"},
                                   {"id": "gone", "video": str(tmp_path / "gone.mp4"), "question": "what ?"}]}}
    req = SimpleNamespace(args=("", utils.doc_to_messages, {"max_new_tokens": 2}, 0, "t", "test"))
    with pytest.raises(ValueError, match="document 'nov' has no video"):
        lm.generate_until([req])
    text_only = SimpleNamespace(args=("", lambda doc: [{"role": "user", "content": [{"type": "text", "text": "q"}]}],
                                      {}, 0, "t", "test"))
    with pytest.raises(BadRequest, match=r"task 't' doc 0: the request has no video"):
        lm.generate_until([text_only])
    missing = SimpleNamespace(args=("", utils.doc_to_messages, {}, 1, "t", "test"))
    with pytest.raises(BadRequest, match="gone.mp4.*does not exist"):
        lm.generate_until([missing])
    folder = SimpleNamespace(args=("", lambda doc: [{"role": "user", "content": [{"type": "video", "url": str(tmp_path)}]}],
                                   {}, 0, "t", "test"))
    with pytest.raises(BadRequest, match="is a directory"):
        lm.generate_until([folder])
    # a frame list (images, no video) is read as the video of those frames
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(6)]
    as_frames = SimpleNamespace(args=("", lambda doc: [{"role": "user", "content": [
        *({"type": "image", "url": f} for f in frames), {"type": "text", "text": "question : what ? answer :"}]}],
        {"max_new_tokens": 2}, 0, "t", "test"))
    assert len(lm.generate_until([as_frames])) == 1
    simple = ScoreSimple(pretrained=mllm, method="uniform", retention=0.5, num_frames=4)
    with pytest.raises(BadRequest, match="unconditional"):
        simple.loglikelihood([SimpleNamespace(args=("", " red"))])


@needs_lmms_eval
@pytest.mark.slow
def test_checkpoints_from_s3(lmms_env, s3_env, tmp_path, monkeypatch):
    """``pretrained`` and ``compressor`` may be s3:// prefixes (downloaded once, then as local)."""
    from conftest import upload_dir

    from pipeline.lmms_eval_model import ScoreChat

    assets = lmms_env
    monkeypatch.chdir(tmp_path)  # the MLLM is downloaded under ./.cache/models
    mllm = upload_dir(assets / "mllm", "models", "tiny", s3_env)
    policy = upload_dir(assets / "policy", "models", "policy", s3_env)
    lm = ScoreChat(pretrained=mllm, compressor=policy, retention=0.25, num_frames=4)
    docs = task_documents(assets / "world")
    lm.task_dict = {"t": {"test": docs}}
    utils_msgs = lambda d: [{"role": "user", "content": [{"type": "video", "url": d["video"]},  # noqa: E731
                                                         {"type": "text", "text": f"question : {d['question']} answer :"}]}]
    out = lm.generate_until([SimpleNamespace(args=("", utils_msgs, {"max_new_tokens": 2}, i, "t", "test")) for i in range(3)])
    assert len(out) == 3 and lm.policy is not None and lm.method == "score"

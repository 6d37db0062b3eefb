"""QA evaluation of a frozen MLLM under a token selector and a retention ratio.

Accuracy is the exact match of the greedy answer (first generated word) with the reference;
option accuracy picks the multiple-choice option with the highest log-likelihood. Both use the
sample's primary question (``qa[0]``).

Videos may differ in length (``data.sampling: fps``): every video is selected, prefilled and
scored on its own (``K = ceil(r * T'*N)`` of its own ``T'``), so nothing is padded; the cost
columns of :func:`run_evaluation` are then means over the videos.
"""

from __future__ import annotations

import json
import time
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np
import torch

from pipeline.baselines import ORACLES, asked_share
from pipeline.select import SelectionContext, budget
from pipeline.data import readers
from pipeline.config import ConfigError
from pipeline.data.video import FrameSampling
from pipeline.data.prompts import qa_prompt
from pipeline.mllm.base import MLLMAdapter
from pipeline.metrics import sync


@dataclass
class EvalVideo:
    """A held-out video with its encoded tokens (encoded once, reused by every method)."""

    id: str
    X: torch.Tensor  # [T', N, D]
    qa: dict
    objects: list[dict]
    frame_hw: tuple[int, int]
    frames: Any = None  # the decoded frames, kept for the first keep_frames videos (timing, reencode)
    side: dict = field(default_factory=dict)  # the family's side features ([T', N, ...]; DeepStack)


def load_eval_videos(adapter: MLLMAdapter, video_root: str, limit: int, num_frames: int | FrameSampling, size: int,
                     max_words: int = 64, s3: Any = None, keep_frames: int = 0) -> list[EvalVideo]:
    """Decode (PyAV) and encode up to ``limit`` annotated videos from ``video_root``'s shards
    (local or ``s3://``, ``s3`` an :class:`~pipeline.config.S3Config`); ``num_frames``: an int
    (uniform) or a :class:`~pipeline.data.video.FrameSampling` (``fps``: each video its own
    length). The first ``keep_frames`` keep their decoded frames (:func:`time_deployed` encodes
    them again, as a deployment does)."""
    out: list[EvalVideo] = []
    for ann in readers.list_video_annotations(video_root, s3):
        for rec in readers.read_video_index(ann, s3):
            if isinstance(rec, Exception):
                raise rec
            qa = json.loads(rec["qa"])
            if not qa:
                continue
            v = readers.load_video(rec, num_frames, size, max_words, s3)
            X, side = adapter.encode_video_with_side(v["frames"])
            out.append(EvalVideo(rec["id"], X, qa[0], json.loads(rec["objects"]), tuple(rec["hw"] or (size, size)),
                                 v["frames"] if len(out) < keep_frames else None, side))
            if len(out) >= limit:
                return out
    return out


def reencode(adapter: MLLMAdapter, videos: list[EvalVideo]) -> list[EvalVideo]:
    """The same videos encoded by ``adapter``'s current weights (loaded with ``keep_frames``): a
    model still in training must not be scored on tokens its earlier vision tower made."""
    if any(v.frames is None for v in videos):
        raise ValueError("reencode needs the decoded frames: load the videos with keep_frames")
    out = []
    for v in videos:
        X, side = adapter.encode_video_with_side(v.frames)
        out.append(replace(v, X=X, side=side))
    return out


def video_context(adapter: MLLMAdapter, v: EvalVideo, seed: int = 0) -> SelectionContext:
    """The selection context of an eval video: grid, annotations (oracle), QA prompt and adapter (FastV)."""
    t = v.X.shape[0]
    grid = (t, *adapter.visual_grid(t)[1:])  # (gh, gw) do not depend on the frame count
    return SelectionContext(grid=grid, frame_hw=v.frame_hw, objects=v.objects, question_objects=v.qa.get("objects"),
                            seed=seed, prompt=qa_prompt(v.qa["question"]), adapter=adapter, side=v.side)


def answer_word(text: str) -> str:
    """The first word of a generated answer, without trailing punctuation ("green. a" -> "green")."""
    m = re.search(r"[\w-]+", text)
    return m.group(0).lower() if m else ""


@torch.no_grad()
def evaluate_qa(adapter: MLLMAdapter, videos: Iterable[EvalVideo],
                selector: Callable | None = None, retention: float = 1.0, seed: int = 0,
                options: bool = True) -> dict:
    """``{accuracy, option_accuracy, per_type: {type: accuracy}, n, asked_share, asked_n}`` with
    ``selector`` keeping ``ceil(retention * T'*N)`` tokens per video (``selector=None``: all tokens).
    ``asked_share``: the mean share of the kept tokens on the question's objects over the
    ``asked_n`` annotated videos where the question leaves some object out
    (:func:`pipeline.baselines.asked_share`; None without such videos or a selector).
    ``options=False`` skips the option scoring (``option_accuracy`` is then None)."""
    hits, opt_hits, per_type, shares = [], [], {}, []
    for i, v in enumerate(videos):
        t, n = v.X.shape[:2]
        if selector is None:
            keep = torch.arange(t * n)
        else:
            ctx = video_context(adapter, v, seed * 100_003 + i)
            keep = selector(v.X, budget(retention, t * n), ctx)
            share = asked_share(keep, ctx)
            if share is not None:
                shares.append(share)
        prompt = qa_prompt(v.qa["question"])
        ok = answer_word(adapter.generate(v.X, keep, prompt, max_new_tokens=2, side=v.side)) == v.qa["answer"]
        if options:
            opts = v.qa.get("options") or [v.qa["answer"]]
            lp = adapter.option_logprobs(v.X, keep, prompt, opts, side=v.side)
            opt_hits.append(opts[int(torch.argmax(lp))] == v.qa["answer"])
        hits.append(ok)
        per_type.setdefault(v.qa.get("type", "qa"), []).append(ok)
    return {
        "accuracy": float(np.mean(hits)) if hits else 0.0,
        "option_accuracy": (float(np.mean(opt_hits)) if opt_hits else 0.0) if options else None,
        "per_type": {k: round(float(np.mean(x)), 4) for k, x in sorted(per_type.items())},
        "n": len(hits),
        "asked_share": round(float(np.mean(shares)), 4) if shares else None,
        "asked_n": len(shares),
    }


# ------------------------------------------------------------------------------------------------
# Cost: analytic prefill FLOPs and measured wall time

def lm_dims(adapter: MLLMAdapter) -> dict:
    """``{params, layers, hidden}`` of the language model: non-embedding parameters (the LM head
    runs on one position at prefill and is left out), decoder layers, model width."""
    lm = adapter.language_model
    emb = {id(p) for p in adapter.embed_tokens.parameters()}
    params = sum(p.numel() for p in lm.parameters() if id(p) not in emb)
    cfg = getattr(lm, "config", None)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    if not layers:
        from pipeline.baselines import _decoder_layers

        layers = len(_decoder_layers(lm))
    return {"params": int(params), "layers": layers, "hidden": int(adapter.hidden_size)}


def prefill_flops(dims: dict, length: int) -> float:
    """Analytic prefill FLOPs for a sequence of ``length`` tokens: linear layers
    ``2 * params * L`` plus attention scores and mixing ``4 * L^2 * d * layers``."""
    return 2.0 * dims["params"] * length + 4.0 * length**2 * dims["hidden"] * dims["layers"]


def full_length(adapter: MLLMAdapter, v: EvalVideo) -> int:
    """Length of the unpruned prompt sequence of an eval video (text + all visual tokens + extras)."""
    return int(adapter._template(qa_prompt(v.qa["question"]), None, v.X.shape[0], v.X.shape[1]).ids.numel())


def deployed_rounds(adapter: MLLMAdapter, encode: Callable[[], Any],
                    select: Callable[[torch.Tensor], torch.Tensor] | None, prompt: str,
                    repeats: int = 5) -> dict[str, float]:
    """One video's cost in the order a deployment pays it: ``{select_s, prefill_s, full_prefill_s}``,
    medians over ``repeats`` rounds after one warm-up round.

    Each round runs ``[X = encode(); select(X); prefill with the kept tokens; X = encode(); prefill
    with all tokens]``: the selector sees the tokens the vision encoder has just produced and both
    prefills are timed in the same rounds (one clock, side by side). ``select=None`` keeps every
    token. ``encode`` returns ``X`` or ``(X, side)`` (:meth:`MLLMAdapter.encode_video_with_side`).
    On this CPU small work timed alone in a tight loop reads 2-3x faster than here, because
    its ops and data stay in cache between calls (EXPERIMENTS.md)."""
    rounds: list[tuple[float, float, float]] = []

    def encoded() -> tuple[torch.Tensor, dict]:
        out = encode()
        return out if isinstance(out, tuple) else (out, {})

    for rep in range(max(1, repeats) + 1):
        X, side = encoded()
        full = torch.arange(X.shape[0] * X.shape[1])
        sync(adapter.device)
        t0 = time.perf_counter()
        keep = full if select is None else select(X)
        sync(adapter.device)
        t1 = time.perf_counter()
        adapter.prefill(X, keep, prompt, side=side)
        sync(adapter.device)
        t2 = time.perf_counter()
        X, side = encoded()
        sync(adapter.device)
        t3 = time.perf_counter()
        adapter.prefill(X, full, prompt, side=side)
        sync(adapter.device)
        if rep:  # round 0 warms up
            rounds.append((t1 - t0, t2 - t1, time.perf_counter() - t3))
    return {key: float(np.median(col)) for key, col in zip(("select_s", "prefill_s", "full_prefill_s"), zip(*rounds))}


def time_deployed(adapter: MLLMAdapter, videos: list[EvalVideo], selector: Callable | None, retention: float,
                  seed: int = 0, repeats: int = 5) -> dict[str, float]:
    """A method's cost in the deployment order (:func:`deployed_rounds`), the mean over ``videos``:
    ``{select_s, prefill_s, full_prefill_s}``. A video with kept ``frames`` is encoded again every
    round, as a deployment does; otherwise its stored ``X`` is used. ``selector=None`` keeps every
    token."""
    out: dict[str, list[float]] = {"select_s": [], "prefill_s": [], "full_prefill_s": []}
    for i, v in enumerate(videos):
        ctx = video_context(adapter, v, seed * 100_003 + i)
        k = budget(retention, v.X.shape[0] * v.X.shape[1])

        def encoded(v: EvalVideo = v) -> tuple[torch.Tensor, dict]:
            return (v.X, v.side) if v.frames is None else adapter.encode_video_with_side(v.frames)

        select = None if selector is None else (lambda X, ctx=ctx, k=k: selector(X, k, ctx))
        for key, val in deployed_rounds(adapter, encoded, select, qa_prompt(v.qa["question"]), repeats).items():
            out[key].append(val)
    return {key: float(np.mean(col)) for key, col in out.items()}


# ------------------------------------------------------------------------------------------------
# Multi-method runner

BASELINE_ORDER = ("random", "uniform", "uniform_spatial", "fastv", "visionzip", "dycoke", "fastvid")


def method_selectors(adapter: MLLMAdapter, policy: torch.nn.Module | None = None, names: Iterable[str] | None = None,
                     fastv_layer: int = 2, min_per_frame: int = 0, compile_policy: bool = False) -> dict[str, Callable]:
    """Ordered ``{name: selector}``: ``score`` (needs ``policy``; ``compile_policy``: through
    ``torch.compile``), the baselines, the :data:`ORACLES`. ``names=None``: every available method
    (``score`` only with a policy)."""
    from pipeline.baselines import SELECTORS, make_fastv
    from pipeline.select import make_score_selector

    available = (["score"] if policy is not None else []) + list(BASELINE_ORDER) + list(ORACLES)
    want = list(available) if names is None else list(names)
    out: dict[str, Callable] = {}
    for name in want:
        if name == "score":
            if policy is None:
                raise ValueError("method 'score' needs a compressor (policy)")
            out[name] = make_score_selector(policy, min_per_frame=min_per_frame, compile=compile_policy)
        elif name == "fastv":
            out[name] = make_fastv(adapter, layer=fastv_layer)
        elif name in SELECTORS:
            out[name] = SELECTORS[name]
        else:
            raise ValueError(f"unknown method {name!r}; known: {['score', *BASELINE_ORDER, *ORACLES]}")
    return out


def selection_flops(name: str, selector: Callable, dims: dict, T: int, N: int, full_len: int,
                    policy: torch.nn.Module | None = None, words: int = 16) -> float | None:
    """Analytic FLOPs of a method's own selection step, where it is not negligible: a SCORE
    policy (:meth:`ScorePolicy.flops`; the selector's own, else ``policy`` for ``score``; a
    question-aware one reads ``words`` question words) and FastV (the first ``layer + 1`` decoder
    layers over the full sequence). X-only baselines: ``None`` (a few ``T*N*D`` or ``N^2*D`` per frame)."""
    pol = getattr(selector, "policy", None) or (policy if name == "score" else None)
    if pol is not None and hasattr(pol, "flops"):
        return float(pol.flops(T, N, words) if pol.cfg.question_aware else pol.flops(T, N))
    if name == "fastv":
        layer = max(0, min(int(getattr(selector, "layer", 2)), dims["layers"] - 1))
        return prefill_flops(dims, full_len) * (layer + 1) / dims["layers"]
    return None


def run_evaluation(adapter: MLLMAdapter, videos: list[EvalVideo], selectors: dict[str, Callable],
                   retentions: Iterable[float], *, policy: torch.nn.Module | None = None, seed: int = 0,
                   timing_videos: int = 4, timing_repeats: int = 5, log: Callable[[str], None] | None = None,
                   options: bool = True) -> dict:
    """Every method x retention on the same videos and the same K.

    Accuracy: :func:`evaluate_qa` (greedy exact match; also option accuracy) and its % of the
    full-token accuracy. Cost, on the first ``timing_videos`` videos, in the order a deployment pays
    it (:func:`time_deployed`): the method's own selection time (``select_ms``; for ``score`` the
    policy forward + top-K) and the LLM prefill wall time with its K kept tokens, each against the
    full-token prefill timed in the same rounds (``speedup``, ``select_pct_of_full_prefill_time``);
    and the method's analytic FLOPs share (``select_flops_pct``). FLOPs ratio:
    :func:`prefill_flops` at the kept vs the full sequence length. Returns
    ``{"full": {...}, "rows": [...], "setup": {...}}``."""
    say = log or (lambda _m: None)
    retentions = [float(r) for r in retentions]
    if not videos:
        raise ValueError("no evaluation videos")
    dims = lm_dims(adapter)
    v0 = videos[0]
    T, N = int(v0.X.shape[0]), int(v0.X.shape[1])
    M = T * N
    L_full = full_length(adapter, v0)
    timed = videos[: max(1, timing_videos)]
    steps = sorted({int(v.X.shape[0]) for v in videos})
    varied = len(steps) > 1  # videos of different T': K, lengths and FLOPs per video, then their means
    if varied:
        Ms = [int(v.X.shape[0] * v.X.shape[1]) for v in videos]
        Ls = [full_length(adapter, v) for v in videos]
        M, L_full = round(float(np.mean(Ms)), 2), int(round(float(np.mean(Ls))))

    t0 = time.perf_counter()
    full = evaluate_qa(adapter, videos, None, 1.0, seed=seed, options=options)
    words = 16  # a question-aware policy's L, for its FLOPs: measured only when one is evaluated
    if any(getattr(getattr(sel, "policy", None), "cfg", None) and sel.policy.cfg.question_aware for sel in selectors.values()):
        words = int(round(float(np.mean([adapter.question_embeddings(qa_prompt(v.qa["question"])).shape[0]
                                         for v in videos[:50]]))))
    full_prefill = time_deployed(adapter, timed, None, 1.0, seed, timing_repeats)["full_prefill_s"]
    full.update(prefill_ms=round(1e3 * full_prefill, 4), length=L_full,
                flops=float(np.mean([prefill_flops(dims, L) for L in Ls])) if varied else prefill_flops(dims, L_full),
                seconds=round(time.perf_counter() - t0, 2))
    say(f"full tokens: accuracy {full['accuracy']:.3f} (option {full['option_accuracy'] or float('nan'):.3f}), "
        f"prefill {1e3 * full_prefill:.2f} ms, L={L_full}")

    rows = []
    for name, sel in selectors.items():
        for r in retentions:
            t1 = time.perf_counter()
            acc = evaluate_qa(adapter, videos, sel, r, seed=seed, options=options)
            cost = time_deployed(adapter, timed, sel, r, seed, timing_repeats)
            select_s, pre, full_s = cost["select_s"], cost["prefill_s"], cost["full_prefill_s"]
            if varied:
                ks = [budget(r, m) for m in Ms]
                k = round(float(np.mean(ks)), 2)
                flops_ratio = float(np.mean([prefill_flops(dims, L - (m - kk)) / prefill_flops(dims, L)
                                             for L, m, kk in zip(Ls, Ms, ks)]))
                per = [selection_flops(name, sel, dims, int(v.X.shape[0]), N, L, policy, words) for v, L in zip(videos, Ls)]
                sflops_pct = None if per[0] is None else float(np.mean(
                    [100.0 * f / prefill_flops(dims, L) for f, L in zip(per, Ls)]))
            else:
                k = budget(r, M)
                L_kept = L_full - (M - k)
                flops_ratio = prefill_flops(dims, L_kept) / prefill_flops(dims, L_full)
                sflops = selection_flops(name, sel, dims, T, N, L_full, policy, words)
                sflops_pct = None if sflops is None else 100.0 * sflops / prefill_flops(dims, L_full)
            row = {
                "method": name, "retention": r, "k": k, "tokens": M,
                "accuracy": acc["accuracy"], "option_accuracy": acc["option_accuracy"],
                "pct_of_full": round(100.0 * acc["accuracy"] / full["accuracy"], 2) if full["accuracy"] > 0 else None,
                "per_type": acc["per_type"], "n": acc["n"], "asked_share": acc["asked_share"],
                "prefill_ms": round(1e3 * pre, 4), "full_prefill_ms": round(1e3 * full_s, 4),
                "speedup": round(full_s / pre, 3) if pre > 0 else None,
                "flops_ratio": round(flops_ratio, 5),
                "select_ms": round(1e3 * select_s, 4),
                "select_pct_of_full_prefill_time": round(100.0 * select_s / full_s, 3),
                "select_flops_pct": None if sflops_pct is None else round(sflops_pct, 4),
                "speedup_with_select": round(full_s / (pre + select_s), 3),
                "seconds": round(time.perf_counter() - t1, 2),
            }
            rows.append(row)
            say(f"{name:>15} r={r:<5g} acc {row['accuracy']:.3f} ({row['pct_of_full']}% of full)  "
                f"prefill {row['prefill_ms']:.2f} ms (x{row['speedup']})  select {row['select_ms']:.2f} ms")
    setup = {"videos": len(videos), "grid": [T, *adapter.visual_grid(T)[1:]], "tokens_per_video": M,
             "full_length": L_full, "lm": dims, "timing_videos": len(timed), "timing_repeats": timing_repeats,
             "device": str(adapter.device), "dtype": str(adapter.dtype).replace("torch.", ""),
             "torch_threads": torch.get_num_threads(), **({"steps": steps} if varied else {})}
    return {"full": full, "rows": rows, "setup": setup}


def parse_retentions(text: str) -> list[float]:
    try:
        rs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--retention {text!r}: give comma-separated ratios, e.g. 0.05,0.1,0.25") from None
    if not rs or any(not 0.0 < r <= 1.0 for r in rs):
        raise ConfigError(f"--retention {text!r}: every ratio must be in (0, 1]")
    return sorted(set(rs))


def results_markdown(results: dict) -> str:
    """The runner's result as a markdown table (one row per method x retention)."""
    full = results["full"]
    head = ("| method | retention | K | accuracy | % of full | option acc. | prefill ms | speedup | FLOPs ratio "
            "| select ms | select % of full prefill (time / FLOPs) |")
    def opt(a: float | None) -> str:
        return "-" if a is None else f"{a:.3f}"

    lines = [head, "|" + "---|" * 11,
             f"| full | 100% | {results['setup']['tokens_per_video']} | {full['accuracy']:.3f} | 100.0 | "
             f"{opt(full['option_accuracy'])} | {full['prefill_ms']:.2f} | 1.00 | 1.000 | - | - |"]
    for row in results["rows"]:
        fl = "-" if row["select_flops_pct"] is None else f"{row['select_flops_pct']:.2f}%"
        pct = "-" if row["pct_of_full"] is None else f"{row['pct_of_full']:.1f}"
        lines.append(
            f"| {row['method']} | {row['retention']:.0%} | {row['k']} | {row['accuracy']:.3f} | {pct} | "
            f"{opt(row['option_accuracy'])} | {row['prefill_ms']:.2f} | {row['speedup']:.2f} | {row['flops_ratio']:.3f} | "
            f"{row['select_ms']:.2f} | {row['select_pct_of_full_prefill_time']:.1f}% / {fl} |")
    return "\n".join(lines)


def eval_summary(res: dict[str, Any], methods: list[str], retentions: list[float]) -> dict[str, Any]:
    """The figures of an evaluation's JSON line: accuracy and % of full per method and retention,
    speedup and FLOPs ratio per retention and, with SCORE, its overhead and whether it is ahead of
    every baseline."""
    acc = {m: {str(r): None for r in retentions} for m in methods}
    pct = {m: {str(r): None for r in retentions} for m in methods}
    for row in res["rows"]:
        acc[row["method"]][str(row["retention"])] = row["accuracy"]
        pct[row["method"]][str(row["retention"])] = row["pct_of_full"]
    first = {r: next(row for row in res["rows"] if row["retention"] == r) for r in retentions}
    summary = {
        "full_accuracy": res["full"]["accuracy"], "accuracy": acc, "pct_of_full": pct,
        "speedup": {str(r): first[r]["speedup"] for r in retentions},
        "flops_ratio": {str(r): first[r]["flops_ratio"] for r in retentions},
    }
    if "score" in methods:
        srows = [row for row in res["rows"] if row["method"] == "score"]
        summary["policy_overhead"] = {"time_pct": max(row["select_pct_of_full_prefill_time"] for row in srows),
                                      "flops_pct": srows[0]["select_flops_pct"]}
        base = [m for m in methods if m != "score" and m not in ORACLES]
        summary["score_ahead_of_baselines"] = {
            str(r): all(acc["score"][str(r)] > acc[m][str(r)] for m in base) for r in retentions}
    return summary

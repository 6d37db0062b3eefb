"""The trained SCORE compressor inside vLLM: a ``vllm.general_plugins`` entry point.

Turned on by the environment of the process that starts vLLM (vLLM's own processes inherit it)::

    SCORE_COMPRESSOR=runs/score-demo/final/policy   # a ScorePolicy.save_pretrained folder
    SCORE_RETENTION=0.1                             # optional: (0, 1], default 0.1
    SCORE_MIN_PER_FRAME=2                           # optional: default the compressor's own setting

The retention can instead be given as vLLM's own setting, ``--video-pruning-rate 0.9`` (=
``1 - retention``); given both ways, they must agree. Without ``SCORE_COMPRESSOR`` the plugin
changes nothing (vLLM's EVS still runs when ``--video-pruning-rate`` is set).

How it hooks in: vLLM's video pruning (EVS, ``vllm/multimodal/video_prune/evs.py``) is a
pair of functions that the Qwen model modules import by name: a count (how many placeholder
tokens the front-end processor writes for a video) and a retention mask over the video's
post-merger embeddings (run by the model in the engine). The plugin replaces both names in the
supported model modules, in every vLLM process:

* count: ``K = ceil(r * T' * N)`` (:func:`pipeline.select.budget`, ``r = 1 - pruning rate``);
* mask: the policy's keep logits on ``X = embeddings.reshape(T', N, D)`` (exactly the ``X`` the
  project's adapters produce) and the deterministic global top-K of
  :func:`pipeline.select.topk_keep`, in original order.

Everything after the mask is vLLM's own pruning path: kept embeddings carry their original
``(t, h, w)`` M-RoPE ids, and the text after the video is re-positioned by the model's
``recompute_mrope_positions``. With SCORE off, both functions are vLLM's EVS ones.

Checked at engine start (``EngineArgs.create_engine_config``, before any weights load; one
ValueError naming the problem): the compressor folder, the retention, the model family
(:data:`SUPPORTED`) and the compressor's width against the served model's.

Two upstream bugs are worked around here (docs/serving.md): on the CPU backend
``CPUModelRunner.load_model`` never sets ``is_multimodal_pruning_enabled`` (EVS crashes with
"shape mismatch: value tensor of shape [K, D + 4]"): :func:`_patch_cpu_runner`; Qwen3-VL chat
prompts keep an extra vision start/end pair around the video (reported to break pruning's
positions, "Target sizes: [3, 0]"): :func:`_patch_qwen3_wrappers`.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from pipeline.select import budget, topk_keep

logger = logging.getLogger("vllm.score")  # under vLLM's logger: its handlers print it

ENV_COMPRESSOR = "SCORE_COMPRESSOR"
ENV_RETENTION = "SCORE_RETENTION"
ENV_MIN_PER_FRAME = "SCORE_MIN_PER_FRAME"
DEFAULT_RETENTION = 0.1

#: served architectures -> the vLLM module whose pruning names the plugin replaces
SUPPORTED: dict[str, str] = {
    "Qwen2_5_VLForConditionalGeneration": "vllm.model_executor.models.qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "vllm.model_executor.models.qwen3_vl",
}

#: the last selections made in this process: ``{grid: (T', gh, gw), k, keep, policy_s}`` (tests,
#: benchmark; the engine's process: the caller's own with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
selections: deque[dict[str, Any]] = deque(maxlen=256)

_ORIGINAL: dict[str, Any] = {}  # name -> vLLM's own function


@dataclass(frozen=True)
class Settings:
    compressor: str
    retention: float | None  # None: not given in the environment
    min_per_frame: int | None  # None: the compressor's own setting


def settings() -> Settings | None:
    """The SCORE settings of this process's environment; None when SCORE is off. A bad value is a
    ValueError naming the variable."""
    path = os.environ.get(ENV_COMPRESSOR, "").strip()
    if not path:
        return None
    retention = None
    raw = os.environ.get(ENV_RETENTION, "").strip()
    if raw:
        try:
            retention = float(raw)
        except ValueError:
            raise ValueError(f"{ENV_RETENTION}={raw!r} is not a number; it must be in (0, 1]") from None
        if not 0.0 < retention <= 1.0:
            raise ValueError(f"{ENV_RETENTION}={raw} is outside (0, 1]: the share of each video's tokens to keep")
    mpf = None
    raw = os.environ.get(ENV_MIN_PER_FRAME, "").strip()
    if raw:
        if not raw.isdigit():
            raise ValueError(f"{ENV_MIN_PER_FRAME}={raw!r} must be a non-negative integer")
        mpf = int(raw)
    return Settings(path, retention, mpf)


def retention_of(pruning_rate: float) -> float:
    """vLLM's pruning rate ``q`` -> the retention ``r = 1 - q`` (rounded off float noise, so
    ``r = 0.1`` -> ``q = 0.9`` -> ``r = 0.1`` again)."""
    return round(1.0 - float(pruning_rate), 12)


@lru_cache(maxsize=4)
def load_policy(path: str, device: str = "cpu"):
    """The compressor at ``path`` in eval mode on ``device`` (cached: one load per process)."""
    from pipeline.policy import ScorePolicy

    if not Path(path).is_dir():
        raise ValueError(f"{ENV_COMPRESSOR}={path!r} is not a directory (a ScorePolicy.save_pretrained folder)")
    try:
        policy = ScorePolicy.from_pretrained(path, map_location=device)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{ENV_COMPRESSOR}={path!r} is not a SCORE compressor: {type(e).__name__}: {e}") from e
    return policy.eval()


# --------------------------------------------------------------------------- the two replaced names
def retained_tokens_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    """Placeholder tokens for a video of ``num_frames`` temporal steps x ``tokens_per_frame``:
    ``ceil(r * T' * N)`` with SCORE on, vLLM's EVS count otherwise (same signature)."""
    if settings() is None:
        return _ORIGINAL["compute_retained_tokens_count"](tokens_per_frame, num_frames, q)
    return budget(retention_of(q), int(tokens_per_frame) * int(num_frames))


def retention_mask(video_embeds: torch.Tensor, video_size_thw, spatial_merge_size: int, q: float) -> torch.Tensor:
    """Bool mask ``[T'*N]`` over one video's post-merger embeddings ``[T'*N, D(+levels*D)]`` (row-major
    ``t, row, col``; Qwen3-VL appends its DeepStack levels after the ``D`` channels of ``X``): the
    SCORE policy's top-K of ``X`` with SCORE on, vLLM's EVS mask otherwise."""
    s = settings()
    if s is None:
        return _ORIGINAL["compute_retention_mask"](video_embeds, video_size_thw, spatial_merge_size, q)
    t, h, w = (int(v) for v in video_size_thw)
    gh, gw = h // spatial_merge_size, w // spatial_merge_size
    m = t * gh * gw
    policy = load_policy(s.compressor, str(video_embeds.device))
    d = policy.embed_dim
    if video_embeds.shape[-1] % d:
        raise ValueError(f"video embeddings {video_embeds.shape[-1]} wide do not start with the compressor's {d}-wide tokens")
    # the merger's output comes first; Qwen3-VL's DeepStack levels follow it in the same rows
    X = video_embeds[:, :d].reshape(t, gh * gw, d)
    k = budget(retention_of(q), m)
    mpf = policy.cfg.min_per_frame if s.min_per_frame is None else s.min_per_frame
    t0 = time.perf_counter()
    with torch.inference_mode():
        z = policy(X, (gh, gw))
        keep = topk_keep(z, k=k, grid=(t, gh, gw), min_per_frame=mpf)
    if video_embeds.is_cuda:
        torch.cuda.synchronize(video_embeds.device)
    mask = torch.zeros(m, dtype=torch.bool, device=video_embeds.device)
    mask[keep] = True
    selections.append({"grid": (t, gh, gw), "k": k, "keep": keep.tolist(), "policy_s": time.perf_counter() - t0})
    return mask


# --------------------------------------------------------------------------- engine-start checks
def check_engine(vllm_config: Any, s: Settings) -> None:
    """Family and width of the served model against the compressor (ValueError naming both)."""
    mc = vllm_config.model_config
    archs = list(getattr(mc, "architectures", None) or [])
    if not any(a in SUPPORTED for a in archs):
        raise ValueError(
            f"SCORE compressor ({ENV_COMPRESSOR}) on an unsupported model: {mc.model} is {archs or 'unknown'}; "
            f"the plugin supports {', '.join(sorted(SUPPORTED))}"
        )
    width = int(mc.hf_config.get_text_config().hidden_size)
    policy = load_policy(s.compressor)
    if getattr(policy.cfg, "question_aware", False):
        # vLLM prunes in the vision path, per video, before the prompt's words reach the model
        raise ValueError(f"SCORE compressor {s.compressor} is question-aware (policy.question_aware): vLLM prunes each "
                         "video before its question is read; serve a question-agnostic compressor")
    if policy.embed_dim != width:
        raise ValueError(
            f"SCORE compressor {s.compressor} reads {policy.embed_dim}-wide tokens, but {mc.model} embeds "
            f"video tokens {width} wide: train or pick a compressor for this model"
        )


def _patch_engine_args() -> None:
    """Resolve and check the settings where vLLM builds its config (the front-end process): the
    retention becomes vLLM's ``video_pruning_rate``, so the processor and the model prune."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_score", False):
        return

    def create_engine_config(self, *args, **kwargs):
        s = settings()
        if s is not None:
            given = getattr(self, "video_pruning_rate", None)
            if s.retention is not None:
                rate = round(1.0 - s.retention, 12)
                if given not in (None, 0.0) and abs(given - rate) > 1e-9:
                    raise ValueError(
                        f"{ENV_RETENTION}={s.retention} and --video-pruning-rate {given} disagree "
                        f"(the pruning rate is 1 - retention = {rate}); give one of them"
                    )
            else:
                rate = given if given not in (None, 0.0) else round(1.0 - DEFAULT_RETENTION, 12)
            self.video_pruning_rate = rate if rate > 0.0 else None  # retention 1: keep every token
        config = original(self, *args, **kwargs)
        if s is not None:
            check_engine(config, s)
            mc = config.model_config.multimodal_config
            rate = mc.video_pruning_rate if mc is not None else None
            r = 1.0 if not rate else retention_of(rate)
            logger.info("SCORE compressor %s keeps ceil(%g * T' * N) tokens of each video", s.compressor, r)
        return config

    create_engine_config._score = True
    EngineArgs.create_engine_config = create_engine_config


def _patch_cpu_runner() -> None:
    """Upstream bug: ``CPUModelRunner.load_model`` (a subclass of the GPU runner) skips the lines
    of ``GPUModelRunner.load_model`` that set ``is_multimodal_pruning_enabled``, so on the CPU the
    pruned embeddings keep their 4 extra M-RoPE channels and the engine crashes ("shape mismatch:
    value tensor of shape [K, D + 4]"). Set it as the GPU runner does, after the model loads."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.load_model
    if getattr(original, "_score", False):
        return

    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        mm = self.model_config.multimodal_config
        if not getattr(self, "is_multimodal_pruning_enabled", False):
            self.is_multimodal_pruning_enabled = bool(
                supports_multimodal_pruning(self.get_model()) and mm is not None and mm.is_multimodal_pruning_enabled()
            )

    load_model._score = True
    CPUModelRunner.load_model = load_model


def collapse_video_wrappers(ids: list[int], start: int, pad: int, end: int) -> list[int]:
    """``[start, pad, end]`` -> ``[pad]`` everywhere in ``ids``: what transformers >= 5.20's
    Qwen3-VL processor does to the chat template's video triple before writing its per-frame
    ``<t seconds><|vision_start|> ... <|vision_end|>`` layout (the project's adapters follow it)."""
    out: list[int] = []
    i = 0
    while i < len(ids):
        if ids[i] == start and ids[i + 1 : i + 3] == [pad, end]:
            out.append(pad)
            i += 3
        else:
            out.append(ids[i])
            i += 1
    return out


def _patch_qwen3_wrappers() -> None:
    """Upstream bug 2 (docs/serving.md): vLLM's Qwen3-VL processor under transformers 5.10-5.19
    expands only the bare video token, so a chat prompt keeps an extra ``<|vision_start|>`` /
    ``<|vision_end|>`` pair around the per-frame layout, which pruning's
    ``recompute_mrope_positions`` was reported to fail on ("Target sizes: [3, 0]"). With pruning on
    (EVS or SCORE), collapse that outer pair first, as transformers >= 5.20 does (the project's
    layout). Pruning off: untouched."""
    from vllm.model_executor.models import qwen3_vl

    cls = qwen3_vl.Qwen3VLMultiModalProcessor
    original = cls._apply_prompt_updates
    if getattr(original, "_score", False):
        return

    def _apply_prompt_updates(self, token_ids, mm_prompt_updates):
        mm = self.info.ctx.get_mm_config()
        if mm is not None and mm.is_multimodal_pruning_enabled() and self._expands_only_video_token(self.info.get_hf_processor()):
            cfg = self.info.get_hf_config()
            token_ids = collapse_video_wrappers(list(token_ids), cfg.vision_start_token_id, cfg.video_token_id,
                                                cfg.vision_end_token_id)
        return original(self, token_ids, mm_prompt_updates)

    _apply_prompt_updates._score = True
    cls._apply_prompt_updates = _apply_prompt_updates


def _patch_models() -> None:
    """Replace the pruning names in every supported model module (kept: vLLM's own, for SCORE off)."""
    from vllm.multimodal.video_prune import evs

    _ORIGINAL.setdefault("compute_retained_tokens_count", evs.compute_retained_tokens_count)
    _ORIGINAL.setdefault("compute_retention_mask", evs.compute_retention_mask)
    for module in sorted(set(SUPPORTED.values())):
        mod = importlib.import_module(module)
        mod.compute_retained_tokens_count = retained_tokens_count
        mod.compute_retention_mask = retention_mask


def register() -> None:
    """The ``vllm.general_plugins`` entry point: runs once in every vLLM process."""
    _patch_engine_args()
    _patch_cpu_runner()
    _patch_models()
    _patch_qwen3_wrappers()

"""Load a frozen MLLM from a local directory or an ``s3://`` prefix in ``save_pretrained`` layout.

The directory needs ``config.json`` (with ``MLLMConfig.kind == "auto"`` its ``model_type`` picks
the family, ``pipeline/mllm/registry.py``), the weights (``*.safetensors`` or
``pytorch_model*.bin``) and the tokenizer files; ``preprocessor_config.json`` / ``video_preprocessor_config.json`` are optional
(mean/std and, for Qwen, a fixed ``size.height/width``). No hub access: everything is local.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, ConfigError, MLLMConfig, S3Config
from pipeline.mllm import registry
from pipeline.mllm.base import MLLMAdapter

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inspect_model_dir(path: str | Path) -> tuple[str, str]:
    """``(kind, model_type)`` of a model directory, or a ValueError that names the directory
    and what was found there."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"MLLM directory {str(d)!r} does not exist")
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        found = sorted(p.name for p in d.iterdir())[:12]
        raise ValueError(
            f"{str(d)!r} is not a model directory in save_pretrained layout: no config.json "
            f"(found: {found or 'nothing'})"
        )
    cfg = _read_config(cfg_file)
    model_type = cfg.get("model_type")
    fam = registry.for_model_type(model_type)
    if fam is None:
        arch = cfg.get("architectures")
        raise ValueError(
            f"{str(d)!r} is not a supported multimodal LLM: config.json has model_type={model_type!r}"
            f"{f', architectures={arch}' if arch else ''}; supported model types: {registry.model_types()}"
        )
    return fam.kind, model_type


def check_model_dir(cfg: Config) -> None:
    """What a stage can check of a local MLLM before any Ray work (``s3://`` models are checked
    when an actor loads them), each a one-line error: the class is supported
    (:func:`inspect_model_dir`), the family accepts its config (``adapter.check_config``, e.g.
    Qwen3-VL's DeepStack layers), and every frame count the stage streams is a multiple of the
    temporal patch (``vision_config.temporal_patch_size``, 2 for the Qwen families: their
    processor would repeat the last frame to fill a step, a pseudo-video step would mix two
    images, and the Qwen3 timestamps of the padded step would not be the processor's). With
    ``data.sampling: fps`` the counts vary per video: ``data.frame_multiple`` (when set) must be a
    multiple of the temporal patch, and ``min_frames``/``max_frames`` must leave a count."""
    from pipeline import storage
    from pipeline.data.video import FrameSampling

    if storage.is_s3(cfg.mllm.path):
        return
    kind, _ = inspect_model_dir(cfg.mllm.path)
    config = _read_config(Path(cfg.mllm.path) / "config.json")
    registry.family(kind).adapter.check_config(config)
    tp = _temporal_patch(config)
    counts = {"data.pseudo_repeat": cfg.data.pseudo_repeat}
    if cfg.data.sampling == "uniform":
        counts["data.video_frames"] = cfg.data.video_frames
    elif cfg.data.frame_multiple:
        counts["data.frame_multiple"] = cfg.data.frame_multiple
    for name, n in counts.items():
        if n % tp:
            raise ConfigError(f"{name}={n}: {cfg.mllm.path} merges every {tp} frames into one token step; "
                              f"use a multiple of {tp}")
    try:
        FrameSampling.from_config(cfg.data, tp)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None


def _temporal_patch(config: dict) -> int:
    """Frames the vision tower merges into one token step (``vision_config.temporal_patch_size``; 1 without)."""
    vision = config.get("vision_config") or {}
    return int(vision.get("temporal_patch_size") or 1)


def temporal_patch(path: str, s3: S3Config | None = None) -> int:
    """:func:`_temporal_patch` of the model at ``path`` (local or ``s3://``: its config.json only)."""
    from pipeline import storage

    if storage.is_s3(path):
        return _temporal_patch(json.loads(storage.read_bytes(storage.join(path, "config.json"), s3)))
    return _temporal_patch(_read_config(Path(path) / "config.json"))


def resolve_frame_multiple(cfg: Config) -> Config:
    """``cfg`` with ``data.frame_multiple`` set to the MLLM's temporal patch when it is 0 (auto), so
    the Ray Data tasks, which never load the model, sample frame counts the model can merge."""
    if cfg.data.sampling != "fps" or cfg.data.frame_multiple:
        return cfg
    data = cfg.data.model_copy(update={"frame_multiple": temporal_patch(cfg.mllm.path, cfg.data.s3)})
    return cfg.model_copy(update={"data": data})


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e


def _weights_present(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or any(d.glob("pytorch_model*.bin"))


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_mllm(
    cfg: MLLMConfig,
    cache_dir: str | Path = ".cache/models",
    *,
    s3: S3Config | None = None,
    device: str | torch.device | None = None,
    **adapter_kwargs: Any,
) -> MLLMAdapter:
    """Load ``cfg.path`` (local dir or ``s3://`` prefix, downloaded once into ``cache_dir``) as a
    frozen adapter. ``cfg.kind="auto"`` reads ``model_type`` from ``config.json``. ``dtype`` and
    ``attn_implementation`` come from ``cfg`` (``flash_attention_2`` falls back to ``sdpa`` without
    CUDA). Extra keyword arguments go to the adapter (e.g. ``frame_size``/``fps`` for Qwen)."""
    from transformers import AutoTokenizer

    from pipeline.storage import localize

    local = localize(cfg.path, cache_dir, s3)
    kind, model_type = inspect_model_dir(local)
    if cfg.kind != "auto" and cfg.kind != kind:
        raise ValueError(f"mllm.kind={cfg.kind!r} but {str(local)!r} holds a {model_type!r} model (kind {kind!r})")
    if not _weights_present(local):
        raise ValueError(f"{str(local)!r} has a config.json ({model_type}) but no weights (*.safetensors / pytorch_model*.bin)")
    dev = torch.device(device) if device is not None else default_device()
    attn = cfg.attn_implementation
    if attn == "flash_attention_2" and dev.type != "cuda":
        log.warning("flash_attention_2 needs CUDA; using sdpa on %s", dev)
        attn = "sdpa"
    fam = registry.family(kind)
    model_cls = fam.model_class(model_type)
    try:
        model = model_cls.from_pretrained(str(local), dtype=_DTYPES[cfg.dtype], attn_implementation=attn)
    except ValueError as e:
        if attn == "eager" or "attn" not in str(e).lower() and "attention" not in str(e).lower():
            raise
        log.warning("%s does not support attn_implementation=%s (%s); using eager", model_cls.__name__, attn, e)
        model = model_cls.from_pretrained(str(local), dtype=_DTYPES[cfg.dtype], attn_implementation="eager")
    model.to(dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{str(local)!r}: cannot load the tokenizer ({e})") from e
    return fam.adapter(
        model,
        tokenizer,
        processor_dir=local,
        compact_positions=cfg.compact_positions,
        chat_template=cfg.chat_template,
        **adapter_kwargs,
    )


def adapter_for(model: torch.nn.Module, tokenizer: Any, **kwargs: Any) -> MLLMAdapter:
    """Wrap an already built model (e.g. a freshly built tiny one) in the adapter for its class."""
    model_type = getattr(model.config, "model_type", None)
    fam = registry.for_model_type(model_type)
    if fam is None:
        raise ValueError(f"no adapter for model_type={model_type!r}; supported: {registry.model_types()}")
    return fam.adapter(model, tokenizer, **kwargs)

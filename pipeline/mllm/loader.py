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

from pipeline.config import MLLMConfig, S3Config
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
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ValueError(f"{str(cfg_file)!r} is not valid JSON: {e}") from e
    model_type = cfg.get("model_type")
    fam = registry.for_model_type(model_type)
    if fam is None:
        arch = cfg.get("architectures")
        raise ValueError(
            f"{str(d)!r} is not a supported multimodal LLM: config.json has model_type={model_type!r}"
            f"{f', architectures={arch}' if arch else ''}; supported model types: {registry.model_types()}"
        )
    return fam.kind, model_type


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
        **adapter_kwargs,
    )


def adapter_for(model: torch.nn.Module, tokenizer: Any, **kwargs: Any) -> MLLMAdapter:
    """Wrap an already built model (e.g. a freshly built tiny one) in the adapter for its class."""
    model_type = getattr(model.config, "model_type", None)
    fam = registry.for_model_type(model_type)
    if fam is None:
        raise ValueError(f"no adapter for model_type={model_type!r}; supported: {registry.model_types()}")
    return fam.adapter(model, tokenizer, **kwargs)

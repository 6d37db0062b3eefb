"""Frozen multimodal LLMs behind one small interface (DESIGN.md section 3).

``MLLMAdapter`` (base.py) with adapters for LLaVA-OneVision, Qwen2-VL / Qwen2.5-VL and
SmolVLM / Idefics3; ``load_mllm(cfg)`` loads one from a local directory or ``s3://`` prefix;
``build_word_tokenizer`` makes the word-level tokenizer of the project's tiny models;
``smollm2.build_smolvlm`` assembles the optional real-weights SmolVLM-class model.
Names are imported lazily so that ``import pipeline.mllm`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MLLMAdapter": "pipeline.mllm.base",
    "PrefillOutput": "pipeline.mllm.base",
    "MaskedBatch": "pipeline.mllm.base",
    "VIDEO_PLACEHOLDER": "pipeline.mllm.base",
    "LlavaOnevisionAdapter": "pipeline.mllm.llava_onevision",
    "Qwen2VLAdapter": "pipeline.mllm.qwen2_vl",
    "Qwen25VLAdapter": "pipeline.mllm.qwen2_vl",
    "Idefics3Adapter": "pipeline.mllm.idefics3",
    "load_mllm": "pipeline.mllm.loader",
    "adapter_for": "pipeline.mllm.loader",
    "inspect_model_dir": "pipeline.mllm.loader",
    "build_word_tokenizer": "pipeline.mllm.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.mllm' has no attribute {name!r}")

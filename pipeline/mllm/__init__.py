"""Frozen multimodal LLMs behind one small interface.

``MLLMAdapter`` (base.py) and one file per model family (LLaVA-OneVision, Qwen2-VL /
Qwen2.5-VL, SmolVLM / Idefics3), each registered in ``registry.py``; ``load_mllm(cfg)`` loads one
from a local directory or ``s3://`` prefix; ``build_word_tokenizer`` makes the word-level
tokenizer of the project's tiny models; ``smollm2.build_smolvlm`` assembles the optional
real-weights SmolVLM-class model. Names are imported lazily so that ``import pipeline.mllm``
stays cheap; a registered adapter class is reachable by its name (``pipeline.mllm.Qwen2VLAdapter``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MLLMAdapter": "pipeline.mllm.base",
    "PrefillOutput": "pipeline.mllm.base",
    "MaskedBatch": "pipeline.mllm.base",
    "VIDEO_PLACEHOLDER": "pipeline.mllm.base",
    "load_mllm": "pipeline.mllm.loader",
    "adapter_for": "pipeline.mllm.loader",
    "inspect_model_dir": "pipeline.mllm.loader",
    "build_word_tokenizer": "pipeline.mllm.tokenizer",
    "register": "pipeline.mllm.registry",
    "families": "pipeline.mllm.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name.endswith("Adapter"):
        from pipeline.mllm.registry import families

        for fam in families().values():
            if fam.adapter.__name__ == name:
                return fam.adapter
    raise AttributeError(f"module 'pipeline.mllm' has no attribute {name!r}")

"""The MLLM families, one registration each: the loader, the config and the tests read them here.

A family is one file, ``pipeline/mllm/<family>.py``, whose adapter class carries :func:`register`::

    @register("qwen2_vl", models={"qwen2_vl": "Qwen2VLForConditionalGeneration"},
              tiny=_tiny, processor_inputs=_processor_inputs, tiny_adapter_kwargs={"frame_size": (16, 24)})
    class Qwen2VLAdapter(MLLMAdapter): ...

* ``kind``: the ``mllm.kind`` name (``MLLMConfig.kind`` accepts the registered kinds and ``auto``).
* ``models``: ``config.json`` ``model_type`` -> the ``transformers`` class that loads such a
  checkpoint (``from_pretrained``) or builds a model from its config; ``mllm.kind: auto`` resolves
  a ``model_type`` to the family that lists it.
* ``tiny(vision_layers) -> (config, tokenizer)``: a tiny random model's config over a word-level
  tokenizer (:func:`tiny_tokenizer`, :func:`tiny_text_config`); :meth:`Family.build_tiny`
  instantiates the real class from it. ``tiny_adapter_kwargs`` go to the adapter of that model.
* ``processor_inputs(adapter, pixels, before, after) -> (kwargs, x_positions)``: what the model's
  own processor would hand its forward for token ids ``before + <video> + after`` and normalized
  frames ``pixels[T, 3, H, W]`` (the expanded ``input_ids`` and the pixel tensors), written from
  the processor's layout rather than from the adapter's template, and the positions in
  ``input_ids`` of the tokens of ``X`` (in ``X``'s order). The adapter tests check the adapter
  against the model's forward on these inputs.

Family modules are found with ``pkgutil`` on the first lookup: every module of ``pipeline.mllm``
except the shared ones in ``_SHARED`` is imported once, and importing it registers its families.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

# modules of pipeline.mllm that hold no family (skipped by discovery; reference.py is also slow to import)
_SHARED = frozenset({"base", "chat", "loader", "registry", "tokenizer", "reference", "smollm2"})

#: vocabulary of the tiny test models' word-level tokenizer
TINY_WORDS = (
    "what color shape is the a an circle square triangle cross red blue green yellow "
    "moves left right up down first then and it which object appears video describe answer"
).split()


@dataclass(frozen=True)
class Family:
    """One registered MLLM family (module docstring)."""

    kind: str
    adapter: type
    models: Mapping[str, str]
    tiny: Callable[[int], tuple[Any, Any]]
    processor_inputs: Callable[..., tuple[dict, Any]]
    tiny_adapter_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.models)

    def model_class(self, model_type: str) -> type:
        """The ``transformers`` class of a ``model_type`` this family serves."""
        import transformers

        return getattr(transformers, self.models[model_type])

    def build_tiny(self, vision_layers: int = 1, seed: int = 0) -> tuple[Any, Any]:
        """``(model, tokenizer)``: a tiny random model of the real class (float32, sdpa, eval)."""
        import torch

        config, tokenizer = self.tiny(vision_layers)
        config._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        return self.model_class(config.model_type)(config).eval(), tokenizer


_FAMILIES: dict[str, Family] = {}
_discovered = False


def register(
    kind: str,
    *,
    models: Mapping[str, str],
    tiny: Callable[[int], tuple[Any, Any]],
    processor_inputs: Callable[..., tuple[dict, Any]],
    tiny_adapter_kwargs: Mapping[str, Any] | None = None,
) -> Callable[[type], type]:
    """Class decorator: register the decorated adapter class as family ``kind`` (module docstring)."""
    if not models:
        raise ValueError(f"family {kind!r}: models must name at least one model_type")

    def deco(cls: type) -> type:
        fam = Family(kind, cls, dict(models), tiny, processor_inputs, dict(tiny_adapter_kwargs or {}))
        old = _FAMILIES.get(kind)
        if old is not None and _name(old.adapter) != _name(cls):  # the same class again: a module reload
            raise ValueError(f"MLLM kind {kind!r} is registered twice: {_name(old.adapter)} and {_name(cls)}")
        for other in _FAMILIES.values():
            clash = set(other.models) & set(models)
            if other.kind != kind and clash:
                raise ValueError(f"model_type {sorted(clash)} claimed by MLLM kinds {other.kind!r} and {kind!r}")
        _FAMILIES[kind] = fam
        return cls

    return deco


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    import pipeline.mllm as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in _SHARED and not mod.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
    _discovered = True


def families() -> dict[str, Family]:
    """Every registered family by kind (sorted)."""
    _discover()
    return {k: _FAMILIES[k] for k in sorted(_FAMILIES)}


def kinds() -> tuple[str, ...]:
    return tuple(families())


def family(kind: str) -> Family:
    fams = families()
    if kind not in fams:
        raise ValueError(f"unknown MLLM kind {kind!r}; known: {', '.join(fams)}")
    return fams[kind]


def for_model_type(model_type: str | None) -> Family | None:
    """The family serving a ``config.json`` ``model_type`` (``None`` if none does)."""
    for fam in families().values():
        if model_type in fam.models:
            return fam
    return None


def model_types() -> list[str]:
    return sorted(t for fam in families().values() for t in fam.models)


# ---------------------------------------------------------------- helpers for tiny builders
def tiny_tokenizer(extra_special: Sequence[str] = (), words: Sequence[str] = TINY_WORDS):
    """The word-level tokenizer of the tiny models: ``words`` plus ``<video>``, ``<image>`` and
    ``extra_special`` as special tokens."""
    from pipeline.mllm.tokenizer import build_word_tokenizer

    return build_word_tokenizer(list(words), ["<video>", "<image>", *extra_special])


def tiny_text_config(tokenizer: Any, **overrides: Any) -> dict:
    """Keyword arguments of a tiny decoder (width 32, 2 layers, 4 heads, 2 KV heads) over ``tokenizer``."""
    return dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )

"""LLaVA-OneVision-1.5 adapter (``LlavaOnevision15ForConditionalGeneration``: RICE-ViT tower,
Qwen3 language model, 1-D RoPE).

What the model's own code does (transformers ``models/llava_onevision1_5``):

* Vision: the RICE-ViT patch embedding is a ``Conv2d(p x p)`` over rows of ``3*p*p`` pixels, so
  there is NO temporal patching (``T' = T``); rows come in the Qwen2-VL processor's order
  ``(t, h/m, w/m, m, m)``, each frame attends only to itself (one attention segment and one
  prepended CLS token per frame) and the merger turns each run of ``m*m`` rows into one token:
  ``X[t, i*(w/m) + j]`` is merged block ``(i, j)`` of frame ``t`` (row-major).
* Processor (``Exaone4_5_Processor`` with ``Qwen2VLVideoProcessor``): replaces the (Qwen2-VL
  style) chat template's ``<|video_pad|>`` by ``grid_t*grid_h*grid_w / m^2`` video tokens and nothing else;
  the template's ``<|vision_start|>``/``<|vision_end|>`` stay as written text. So
  :attr:`chat_video_text` is ``"<|video_pad|>"`` and the layout is ``T*N`` video tokens.
* Positions: the model's forward uses ``arange(L)`` (1-D; ``get_rope_index`` is not used, the
  class drops Qwen2.5-VL's M-RoPE generation positions), so the full-sequence ids sliced to the
  kept tokens are the base class's default.

The tower needs one frame per patch: a processor config with ``temporal_patch_size`` other than 1
would hand it ``3*tp*p*p`` rows it cannot take, so the adapter always patchifies with 1 (a
checkpoint that works with its own processor has 1 there).

Real processors choose the resolution per video (``smart_resize``); the project needs a fixed
grid, so every frame is resized to ``frame_size``: the ``frame_size=(H, W)`` argument, else the
processor config's ``size.height/width``, else ``smart_resize(16*f, 16*f)`` with ``f =
patch*merge`` (448x448 for the real 14x2 tower).
"""

from __future__ import annotations

import torch

from pipeline.mllm.base import MLLMAdapter
from pipeline.mllm.qwen2_vl import Qwen2VLAdapter
from pipeline.mllm.registry import register, tiny_text_config, tiny_tokenizer


#: the Qwen chat tokens the real tokenizer has; the tiny tokenizer has them too, so that the
#: Qwen2-VL style chat template renders (the tiny model's video token is ``<|video_pad|>``)
VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"


def _tiny(vision_layers: int):
    """RICE-ViT patch 4, merge 2 (with ``frame_size=(16, 24)``: 2x3 tokens per frame), Qwen3 text
    model with ``head_dim=8``; ``vision_layers=0`` leaves patch embedding, norms and merger."""
    from transformers import LlavaOnevision15Config

    tok = tiny_tokenizer([VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD, "<|im_start|>", "<|im_end|>"])
    vis = dict(depth=vision_layers, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
               spatial_merge_size=2, out_hidden_size=32)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("video_token_id", VIDEO_PAD), ("image_token_id", IMAGE_PAD),
        ("vision_start_token_id", VISION_START), ("vision_end_token_id", VISION_END))}
    cfg = LlavaOnevision15Config(
        vision_config=vis, text_config=dict(model_type="qwen3", head_dim=8, **tiny_text_config(tok)), **ids
    )
    return cfg, tok


def _processor_inputs(adapter: LlavaOnevision15Adapter, pixels: torch.Tensor, before: list[int], after: list[int]):
    """The processor's layout: ``<|video_pad|>`` becomes ``t*h*w / merge^2`` video tokens (no
    wrapper, no mm_token_type_ids: the processor does not return them by default);
    ``pixel_values_videos [t*h*w, 3*p*p]`` / ``video_grid_thw [[t, h, w]]`` from
    :meth:`LlavaOnevision15Adapter.patchify` (checked against the documented layout by the tests)."""
    flat, grid = adapter.patchify(pixels)
    gt, gh, gw = (int(v) for v in grid[0])
    n = gt * (gh // adapter.merge) * (gw // adapter.merge)
    ids = torch.tensor([before + [adapter.video_token_id] * n + after], device=pixels.device)
    kwargs = {"input_ids": ids, "pixel_values_videos": flat, "video_grid_thw": grid}
    return kwargs, torch.arange(len(before), len(before) + n)


@register(
    "llava_onevision1_5",
    models={"llava_onevision1_5": "LlavaOnevision15ForConditionalGeneration"},
    tiny=_tiny,
    processor_inputs=_processor_inputs,
    tiny_adapter_kwargs={"frame_size": (16, 24)},
)
class LlavaOnevision15Adapter(Qwen2VLAdapter):
    """Qwen2-VL's video path (frame size, patchify, merger output, ``<|video_pad|>`` layout) with
    temporal patch 1 and 1-D positions (module docstring)."""

    position_dims = 1
    _full_positions = MLLMAdapter._full_positions  # 1-D: the full sequence's 0..L-1, sliced
    #: what the (Qwen2-VL style) chat template writes for a video that the processor replaces
    chat_video_text = VIDEO_PAD

    def __init__(self, model, tokenizer, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        self.temporal_patch = 1  # whatever a processor config says: the tower takes one frame per patch

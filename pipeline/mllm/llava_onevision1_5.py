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

from pipeline.mllm.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, MLLMAdapter
from pipeline.mllm.qwen2_vl import smart_resize
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
class LlavaOnevision15Adapter(MLLMAdapter):
    position_dims = 1
    #: what the (Qwen2-VL style) chat template writes for a video that the processor replaces
    chat_video_text = VIDEO_PAD

    def __init__(self, model, tokenizer, *, frame_size: tuple[int, int] | None = None, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        cfg = model.config
        vc = cfg.vision_config
        self.video_token_id = int(cfg.video_token_id)
        self.patch = int(vc.patch_size)
        self.merge = int(vc.spatial_merge_size)
        factor = self.patch * self.merge
        h, w = frame_size if frame_size is not None else self._default_frame_size(factor)
        h, w = int(h), int(w)
        if h <= 0 or w <= 0 or h % factor or w % factor:
            raise ValueError(
                f"frame_size {h}x{w} must be positive multiples of patch_size*spatial_merge_size = "
                f"{self.patch}*{self.merge} = {factor} (the grid of merged patches)"
            )
        self._frame_size = (h, w)

    def _default_frame_size(self, factor: int) -> tuple[int, int]:
        size = self.processor.get("size") or {}
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        min_pixels = int(size.get("shortest_edge", self.processor.get("min_pixels", 56 * 56)))
        max_pixels = int(size.get("longest_edge", self.processor.get("max_pixels", 28 * 28 * 1280)))
        return smart_resize(16 * factor, 16 * factor, factor, min_pixels, max_pixels)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def frame_size(self) -> tuple[int, int]:
        return self._frame_size

    @property
    def image_mean_std(self):
        return self._mean_std(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def visual_grid(self, num_frames: int) -> tuple[int, int, int]:
        h, w = self._frame_size
        f = self.patch * self.merge
        return (int(num_frames), h // f, w // f)

    def patchify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized frames ``[T, 3, H, W]`` -> (``pixel_values_videos [T*h*w, 3*p*p]``,
        ``video_grid_thw [[T, h, w]]``): the Qwen2-VL video processor's layout with temporal
        patch 1, rows in ``(t, h/m, w/m, m, m)`` order, each flattened as ``(channel, py, px)``."""
        T, C, H, W = pixels.shape
        p, m = self.patch, self.merge
        gh, gw = H // p, W // p
        x = pixels.reshape(T, C, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        flat = x.reshape(T * gh * gw, C * p * p)
        return flat, torch.tensor([[T, gh, gw]], dtype=torch.long, device=pixels.device)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        flat, grid = self.patchify(pixels)
        out = self.model.model.get_video_features(pixel_values_videos=flat, video_grid_thw=grid, return_dict=True)
        t, gh, gw = self.visual_grid(pixels.shape[0])
        return out.pooler_output[0].reshape(t, gh * gw, -1)

    def _video_layout(self, t: int, n: int) -> tuple[list[int], list[int]]:
        return [self.video_token_id] * (t * n), list(range(t * n))

"""Qwen2-VL and Qwen2.5-VL adapters (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``; M-RoPE).

Video path, following the processor's documented layout: frames resized to a fixed
``frame_size`` (multiples of ``patch_size * merge_size``), normalized, padded to a multiple of
``temporal_patch_size`` by repeating the last frame, patchified to ``pixel_values_videos``
``[t*h*w, 3*tp*p*p]`` in ``(t, h/m, w/m, m, m)`` order with ``video_grid_thw = [[t, h, w]]``
(patch units). The vision tower merges ``m x m`` patches, so ``X`` is
``[T' = ceil(T/tp), N = (h/m)*(w/m), D]`` in row-major grid order.

Positions: the model's own ``get_rope_index`` runs on the FULL sequence (with
``mm_token_type_ids``: 0 text, 2 video, as transformers 5.24 requires) and the kept tokens take
their slice ``position_ids[..., keep]``. ``compact_positions=True`` uses ``0..L-1`` on all
three M-RoPE axes. The next generated token takes ``max(full position ids) + 1`` (what the
model's ``generate`` does via ``rope_deltas``).

Real Qwen processors choose the resolution per video (``smart_resize`` between min/max pixels);
the project needs a fixed grid, so the adapter resizes every frame to ``frame_size``: from
``preprocessor_config.json``/``video_preprocessor_config.json`` ``size.height/width`` when
present, else ``smart_resize(16*f, 16*f)`` (``f = patch*merge``; 448x448 for the real models),
or the ``frame_size=(H, W)`` argument.

Prompts: the adapter replaces only ``<video>`` by ``T'*N`` copies of ``config.video_token_id``;
a real Qwen chat prompt writes the wrappers itself, e.g.
``"<|im_start|>user\\n<|vision_start|><video><|vision_end|>Describe it.<|im_end|>\\n<|im_start|>assistant\\n"``.
"""

from __future__ import annotations

import math

import torch

from pipeline.mllm.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, MLLMAdapter, ceil_div
from pipeline.mllm.registry import register, tiny_text_config, tiny_tokenizer

_VIDEO_TYPE = 2  # mm_token_type_ids: text 0, image 1, video 2


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen2-VL processor's resize rule (multiples of ``factor``, pixels within bounds)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _tiny_text(tok) -> dict:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    return tiny_text_config(tok, rope_parameters=rope)


def _tiny_qwen2(vision_layers: int):
    """Patch 4, merge 2, temporal patch 2 (with ``frame_size=(16, 24)``: 2x3 tokens per step)."""
    from transformers import Qwen2VLConfig

    tok = tiny_tokenizer()
    vis = dict(depth=vision_layers, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4,
               temporal_patch_size=2, spatial_merge_size=2)
    ids = dict(video_token_id=tok.convert_tokens_to_ids("<video>"), image_token_id=tok.convert_tokens_to_ids("<image>"))
    return Qwen2VLConfig(vision_config=vis, text_config=_tiny_text(tok), **ids), tok


def _tiny_qwen2_5(vision_layers: int):
    """As :func:`_tiny_qwen2`, with a windowed tower (at least 2 blocks, the second full attention)."""
    from transformers import Qwen2_5_VLConfig

    tok = tiny_tokenizer()
    vis = dict(depth=max(vision_layers, 2), hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
               temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=32, window_size=16,
               fullatt_block_indexes=[1], tokens_per_second=2)
    ids = dict(video_token_id=tok.convert_tokens_to_ids("<video>"), image_token_id=tok.convert_tokens_to_ids("<image>"))
    return Qwen2_5_VLConfig(vision_config=vis, text_config=_tiny_text(tok), **ids), tok


def _processor_inputs(adapter: Qwen2VLAdapter, pixels: torch.Tensor, before: list[int], after: list[int]):
    """The video processor's layout: ``<video>`` becomes ``t*h*w / merge^2`` video tokens,
    ``pixel_values_videos`` / ``video_grid_thw`` from :meth:`Qwen2VLAdapter.patchify` (checked
    against the documented layout by the tests), ``mm_token_type_ids`` 2 on the video tokens."""
    flat, grid = adapter.patchify(pixels)
    gt, gh, gw = (int(v) for v in grid[0])
    n = gt * (gh // adapter.merge) * (gw // adapter.merge)
    ids = torch.tensor([before + [adapter.video_token_id] * n + after], device=pixels.device)
    kwargs = {
        "input_ids": ids,
        "pixel_values_videos": flat,
        "video_grid_thw": grid,
        "mm_token_type_ids": (ids == adapter.video_token_id).int() * _VIDEO_TYPE,
    }
    return kwargs, torch.arange(len(before), len(before) + n)


def _processor_inputs_2_5(adapter: Qwen25VLAdapter, pixels: torch.Tensor, before: list[int], after: list[int]):
    """As Qwen2-VL, plus ``second_per_grid_ts = temporal_patch_size / fps``."""
    kwargs, x_positions = _processor_inputs(adapter, pixels, before, after)
    kwargs["second_per_grid_ts"] = torch.tensor([adapter.temporal_patch / adapter.fps], device=pixels.device)
    return kwargs, x_positions


_TINY_FRAME = {"frame_size": (16, 24)}


@register(
    "qwen2_vl",
    models={"qwen2_vl": "Qwen2VLForConditionalGeneration"},
    tiny=_tiny_qwen2,
    processor_inputs=_processor_inputs,
    tiny_adapter_kwargs=_TINY_FRAME,
)
class Qwen2VLAdapter(MLLMAdapter):
    """Qwen2-VL; also the base of :class:`Qwen25VLAdapter`."""

    position_dims = 3
    chat_video_text = "<|video_pad|>"  # the processor replaces only the pad; the template writes the markers

    def __init__(self, model, tokenizer, *, frame_size: tuple[int, int] | None = None, fps: float = 2.0, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        cfg = model.config
        vc = cfg.vision_config
        self.video_token_id = int(cfg.video_token_id)
        self.patch = int(vc.patch_size)
        self.merge = int(vc.spatial_merge_size)
        self.temporal_patch = int(getattr(vc, "temporal_patch_size", 1))  # towers without temporal patches: 1
        self.fps = float(fps)
        factor = self.patch * self.merge
        if frame_size is None:
            frame_size = self._default_frame_size(factor)
        h, w = int(frame_size[0]), int(frame_size[1])
        if h % factor or w % factor or h <= 0 or w <= 0:
            raise ValueError(f"frame_size {h}x{w} must be positive multiples of patch_size*merge_size = {factor}")
        self._frame_size = (h, w)

    def _default_frame_size(self, factor: int) -> tuple[int, int]:
        size = self.processor.get("size") or {}
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        min_pixels = int(size.get("shortest_edge", self.processor.get("min_pixels", 56 * 56)))
        max_pixels = int(size.get("longest_edge", self.processor.get("max_pixels", 28 * 28 * 1280)))
        return smart_resize(16 * factor, 16 * factor, factor, min_pixels, max_pixels)

    @property
    def frame_size(self) -> tuple[int, int]:
        return self._frame_size

    @property
    def image_mean_std(self):
        return self._mean_std(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def visual_grid(self, num_frames: int) -> tuple[int, int, int]:
        h, w = self._frame_size
        f = self.patch * self.merge
        return (ceil_div(int(num_frames), self.temporal_patch), h // f, w // f)

    def _frames_for(self, t_prime: int) -> int:
        return t_prime * self.temporal_patch

    def patchify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized frames ``[T, 3, H, W]`` -> (``pixel_values_videos [t*h*w, 3*tp*p*p]``,
        ``video_grid_thw [[t, h, w]]``), the video processor's layout."""
        T, C, H, W = pixels.shape
        tp, p, m = self.temporal_patch, self.patch, self.merge
        if pad := -T % tp:
            pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)], dim=0)
        gt, gh, gw = pixels.shape[0] // tp, H // p, W // p
        x = pixels.reshape(1, gt, tp, C, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        flat = x.reshape(gt * gh * gw, C * tp * p * p)
        grid = torch.tensor([[gt, gh, gw]], dtype=torch.long, device=pixels.device)
        return flat, grid

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        flat, grid = self.patchify(pixels)
        out = self.model.model.get_video_features(pixel_values_videos=flat, video_grid_thw=grid, return_dict=True)
        feats = out.pooler_output
        feats = feats[0] if isinstance(feats, (list, tuple)) else feats
        t, gh, gw = self.visual_grid(pixels.shape[0])
        return feats.reshape(t, gh * gw, -1)

    def _video_layout(self, t: int, n: int) -> tuple[list[int], list[int]]:
        return [self.video_token_id] * (t * n), list(range(t * n))

    def _rope_kwargs(self, units: int, device) -> dict:
        return {}

    def _full_positions(self, ids, slot, valid, grid) -> torch.Tensor:
        t, gh, gw = grid
        U = ids.shape[0]
        mm = torch.where(slot >= 0, _VIDEO_TYPE, 0).to(torch.int32)
        thw = torch.tensor([[t, gh * self.merge, gw * self.merge]] * U, dtype=torch.long, device=ids.device)
        pos, _ = self.model.model.get_rope_index(
            input_ids=ids,
            mm_token_type_ids=mm,
            video_grid_thw=thw,
            attention_mask=valid.long(),
            **self._rope_kwargs(U, ids.device),
        )
        return pos.masked_fill(~valid.unsqueeze(0), 0)


@register(
    "qwen2_5_vl",
    models={"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"},
    tiny=_tiny_qwen2_5,
    processor_inputs=_processor_inputs_2_5,
    tiny_adapter_kwargs=_TINY_FRAME,
)
class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: as Qwen2-VL, plus temporal M-RoPE ids spaced by
    ``tokens_per_second * second_per_grid`` with ``second_per_grid = temporal_patch_size / fps``
    (the processor's rule; ``fps`` is the sampling rate of the frames, default 2.0)."""

    def _rope_kwargs(self, units: int, device) -> dict:
        spg = self.temporal_patch / self.fps
        return {"second_per_grid_ts": torch.full((units,), spg, dtype=torch.float32, device=device)}

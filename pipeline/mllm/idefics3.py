"""SmolVLM / Idefics3 adapter (``Idefics3ForConditionalGeneration``, also
``SmolVLMForConditionalGeneration``; 1-D RoPE). Video frames are images.

Every frame is resized to the vision tower's ``image_size`` square (no tiling: the SmolVLM video
path does not split frames), normalized (default mean/std 0.5), encoded by the SigLIP-style tower,
pixel-shuffled by ``scale_factor`` and projected: ``N = ((image_size/patch)/scale_factor)^2``
tokens per frame in row-major order. The placeholder expands, per frame, into the processor's
single-image layout ``<fake_token_around_image><global-img><image>*N<fake_token_around_image>``;
the wrapper tokens are always kept, only the ``<image>`` slots are maskable. (SmolVLM's
per-frame timestamp text and video intro are not inserted; write them in the prompt if wanted.)
"""

from __future__ import annotations

import torch

from pipeline.mllm.base import MLLMAdapter
from pipeline.mllm.registry import register, tiny_text_config, tiny_tokenizer

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
IMAGE_TOKEN = "<image>"


def _tiny(vision_layers: int):
    """16x16 frames, patch 4, scale factor 2 -> 2x2 tokens per frame."""
    from transformers import Idefics3Config

    tok = tiny_tokenizer([FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN])
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=vision_layers,
                           num_attention_heads=2, image_size=16, patch_size=4),
        text_config=dict(model_type="llama", **tiny_text_config(tok)),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), scale_factor=2, pad_token_id=tok.pad_token_id,
    )
    return cfg, tok


def _processor_inputs(adapter: Idefics3Adapter, pixels: torch.Tensor, before: list[int], after: list[int]):
    """The processor's single-image layout per frame,
    ``<fake_token_around_image><global-img><image>*N<fake_token_around_image>``; the frames go
    in as ``pixel_values[1, T, 3, S, S]``."""
    T = pixels.shape[0]
    _, gh, gw = adapter.visual_grid(T)
    n = gh * gw
    fake, glob = adapter.fake_image_token_id, adapter.global_image_token_id
    frame = [fake, glob] + [adapter.image_token_id] * n + [fake]
    ids = before + frame * T + after
    x_positions = torch.tensor([len(before) + f * len(frame) + 2 + i for f in range(T) for i in range(n)])
    return {"input_ids": torch.tensor([ids], device=pixels.device), "pixel_values": pixels[None]}, x_positions


@register(
    "idefics3",
    # SmolVLM: the Idefics3 architecture under its own class
    models={"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"},
    tiny=_tiny,
    processor_inputs=_processor_inputs,
)
class Idefics3Adapter(MLLMAdapter):
    position_dims = 1

    def __init__(self, model, tokenizer, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        cfg = model.config
        vc = cfg.vision_config
        self.image_token_id = int(cfg.image_token_id)
        self._image_size = int(vc.image_size)
        side = (self._image_size // int(vc.patch_size)) // int(cfg.scale_factor)
        self._grid = (side, side)
        unk = getattr(tokenizer, "unk_token_id", None)
        ids = {}
        for name in (FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN):
            i = tokenizer.convert_tokens_to_ids(name)
            if i is None or (unk is not None and i == unk):
                raise ValueError(f"the tokenizer has no {name!r} token (Idefics3/SmolVLM image wrapper)")
            ids[name] = int(i)
        self.fake_image_token_id = ids[FAKE_IMAGE_TOKEN]
        self.global_image_token_id = ids[GLOBAL_IMAGE_TOKEN]

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.text_model

    @property
    def frame_size(self) -> tuple[int, int]:
        return (self._image_size, self._image_size)

    def visual_grid(self, num_frames: int) -> tuple[int, int, int]:
        return (int(num_frames), *self._grid)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # = get_image_features(pixel_values[None]) without its "drop all-zero (padding) images"
        # step, which would silently drop a frame that normalizes to exactly 0
        inner = self.model.model
        hidden = inner.vision_model(pixel_values=pixels.to(inner.vision_model.dtype), return_dict=True).last_hidden_state
        return inner.connector(hidden)

    def _video_layout(self, t: int, n: int) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        slots: list[int] = []
        for f in range(t):
            ids += [self.fake_image_token_id, self.global_image_token_id] + [self.image_token_id] * n + [self.fake_image_token_id]
            slots += [-1, -1] + list(range(f * n, (f + 1) * n)) + [-1]
        return ids, slots

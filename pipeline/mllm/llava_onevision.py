"""LLaVA-OneVision adapter (``LlavaOnevisionForConditionalGeneration``, 1-D RoPE).

Video path (as the model's own ``get_video_features``): every frame is resized to the vision
tower's ``image_size`` square, the tower's selected hidden layer goes through the projector, a
2x2 bilinear pooling gives ``ceil(p/2) x ceil(p/2)`` tokens per frame (``p = image_size //
patch_size``), and ONE ``image_newline`` embedding follows the whole video. ``X`` holds the
pooled frame tokens; the newline is an always-kept extra that the adapter appends itself.
The processor expands ``<video>`` into ``T*N + 1`` video tokens; so does the adapter.

Works with a zero-layer SigLIP tower (patch embedding only; ``vision_feature_layer=-1``,
``vision_feature_select_strategy="full"``), the configuration of the embedded ``score-tiny``.
transformers 5.24 collects vision hidden states with hooks on the encoder layers, so with zero
layers ``hidden_states`` is empty and the model's own ``get_video_features`` (and therefore its
forward with ``pixel_values_videos``) raises ``IndexError``. :func:`video_features` computes the
same thing by hand in that case (the hidden state "before layer 0" is the embeddings output) and
is differentiable, so a builder can train through it.
"""

from __future__ import annotations

import torch

from pipeline.mllm.base import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    MLLMAdapter,
    ceil_div,
)
from pipeline.mllm.registry import register, tiny_text_config, tiny_tokenizer


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return model.model if hasattr(model, "lm_head") else model


def video_features(model: torch.nn.Module, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """``pixel_values_videos[B, T, 3, S, S]`` -> ``[B, T*N + 1, D]``: pooled frame tokens then the
    ``image_newline``, exactly the model's own ``get_video_features(...).pooler_output``; also for
    a zero-layer vision tower, where the built-in path fails."""
    inner = _inner(model)
    if int(getattr(inner.config.vision_config, "num_hidden_layers", 1)) > 0:
        out = inner.get_video_features(pixel_values_videos=pixel_values_videos, return_dict=True)
        return out.pooler_output
    return _video_features_from_embeddings(inner, pixel_values_videos)


def _video_features_from_embeddings(inner: torch.nn.Module, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """The video path with the vision hidden state taken at the embeddings output (layer 0)."""
    cfg = inner.config
    B, T = pixel_values_videos.shape[:2]
    px = pixel_values_videos.flatten(0, 1).to(inner.vision_tower.dtype)
    vm = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    h = vm.embeddings(px)
    if hasattr(vm, "pre_layrnorm"):  # CLIP applies a layer norm before layer 0
        h = vm.pre_layrnorm(h)
    layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) else [cfg.vision_feature_layer]
    n_states = int(getattr(cfg.vision_config, "num_hidden_layers", 0)) + 1
    bad = [i for i in layers if i % n_states != 0]
    if bad:
        raise ValueError(f"vision_feature_layer {cfg.vision_feature_layer} does not exist in a vision tower with {n_states - 1} layers")
    h = torch.cat([h] * len(layers), dim=-1)
    if cfg.vision_feature_select_strategy == "default":
        h = h[:, 1:]
    f = inner.apply_pooling(inner.multi_modal_projector(h))
    f = f.reshape(B, T * f.shape[1], -1)
    newline = inner.image_newline[None, None, :].expand(B, 1, -1).to(f.dtype)
    return torch.cat((f, newline), dim=1)


def _tiny(vision_layers: int):
    """SigLIP, 16x16 frames, patch 4 -> 2x2 pooled tokens per frame; ``vision_layers=0`` is the
    score-tiny layout."""
    from transformers import LlavaOnevisionConfig

    tok = tiny_tokenizer()
    cfg = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
            num_hidden_layers=vision_layers, num_attention_heads=2, image_size=16, patch_size=4,
        ),
        text_config=dict(model_type="qwen2", **tiny_text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    return cfg, tok


def _processor_inputs(adapter: LlavaOnevisionAdapter, pixels: torch.Tensor, before: list[int], after: list[int]):
    """The processor's layout: ``<video>`` becomes ``T*N + 1`` video tokens (the last one takes
    the ``image_newline``); the frames go in as ``pixel_values_videos[1, T, 3, S, S]``."""
    T = pixels.shape[0]
    _, gh, gw = adapter.visual_grid(T)
    n = T * gh * gw
    ids = before + [adapter.video_token_id] * (n + 1) + after
    kwargs = {"input_ids": torch.tensor([ids], device=pixels.device), "pixel_values_videos": pixels[None]}
    return kwargs, torch.arange(len(before), len(before) + n)


@register(
    "llava_onevision",
    models={"llava_onevision": "LlavaOnevisionForConditionalGeneration"},
    tiny=_tiny,
    processor_inputs=_processor_inputs,
)
class LlavaOnevisionAdapter(MLLMAdapter):
    position_dims = 1

    def __init__(self, model, tokenizer, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        cfg = model.config
        self.video_token_id = int(cfg.video_token_id)
        vc = cfg.vision_config
        self._image_size = int(vc.image_size)
        self._patches = self._image_size // int(vc.patch_size)
        side = ceil_div(self._patches, 2)
        self._grid = (side, side)
        self._vision_type = getattr(vc, "model_type", "")

    @property
    def frame_size(self) -> tuple[int, int]:
        return (self._image_size, self._image_size)

    @property
    def image_mean_std(self):
        if "clip" in self._vision_type:
            return self._mean_std(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        return self._mean_std(IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)  # SigLIP

    def visual_grid(self, num_frames: int) -> tuple[int, int, int]:
        return (int(num_frames), *self._grid)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = video_features(self.model, pixels.unsqueeze(0))
        T = pixels.shape[0]
        n = self._grid[0] * self._grid[1]
        return feats[0, :-1].reshape(T, n, -1)  # drop the trailing image_newline (an extra)

    def _extras(self, X: torch.Tensor) -> torch.Tensor:
        return self.model.model.image_newline.to(X.dtype).unsqueeze(0)

    def _video_layout(self, t: int, n: int) -> tuple[list[int], list[int]]:
        k = t * n
        return [self.video_token_id] * (k + 1), list(range(k + 1))  # slot k = image_newline

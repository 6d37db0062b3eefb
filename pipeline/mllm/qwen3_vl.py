"""Qwen3-VL adapter (``Qwen3VLForConditionalGeneration`` and the MoE
``Qwen3VLMoeForConditionalGeneration``; interleaved M-RoPE, DeepStack).

Both classes share one code path: the MoE model differs only in its text MLPs, and its
``get_video_features`` / ``get_rope_index`` / text-model forward (``visual_pos_masks``,
``deepstack_visual_embeds``) are the dense model's.

Video path (``video_processing_qwen3_vl.py``): frames resized to a fixed ``frame_size``
(multiples of ``patch_size * merge_size``; 512x512 by default for the real models, patch 16,
merge 2), normalized with mean = std = 0.5, padded to a multiple of ``temporal_patch_size`` by
repeating the last frame and patchified exactly like Qwen2-VL (:meth:`Qwen2VLAdapter.patchify`),
so ``X`` is ``[T' = ceil(T / tp), N = (h/m)*(w/m), D]`` in row-major grid order.

DeepStack: the vision tower also returns one merged feature per ``deepstack_visual_indexes``
entry (in vision-layer order), which the language model adds to the hidden states after its
first ``levels`` layers at the visual positions. ``_encode`` returns them as the side feature
``"deepstack"`` ``[T', N, levels, D]``; ``_lm_kwargs`` hands the language model
``visual_pos_masks = batch.visual_mask`` and ``deepstack_visual_embeds[l] =
side["deepstack"][visual_mask][:, l]``: every row's KEPT tokens in row-major order, which is
how the text model reads them (``hidden[visual_pos_masks] += embeds``). Callers get the side
features from :meth:`encode_video_with_side` and pass them back as ``side=``; scoring a
DeepStack model without them is a ValueError (the result would not be the model's).

Layout (``processing_qwen3_vl.py``): the chat template writes
``<|vision_start|><|video_pad|><|vision_end|>`` for a video (:attr:`chat_video_text`); the
processor replaces that whole triple by, per temporal step ``k``,
``<{t_k:.1f} seconds><|vision_start|>`` + ``N`` video tokens + ``<|vision_end|>``, with
``t_k`` from ``_calculate_timestamps(frame indices, fps, temporal_patch_size)`` (the mean
time of the step's first and last frame). Contract of this adapter: the frames of a video are
sampled at ``fps`` (the ``fps`` argument, else the processor config's ``fps``, else 2.0)
starting at index 0, and a video always fills whole temporal steps (``T'*tp`` frames; an odd
video's repeated last frame counts as the next sample, so its last timestamp is ``(2T-1)/(2
fps)`` where the processor, told the true count, would write ``(T-1)/fps``): the template only
knows ``T'``. The timestamp text is tokenized on its own, as the real tokenizer does between
special tokens.

Positions: the model's own ``get_rope_index`` on the FULL sequence (``mm_token_type_ids`` 2 on
video tokens), sliced to the kept tokens (inherited from Qwen2-VL). Qwen3-VL's
``get_rope_index`` splits the video grid into ``T'`` single-step grids: each step is its own
group whose temporal id is the running position at its start (the timestamps are text).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from pipeline.mllm.base import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, MaskedBatch
from pipeline.mllm.qwen2_vl import Qwen2VLAdapter
from pipeline.mllm.registry import TINY_WORDS, register, tiny_text_config, tiny_tokenizer

VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"
_VIDEO_TYPE = 2  # mm_token_type_ids: text 0, image 1, video 2


def calculate_timestamps(indices: list[int], fps: float, temporal_patch: int) -> list[float]:
    """Seconds of each temporal step: ``Qwen3VLProcessor._calculate_timestamps`` (same operations
    in the same order, so the ``.1f`` text rounds the same way)."""
    indices = list(indices)
    if pad := -len(indices) % temporal_patch:
        indices += [indices[-1]] * pad
    times = [i / fps for i in indices]
    return [(times[i] + times[i + temporal_patch - 1]) / 2 for i in range(0, len(times), temporal_patch)]


# ---------------------------------------------------------------- tiny models
def _tiny_tokenizer():
    # the timestamp text "<0.2 seconds>" must tokenize: "<", ">" and "seconds" are words (digits and
    # "." are in every word tokenizer); the chat markers let a test render Qwen's chat layout
    specials = [VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD, "<|im_start|>", "<|im_end|>"]
    return tiny_tokenizer(specials, words=[*TINY_WORDS, "seconds", "<", ">", "system", "user", "assistant"])


def _tiny_parts(vision_layers: int, tok) -> tuple[dict, dict]:
    """Vision: patch 4, merge 2, temporal patch 2 (``frame_size=(16, 24)``: 2x3 tokens per step),
    at least 2 blocks with DeepStack taps after both (2 levels, into both text layers)."""
    depth = max(vision_layers, 2)
    vis = dict(depth=depth, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, temporal_patch_size=2,
               spatial_merge_size=2, out_hidden_size=32, num_position_embeddings=16,
               deepstack_visual_indexes=[0, depth - 1])
    ids = dict(video_token_id=tok.convert_tokens_to_ids(VIDEO_PAD), image_token_id=tok.convert_tokens_to_ids(IMAGE_PAD),
               vision_start_token_id=tok.convert_tokens_to_ids(VISION_START),
               vision_end_token_id=tok.convert_tokens_to_ids(VISION_END))
    return vis, ids


def _tiny_rope() -> dict:
    # head_dim 8 -> 4 rotary frequencies, interleaved over (t, h, w) = 2 + 1 + 1
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True}


def _tiny(vision_layers: int):
    from transformers import Qwen3VLConfig

    tok = _tiny_tokenizer()
    vis, ids = _tiny_parts(vision_layers, tok)
    text = tiny_text_config(tok, head_dim=8, rope_parameters=_tiny_rope())
    return Qwen3VLConfig(vision_config=vis, text_config=text, **ids), tok


def tiny_moe(vision_layers: int = 1, **vision_overrides: Any):
    """The MoE variant (4 experts, top 2, every layer sparse) over the same vision tower."""
    from transformers import Qwen3VLMoeConfig

    tok = _tiny_tokenizer()
    vis, ids = _tiny_parts(vision_layers, tok)
    vis.update(vision_overrides)
    text = tiny_text_config(tok, head_dim=8, rope_parameters=_tiny_rope(), num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=16, decoder_sparse_step=1)
    return Qwen3VLMoeConfig(vision_config=vis, text_config=text, **ids), tok


def processor_video_text(adapter: Qwen3VideoAdapter, frame_indices: list[int], grid_thw: list[int]) -> str:
    """The text ``Qwen3VLProcessor.replace_video_token`` (transformers' own code, run on a stand-in
    for the processor: the real one needs torchvision's video processor) puts in place of the
    chat template's video triple for one video with ``video_grid_thw = grid_thw`` whose frames
    sit at ``frame_indices`` at ``adapter.fps``."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    proc = SimpleNamespace(
        video_processor=SimpleNamespace(merge_size=adapter.merge, temporal_patch_size=adapter.temporal_patch),
        vision_start_token=VISION_START, vision_end_token=VISION_END, video_token=VIDEO_PAD,
    )
    proc._calculate_timestamps = lambda *a, **k: Qwen3VLProcessor._calculate_timestamps(proc, *a, **k)
    meta = VideoMetadata(total_num_frames=len(frame_indices), fps=adapter.fps, frames_indices=list(frame_indices))
    inputs = {"video_grid_thw": torch.tensor([grid_thw]), "video_metadata": [meta]}
    return Qwen3VLProcessor.replace_video_token(proc, inputs, 0)


def processor_inputs(adapter: Qwen3VideoAdapter, pixels: torch.Tensor, before: list[int], after: list[int]):
    """What ``Qwen3VLProcessor`` hands the model, from its own code: ``pixel_values_videos`` from
    ``Qwen3VLVideoProcessor.patchify``; in place of the chat template's video triple,
    :func:`processor_video_text` for frames at indices ``0..T'*tp-1`` sampled at ``adapter.fps``
    (the adapter's contract, module docstring), tokenized between ``before`` and ``after``;
    ``mm_token_type_ids`` as ``create_mm_token_type_ids`` (2 on video tokens)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tp, p, m = adapter.temporal_patch, adapter.patch, adapter.merge
    vp = Qwen3VLVideoProcessor(patch_size=p, temporal_patch_size=tp, merge_size=m)
    flat, gt, gh, gw = vp.patchify(pixels[None], patch_size=p, merge_size=m, temporal_patch_size=tp)
    text = processor_video_text(adapter, list(range(gt * tp)), [gt, gh, gw])
    video = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([before + video + after], device=pixels.device)
    kwargs = {
        "input_ids": ids,
        "pixel_values_videos": flat[0],
        "video_grid_thw": torch.tensor([[gt, gh, gw]], device=pixels.device),
        "mm_token_type_ids": (ids == adapter.video_token_id).int() * _VIDEO_TYPE,
    }
    return kwargs, (ids[0] == adapter.video_token_id).nonzero()[:, 0].cpu()


def _deepstack_check(idx: list[int], depth: int, mergers: int, layers: int) -> None:
    """ValueError where a DeepStack config cannot be what the checkpoint means: the vision tower
    takes a feature only at indexes it reaches (one per merger), and the text model silently
    drops levels beyond its own layer count."""
    problem = None
    if any(i < 0 or i >= depth for i in idx):
        problem = f"points past the vision tower's {depth} layers (valid: 0..{depth - 1})"
    elif len(set(idx)) != len(idx):
        problem = "repeats a layer (each entry needs its own vision layer)"
    elif len(idx) != mergers:
        problem = f"has {len(idx)} entries for {mergers} DeepStack mergers"
    elif len(idx) > layers:
        problem = f"has {len(idx)} levels, more than the language model's {layers} layers"
    if problem:
        raise ValueError(f"Qwen3-VL DeepStack config: vision_config.deepstack_visual_indexes={idx} {problem}")


class Qwen3VideoAdapter(Qwen2VLAdapter):
    """The Qwen3 video layout, shared by Qwen3-VL and Qwen3.5 (``Qwen3VLProcessor``): per-step
    timestamps and vision markers, mean = std = 0.5, ``fps`` (module docstring)."""

    chat_video_text = VISION_START + VIDEO_PAD + VISION_END  # the processor replaces the whole triple

    def __init__(self, model, tokenizer, *, frame_size: tuple[int, int] | None = None, fps: float | None = None, **kwargs) -> None:
        super().__init__(model, tokenizer, frame_size=frame_size, **kwargs)
        cfg = model.config
        self.fps = float(fps if fps is not None else self.processor.get("fps") or 2.0)
        if self.fps <= 0:
            raise ValueError(f"fps must be positive (the sampling rate of the frames, for the timestamps), got {self.fps}")
        self.vision_start_id = int(cfg.vision_start_token_id)
        self.vision_end_id = int(cfg.vision_end_token_id)

    @property
    def image_mean_std(self):
        return self._mean_std(IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)

    def timestamps(self, t_prime: int) -> list[float]:
        """Seconds of each of ``t_prime`` temporal steps (frames ``0..t_prime*tp-1`` at ``fps``)."""
        return calculate_timestamps(list(range(t_prime * self.temporal_patch)), self.fps, self.temporal_patch)

    def _video_layout(self, t: int, n: int) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        slots: list[int] = []
        for k, sec in enumerate(self.timestamps(t)):
            text = self._tokenize(f"<{sec:.1f} seconds>", bos=False)
            ids += [*text, self.vision_start_id, *[self.video_token_id] * n, self.vision_end_id]
            slots += [-1] * (len(text) + 1) + list(range(k * n, (k + 1) * n)) + [-1]
        return ids, slots


@register(
    "qwen3_vl",
    models={"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"},
    tiny=_tiny,
    processor_inputs=processor_inputs,
    tiny_adapter_kwargs={"frame_size": (16, 24)},
)
class Qwen3VLAdapter(Qwen3VideoAdapter):
    """Qwen3-VL and Qwen3-VL-MoE (module docstring)."""

    def __init__(self, model, tokenizer, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        self.deepstack_levels = self._check_deepstack()

    @classmethod
    def check_config(cls, config: dict) -> None:
        import transformers

        arch = "Qwen3VLMoeConfig" if config.get("model_type") == "qwen3_vl_moe" else "Qwen3VLConfig"
        cfg = getattr(transformers, arch).from_dict(config)  # the class's defaults for absent keys
        vc = cfg.vision_config
        idx = list(vc.deepstack_visual_indexes)
        _deepstack_check(idx, int(vc.depth), len(idx), int(cfg.text_config.num_hidden_layers))

    def _check_deepstack(self) -> int:
        """Number of DeepStack levels (:func:`_deepstack_check` on the built model)."""
        visual = self.model.model.visual
        idx = [int(i) for i in visual.deepstack_visual_indexes]
        _deepstack_check(idx, len(visual.blocks), len(visual.deepstack_merger_list), len(self.language_model.layers))
        return len(idx)

    def _encode(self, pixels: torch.Tensor):
        flat, grid = self.patchify(pixels)
        out = self.model.model.get_video_features(pixel_values_videos=flat, video_grid_thw=grid, return_dict=True)
        t, gh, gw = self.visual_grid(pixels.shape[0])
        X = out.pooler_output[0].reshape(t, gh * gw, -1)  # one video: the first split
        if not self.deepstack_levels:
            return X
        levels = torch.stack([f[0] for f in out.deepstack_features], dim=1)  # [T'N, levels, D]
        return X, {"deepstack": levels.reshape(t, gh * gw, self.deepstack_levels, -1)}

    def _lm_kwargs(self, batch: MaskedBatch) -> dict[str, Any]:
        if not self.deepstack_levels:
            return {}
        feats = batch.side.get("deepstack")
        want = (self.deepstack_levels, self.hidden_size)
        if feats is None or tuple(feats.shape[2:]) != want:
            got = "none" if feats is None else f"shape {tuple(feats.shape[2:])} per token"
            raise ValueError(
                f"Qwen3-VL needs its DeepStack side features: pass side=... from encode_video_with_side "
                f"(side['deepstack'] [T', N, {want[0]}, {want[1]}] per video); got {got}"
            )
        kept = feats[batch.visual_mask]  # [all rows' kept tokens in order, levels, D]
        return {"visual_pos_masks": batch.visual_mask, "deepstack_visual_embeds": list(kept.unbind(1))}

"""Qwen3.5 adapters (``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``):
a Qwen3-VL-style vision tower on a hybrid language model (Gated DeltaNet linear-attention layers
between full-attention layers), interleaved M-RoPE.

Vision: Qwen3-VL's tower WITHOUT DeepStack (``Qwen3_5VisionModel`` deletes the DeepStack
mergers), so ``X`` is the merger output alone and there are no side features. Pixels, layout,
timestamps and normalization are Qwen3-VL's: the adapter is a
:class:`~pipeline.mllm.qwen3_vl.Qwen3VideoAdapter` (frame size, patchify, ``visual_grid``,
``_encode`` and the per-step layout), with the hybrid decoder's cache handling added here.

Layout (the checkpoints use ``Qwen3VLProcessor``): the chat template writes
``<|vision_start|><|video_pad|><|vision_end|>`` for a video (``chat_video_text``); the processor
collapses that wrapper and writes, per temporal step ``k`` of ``X``,
``"<{ts_k:.1f} seconds>" <|vision_start|> <|video_pad|> * N <|vision_end|>``, the timestamp as
ordinary text tokens. ``ts_k`` is the processor's ``_calculate_timestamps``: the mean time of the
first and last frame of the step, frame ``i`` at ``i / fps`` (``fps``: the sampling rate of the
frames handed to ``encode_video``, default 2.0). ``X`` does not carry the frame count, so the
timestamps are those of a video of ``T' * temporal_patch_size`` frames: an odd-length video is
laid out as the processor lays out that video padded with its last frame repeated at the next
frame time (the pixels are the processor's either way; handed the odd-length video itself the
processor would time the last step at its last frame instead, one timestamp text that differs).
The timestamp text is tokenized on its own; the real processor tokenizes it together with the
text before the video, which gives the same tokens unless that text ends in punctuation that
Qwen's pre-tokenizer glues to ``<`` (chat templates put the video after ``\\n``).

Positions: the model's own ``get_rope_index`` on the FULL sequence (``mm_token_type_ids`` 2 on
the video pads only, as the processor sets them); Qwen3.5 splits the video grid per frame, so
each step's tokens start at the position after its timestamp text. The kept tokens take their
slice; the next generated token takes ``max + 1``.

Hybrid language model and right padding: every family scores ``B*G`` rows as one right-padded
batch. Full-attention layers mask the padding. The linear-attention layers
(``Qwen3_5GatedDeltaNet``) multiply the hidden states of padded positions by 0
(``apply_mask_to_padding_states`` with the 2-D mask from ``create_recurrent_attention_mask``),
and both their causal depthwise conv1d and their gated delta recurrence only look backwards, so
the output at a real token depends only on the real tokens before it: padding that comes after
them cannot reach them (tests/test_mllm_qwen3_5.py checks a row alone == the same row inside a
batch of much longer rows). Padding does change the *final* recurrent state of a short row
(zeroed inputs still decay it), which matters only for a cache that is continued: ``prefill``
runs one unpadded row, so its cache is exact.

Cache: the language model builds its own ``DynamicCache(config=...)`` when ``use_cache`` and no
cache is given; for Qwen3.5 it holds KV for the full-attention layers and conv + recurrent state
for the linear ones. The base ``prefill`` / greedy decode pass it back as ``cache=`` with
explicit 3-row position ids and need no change. A cached forward of a right-padded batch
(``lmms_eval_model.generate_batch`` decodes rows of different lengths over one cache) would
leave each short row's linear-attention states run on through its padding (zeroed inputs still
decay the recurrent state, and the conv window holds the zeros instead of the row's last
tokens), while the KV of the full-attention layers is right (the decode mask hides the padding):
:meth:`Qwen35Adapter._lm` therefore reruns each short row alone and writes its conv and
recurrent states into its row of the batch cache.
"""

from __future__ import annotations

from typing import Any

from pipeline.mllm.base import MaskedBatch
from pipeline.mllm.qwen3_vl import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, Qwen3VideoAdapter, processor_inputs
from pipeline.mllm.registry import TINY_WORDS, register, tiny_text_config

#: special tokens of the tiny test tokenizer (a subset of the real vocabulary's, same spelling)
TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]


def tiny_tokenizer():
    """Byte-level BPE over the tiny words (a Qwen3.5 directory reloads as ``Qwen3_5Tokenizer``,
    which rebuilds a byte-level BPE whatever wrote it: a word-level tokenizer would lose its words)."""
    from pipeline.mllm.tokenizer import build_byte_bpe_tokenizer

    words = [*TINY_WORDS, "seconds", "user", "assistant", "system"]
    return build_byte_bpe_tokenizer(words, TINY_SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _tiny_parts(vision_layers: int, moe: bool) -> dict:
    tok = tiny_tokenizer()
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True,
            "partial_rotary_factor": 0.5}  # head_dim 16 * 0.5 = 8 rotary dims = 4 frequencies = 2 + 1 + 1
    text = tiny_text_config(
        tok, head_dim=16, rope_parameters=rope, layer_types=["linear_attention", "full_attention"],
        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4,
    )
    if moe:
        del text["intermediate_size"]  # the MoE text config has expert sizes instead
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    vis = dict(depth=vision_layers, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, temporal_patch_size=2,
               spatial_merge_size=2, out_hidden_size=32, num_position_embeddings=16)
    names = {"video": VIDEO_PAD, "image": IMAGE_PAD, "vision_start": VISION_START, "vision_end": VISION_END}
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(s) for k, s in names.items()}
    return dict(text_config=text, vision_config=vis, tokenizer=tok, **ids)


def _tiny(vision_layers: int):
    """2 decoder layers (linear attention, then full attention), patch 4, merge 2, temporal 2
    (with ``frame_size=(16, 24)``: 2x3 tokens per step)."""
    from transformers import Qwen3_5Config

    parts = _tiny_parts(vision_layers, moe=False)
    tok = parts.pop("tokenizer")
    return Qwen3_5Config(**parts), tok


def _tiny_moe(vision_layers: int):
    """As :func:`_tiny`, with sparse-MoE MLPs (4 experts, top 2, a shared expert)."""
    from transformers import Qwen3_5MoeConfig

    parts = _tiny_parts(vision_layers, moe=True)
    tok = parts.pop("tokenizer")
    return Qwen3_5MoeConfig(**parts), tok


_TINY_FRAME = {"frame_size": (16, 24)}


@register(
    "qwen3_5",
    models={"qwen3_5": "Qwen3_5ForConditionalGeneration"},
    tiny=_tiny,
    processor_inputs=processor_inputs,
    tiny_adapter_kwargs=_TINY_FRAME,
)
class Qwen35Adapter(Qwen3VideoAdapter):
    """Qwen3.5 (module docstring): Qwen3-VL's video layout without DeepStack, a hybrid decoder."""

    def _lm(self, batch: MaskedBatch, use_cache: bool = False, cache: Any = None):
        """The base forward; a new cache of a padded batch gets each row's own linear-attention
        states (module docstring: Cache)."""
        res = super()._lm(batch, use_cache=use_cache, cache=cache)
        if use_cache and cache is None:
            self._own_linear_states(batch, _cache_of(res))
        return res

    def _own_linear_states(self, batch: MaskedBatch, cache: Any) -> None:
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        linear = [(i, layer) for i, layer in enumerate(cache.layers) if isinstance(layer, LinearAttentionCacheLayerMixin)]
        width = batch.attention_mask.shape[1]
        for r in (batch.lengths < width).nonzero()[:, 0].tolist():
            alone = super()._lm(_row(batch, r), use_cache=True)
            mine = _cache_of(alone)
            for i, layer in linear:
                for s in range(layer.number_of_states):
                    if layer.is_conv_states_initialized[s]:
                        layer.conv_states[s][r].copy_(mine.layers[i].conv_states[s][0])
                    if layer.is_recurrent_states_initialized[s]:
                        layer.recurrent_states[s][r].copy_(mine.layers[i].recurrent_states[s][0])


def _cache_of(res: Any) -> Any:
    cache = getattr(res, "cache", None)
    return cache if cache is not None else getattr(res, "past_key_values", None)


def _row(batch: MaskedBatch, r: int) -> MaskedBatch:
    """Row ``r`` of a padded batch, without its padding."""
    L = int(batch.lengths[r])
    return MaskedBatch(
        batch.inputs_embeds[r : r + 1, :L], batch.attention_mask[r : r + 1, :L], batch.position_ids[..., r : r + 1, :L],
        batch.input_ids[r : r + 1, :L], batch.target_mask[r : r + 1, :L], batch.lengths[r : r + 1],
        batch.visual_mask[r : r + 1, :L], {k: v[r : r + 1, :L] for k, v in batch.side.items()},
    )


@register(
    "qwen3_5_moe",
    models={"qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"},
    tiny=_tiny_moe,
    processor_inputs=processor_inputs,
    tiny_adapter_kwargs=_TINY_FRAME,
)
class Qwen35MoeAdapter(Qwen35Adapter):
    """Qwen3.5-MoE: the same vision tower, processor, ``get_rope_index`` and hybrid decoder
    (``model.model.language_model``) with sparse-MoE MLPs; nothing in the adapter changes."""

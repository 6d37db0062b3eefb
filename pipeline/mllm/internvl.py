"""InternVL adapter (``InternVLForConditionalGeneration``: the HF-format InternVL3 / InternVL3.5
checkpoints, e.g. ``OpenGVLab/InternVL3-1B-hf``; 1-D RoPE).

Video path, as ``InternVLProcessor`` + ``InternVLVideoProcessor`` feed the model: every frame is
resized to the vision tower's ``image_size`` square (448 for the real models) and normalized
with the mean/std of the checkpoint's (video) preprocessor config, else ImageNet's
0.485.../0.229... (what transformers' InternVL converter writes; ``InternVLVideoProcessor``'s own
class default, CLIP's, is not what the checkpoints were trained with). A video frame is ONE tile: the video
processor has no dynamic tiling (``crop_to_patches`` is an image-only option). The frames go in
as ``pixel_values[T, 3, S, S]`` and the model's own ``get_image_features`` runs them: vision tower
(``vision_feature_layer``, CLS dropped by ``vision_feature_select_strategy="default"``), pixel
shuffle by ``downsample_ratio`` (0.5: 2x2 patches -> one token), projector. So ``X`` is
``[T' = T, N = (p*r)^2, D]`` with ``p = image_size / patch_size``, ``r = downsample_ratio``, each
frame's tokens in row-major order of the shuffled grid.

Layout: InternVL's chat template writes ``<video>`` (then ``\\n``) for a video item, and the
processor replaces that token by (``replace_video_token``)::

    "\\n".join(f"Frame{i+1}: <img>" + "<IMG_CONTEXT>" * N + "</img>" for i in range(T))

The frame labels, ``\\n`` separators and ``<img>``/``</img>`` are always-kept text; the
``<IMG_CONTEXT>`` positions (``config.image_token_id``) hold ``X``. The text between two special
tokens (``"Frame1: "``, then ``"\\nFrame{i+1}: "``) is tokenized on its own, as the processor's
tokenizer splits its text at special tokens; the first label joins the text before the video in
the processor's string, which tokenizes the same when that text ends in a newline or a special
token, as InternVL's chat template (``<|im_start|>user\\n<video>\\n...``) has it.
"""

from __future__ import annotations

import torch

from pipeline.mllm.base import MLLMAdapter
from pipeline.mllm.registry import TINY_WORDS, register, tiny_text_config, tiny_tokenizer

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
START_IMAGE_TOKEN = "<img>"
END_IMAGE_TOKEN = "</img>"
CONTEXT_IMAGE_TOKEN = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"


def frame_text(num_frames: int, n: int, start: str = START_IMAGE_TOKEN, end: str = END_IMAGE_TOKEN, ctx: str = CONTEXT_IMAGE_TOKEN) -> str:
    """The text ``InternVLProcessor.replace_video_token`` puts in place of ``<video>`` for a
    ``num_frames``-frame video with ``n`` tokens per frame."""
    return "\n".join(f"Frame{i + 1}: {start}{ctx * n}{end}" for i in range(num_frames))


def _tiny(vision_layers: int):
    """16x16 frames, patch 4 (4x4 patches), downsample 0.5 -> 2x2 tokens per frame; Qwen2 text."""
    from transformers import InternVLConfig

    # the real tokenizers' InternVL tokens (and ChatML turn markers, for chat-template tests);
    # "frame" for the per-frame labels (digits and ":" are tokens already)
    specials = [START_IMAGE_TOKEN, END_IMAGE_TOKEN, CONTEXT_IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]
    tok = tiny_tokenizer(specials, words=[*TINY_WORDS, "frame"])
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=vision_layers,
                           num_attention_heads=2, image_size=16, patch_size=4),
        text_config=dict(model_type="qwen2", **tiny_text_config(tok)),
        image_token_id=tok.convert_tokens_to_ids(CONTEXT_IMAGE_TOKEN), image_seq_length=4, downsample_ratio=0.5,
    )
    return cfg, tok


def _processor_inputs(adapter: InternVLAdapter, pixels: torch.Tensor, before: list[int], after: list[int]):
    """``InternVLProcessor``'s layout: ``<video>`` becomes :func:`frame_text` (tokenized as one
    string, like the processor's text) and the frames go in as ``pixel_values[T, 3, S, S]``
    (the processor flattens a video's frames into ``pixel_values``, one tile each)."""
    T = pixels.shape[0]
    _, gh, gw = adapter.visual_grid(T)
    video = adapter.tokenizer(frame_text(T, gh * gw), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([before + list(video) + after], device=pixels.device)
    x_positions = (ids[0] == adapter.image_token_id).nonzero()[:, 0].cpu()
    return {"input_ids": ids, "pixel_values": pixels}, x_positions


@register(
    "internvl",
    models={"internvl": "InternVLForConditionalGeneration"},
    tiny=_tiny,
    processor_inputs=_processor_inputs,
)
class InternVLAdapter(MLLMAdapter):
    position_dims = 1
    chat_video_text = VIDEO_TOKEN  # the chat template writes "<video>\n"; the processor replaces "<video>"

    def __init__(self, model, tokenizer, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        cfg = model.config
        vc = cfg.vision_config
        self.image_token_id = int(cfg.image_token_id)
        size, patch = _pair(vc.image_size), _pair(vc.patch_size)
        if size[0] != size[1] or patch[0] != patch[1]:
            raise ValueError(
                f"InternVL vision tower with image_size {size} and patch_size {patch}: the model's "
                "get_image_features reshapes the patches to a square grid, so both must be square"
            )
        p = size[0] // patch[0]
        ratio = float(cfg.downsample_ratio)
        side = p * ratio
        if ratio <= 0 or side != int(side) or (1 / ratio) != int(1 / ratio) or side < 1:
            raise ValueError(
                f"InternVL pixel shuffle: a {p}x{p} patch grid (image_size {size[0]} / patch_size {patch[0]}) "
                f"cannot be downsampled by downsample_ratio={ratio} (need an integer 1/ratio dividing {p})"
            )
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: InternVL's pixel shuffle "
                "needs the CLS token dropped ('default'); with it the patch tokens do not form a square grid"
            )
        if not isinstance(cfg.vision_feature_layer, int):
            raise ValueError(f"vision_feature_layer={cfg.vision_feature_layer!r}: InternVL selects one vision layer (an int)")
        self._image_size = size[0]
        self._grid = (int(side), int(side))
        self.start_image_token_id = self._special_id("start_image_token", START_IMAGE_TOKEN)
        self.end_image_token_id = self._special_id("end_image_token", END_IMAGE_TOKEN)
        self._labels: list[list[int]] = []  # token ids of "Frame{i+1}: " / "\nFrame{i+1}: " by frame

    def _special_id(self, name: str, default: str) -> int:
        """Id of a named InternVL tokenizer token (``tokenizer.start_image_token`` ...; the real
        tokenizers name them), else of its usual text; ValueError if the tokenizer lacks it."""
        text = getattr(self.tokenizer, name, None) or default
        i = self.tokenizer.convert_tokens_to_ids(text)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if i is None or (unk is not None and i == unk):
            raise ValueError(f"the tokenizer has no {text!r} token (InternVL's image {name.split('_')[0]} marker)")
        return int(i)

    @property
    def frame_size(self) -> tuple[int, int]:
        return (self._image_size, self._image_size)

    @property
    def image_mean_std(self):
        return self._mean_std(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

    def visual_grid(self, num_frames: int) -> tuple[int, int, int]:
        return (int(num_frames), *self._grid)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # the model's own image path: each frame is one tile; [T, N, D] in the order the
        # forward scatters them into the <IMG_CONTEXT> positions
        return self.model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output

    def _label(self, f: int) -> list[int]:
        while len(self._labels) <= f:
            i = len(self._labels)
            text = f"Frame{i + 1}: " if i == 0 else f"\nFrame{i + 1}: "
            self._labels.append(self._tokenize(text, bos=False))
        return self._labels[f]

    def _video_layout(self, t: int, n: int) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        slots: list[int] = []
        for f in range(t):
            label = self._label(f)
            ids += label + [self.start_image_token_id] + [self.image_token_id] * n + [self.end_image_token_id]
            slots += [-1] * (len(label) + 1) + list(range(f * n, (f + 1) * n)) + [-1]
        return ids, slots


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))

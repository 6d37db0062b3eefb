"""The frozen-MLLM interface and the machinery all adapters share.

An adapter wraps a Hugging Face multimodal ``...ForConditionalGeneration`` model and exposes:

* ``encode_video(frames) -> X[T', N, D]``: vision tower + projector, in the LLM's embedding
  width, on a fixed per-frame grid (``visual_grid``). Tokens that are always kept (LLaVA-OV's
  ``image_newline``, Idefics3's per-frame wrapper tokens) are not part of ``X``.
* ``score(X, keep, prompts, targets) -> CE[B, G]``: mean NLL of the target tokens with only the
  kept visual tokens in the sequence; all ``B*G`` sequences run as ONE right-padded batch.
* ``prefill`` / ``generate`` with a sorted keep index, and ``option_logprobs`` for
  multiple-choice answers (one batch over the options).

How a masked sequence is built (the same for every class): the prompt (a user turn, or a whole
conversation) and the target (the assistant's answer) are rendered with the checkpoint's own chat
template, or the plain one (``pipeline/mllm/chat.py``); the single ``<video>`` placeholder is expanded into the model's own visual token layout (a *template*); each template
position is text (always kept), a visual token ``j`` of ``X`` (kept where the mask says so) or
an always-kept extra. Input embeddings are the token embeddings with the visual features
written into their slots (what the models do with ``masked_scatter``); then the kept positions
are gathered, in original order, into a right-padded batch with an attention mask and explicit
position ids, and the language model runs on ``inputs_embeds``. Position ids are those of the
FULL (unpruned) sequence sliced to the kept tokens (1-D RoPE: ``0..L-1`` of the full sequence;
Qwen2-VL M-RoPE: the model's own ``get_rope_index``), or ``0..L_kept-1`` with
``compact_positions=True``. With every token kept this is exactly the model's own forward.

Two hooks serve families whose language model needs more than the merged embeddings (Qwen3-VL's
DeepStack): ``_encode`` may return per-visual-token *side features* next to ``X``; they are
kept or dropped with the tokens of ``X`` (``_build``, the one place a keep mask is applied) and
reach the batch as ``MaskedBatch.side``; ``_lm_kwargs(batch)`` turns them into extra keyword
arguments of the language model's forward. By default there are none of either.

The model is frozen (``eval()``, ``requires_grad=False``); work runs under
``torch.inference_mode`` and returned tensors are cloned outside it, so that ``X`` can feed a
trainable policy.
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.mllm.chat import VIDEO_PLACEHOLDER, chat_format, conversation

#: a prompt: a user turn's text holding ``<video>`` once, or a conversation (pipeline/mllm/chat.py)
Prompt = str | Sequence[Any]
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# template slot codes (non-negative codes index the visual table: X tokens, then extras)
_TEXT = -1
_PAD = -2


@dataclass
class PrefillOutput:
    """Result of a (pruned) prefill.

    logits: ``[V]`` float32 next-token logits at the last prompt position.
    past_key_values: the transformers ``Cache`` over the kept sequence (``cache_length`` tokens).
    next_position_ids: position ids of the next token, shaped for a batch of one token:
        ``[1, 1]`` (1-D RoPE) or ``[3, 1, 1]`` (M-RoPE). It is ``max(position ids of the full,
        unpruned sequence) + 1`` (``cache_length`` with compact positions): what the model's own
        ``generate`` uses after an unpruned prefill.
    cache_length: tokens in the cache (kept visual tokens + always-kept tokens + text).
    full_length: length of the same prompt with every visual token.
    """

    logits: torch.Tensor
    past_key_values: Any
    next_position_ids: torch.Tensor
    cache_length: int
    full_length: int


@dataclass
class MaskedBatch:
    """One right-padded batch of masked sequences, ready for the language model.

    inputs_embeds ``[R, L, D]``, attention_mask ``[R, L]`` (long, 1 = real token),
    position_ids ``[R, L]`` or ``[3, R, L]`` (M-RoPE), input_ids ``[R, L]`` (visual slots hold
    the placeholder id, padding the pad id), target_mask ``[R, L]`` (True on target tokens),
    lengths ``[R]``, visual_mask ``[R, L]`` (True where a kept token of ``X`` sits; not on
    always-kept extras), side: the kept side features by name, ``[R, L, ...]`` aligned with
    the sequence (zero off ``visual_mask``): ``side[k][visual_mask]`` lists every row's kept
    features in order, and row ``r`` alone is ``side[k][r][visual_mask[r]]``.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    input_ids: torch.Tensor
    target_mask: torch.Tensor
    lengths: torch.Tensor
    visual_mask: torch.Tensor
    side: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Template:
    ids: torch.Tensor  # [L] long
    slot: torch.Tensor  # [L] long: _TEXT, or index into the visual table
    target: torch.Tensor  # [L] bool


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def processor_settings(model_dir: str | Path | None) -> dict:
    """``image_mean``/``image_std``/``size``/``rescale_factor``... from the model directory's
    ``video_preprocessor_config.json`` (preferred) or ``preprocessor_config.json``; ``{}`` if none."""
    if model_dir is None:
        return {}
    out: dict = {}
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):  # later wins
        out.update(_read_json(Path(model_dir) / name))
    return out


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class MLLMAdapter(ABC):
    """A frozen multimodal LLM seen through the project's interface (module docstring)."""

    video_placeholder: str = VIDEO_PLACEHOLDER
    #: what the checkpoint's chat template writes for a video item; ``_video_layout`` replaces it
    chat_video_text: str = VIDEO_PLACEHOLDER
    #: position-id rows: 1 (1-D RoPE) or 3 (M-RoPE)
    position_dims: int = 1
    #: longest video accepted by encode_video (frames); None = no limit
    max_frames: int | None = None
    #: target positions per lm_head chunk (bounds the [n, vocab] logits buffer)
    logits_chunk: int = 1024

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        processor_dir: str | Path | None = None,
        compact_positions: bool = False,
        chat_template: str = "auto",
    ) -> None:
        self.model = freeze(model)
        self.tokenizer = tokenizer
        self.chat = chat_format(tokenizer, processor_dir, self.chat_video_text, chat_template)
        self.compact_positions = bool(compact_positions)
        first = next(model.parameters())
        self.device = first.device
        self.dtype = first.dtype
        self.processor = processor_settings(processor_dir)
        self.pad_token_id = self._pad_id()
        lm = self.language_model
        self._cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        # token templates and full-sequence position maxima per (prompt, target, T', N): a rollout
        # or an evaluation asks for the same few prompts thousands of times (read-only tensors)
        self._memo: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ per-class hooks
    @classmethod
    def check_config(cls, config: dict) -> None:
        """A ValueError naming what this family cannot serve in a checkpoint's ``config.json``
        (read before any model is built; the adapter's constructor checks the same). Default: nothing."""

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (no LM head) that takes ``inputs_embeds`` (where most
        ``...ForConditionalGeneration`` classes keep it)."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    @property
    def embed_tokens(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.embed_tokens.weight.shape[-1]

    @torch.no_grad()
    def question_embeddings(self, prompt: str) -> torch.Tensor:
        """``[L, D]`` float32 (CPU): the frozen LM's input embeddings of the prompt's words, what a
        question-aware SCORE policy reads. The words are the user turns' text (a
        :class:`~pipeline.mllm.chat.ChatPrompt`'s, or the plain prompt) without the video
        placeholder or chat markup; no special tokens. A prompt of no words gives ``[0, D]``."""
        text = " ".join(c for role, c in conversation(prompt) if role == "user")
        text = " ".join(text.replace(self.video_placeholder, " ").split())
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.embed_tokens.weight.device)
        return self.embed_tokens(ids_t).float().cpu()

    @property
    @abstractmethod
    def frame_size(self) -> tuple[int, int]:
        """(H, W) every frame is resized to (the fixed grid)."""

    @abstractmethod
    def visual_grid(self, num_frames: int) -> tuple[int, int, int]:
        """``(T', gh, gw)`` of ``X`` for a video of ``num_frames`` frames; ``N = gh * gw``."""

    @abstractmethod
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Normalized frames ``[T, 3, H, W]`` (model dtype) -> ``X[T', N, D]``, or ``(X, side)``
        with ``side`` per-visual-token features by name, each ``[T', N, ...]`` or ``[T'*N, ...]``:
        whatever the language model needs per kept token besides its embedding (e.g. DeepStack's
        per-level features). They are sliced with the same keep mask as ``X`` and passed to
        :meth:`_lm_kwargs` in ``MaskedBatch.side``."""

    def _lm_kwargs(self, batch: MaskedBatch) -> dict[str, Any]:
        """Extra keyword arguments of the language model's forward on a masked batch (score,
        prefill, option_logprobs), built from ``batch.side``, ``batch.visual_mask`` and
        ``batch.position_ids``; e.g. DeepStack's ``visual_pos_masks=batch.visual_mask`` and
        ``deepstack_visual_embeds=[f[batch.visual_mask] for f in levels]``. The decode steps
        after a prefill carry no visual token and do not call it. Default: none."""
        return {}

    @abstractmethod
    def _video_layout(self, t: int, n: int) -> tuple[list[int], list[int]]:
        """Token ids and slot codes that replace the placeholder for a ``t x n`` grid: a slot
        code ``j`` in ``0..t*n-1`` is visual token ``j`` of ``X``, ``t*n + e`` is extra ``e``,
        ``-1`` is an always-kept text token."""

    def _extras(self, X: torch.Tensor) -> torch.Tensor:
        """Always-kept visual embeddings appended to the visual table ``[E, D]``."""
        return X.new_zeros((0, X.shape[-1]))

    def _full_positions(self, ids: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Position ids ``[P, U, L]`` of the full (unpruned) padded templates (1-D: 0..L-1)."""
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return pos.masked_fill(~valid, 0).unsqueeze(0)

    # ------------------------------------------------------------------ preprocessing
    def _mean_std(self, default_mean: Sequence[float], default_std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.processor.get("image_mean", default_mean)
        std = self.processor.get("image_std", default_std)
        if isinstance(mean, (int, float)):
            mean = [mean] * 3
        if isinstance(std, (int, float)):
            std = [std] * 3
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    @property
    def image_mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mean_std(IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)

    def check_frames(self, frames: Any) -> torch.Tensor:
        """Validate and return frames as a uint8 tensor ``[T, H, W, 3]`` (ValueError/TypeError naming the problem)."""
        if isinstance(frames, (list, tuple)):
            if not frames:
                raise ValueError("frames: got an empty list (need at least 1 frame)")
            shapes = {tuple(np.shape(f)) for f in frames}
            if len(shapes) > 1:
                raise ValueError(f"frames have different sizes: {sorted(shapes)} (all frames of a video must share H, W)")
            frames = torch.from_numpy(np.stack([np.asarray(f) for f in frames]))  # a new (writable) array
        elif isinstance(frames, np.ndarray):
            # torch.from_numpy shares the memory and warns on a read-only array (a decoded or
            # Arrow-backed video): copy those
            frames = torch.from_numpy(np.ascontiguousarray(frames) if frames.flags.writeable else frames.copy())
        elif not isinstance(frames, torch.Tensor):
            raise TypeError(f"frames must be a uint8 numpy array or torch tensor [T,H,W,3], got {type(frames).__name__}")
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8 RGB [T,H,W,3] (0..255), got dtype {frames.dtype}")
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must have shape [T, H, W, 3] (channels last, RGB), got {tuple(frames.shape)}")
        t, h, w, _ = frames.shape
        if t < 1:
            raise ValueError("frames: got 0 frames (need at least 1)")
        if self.max_frames is not None and t > self.max_frames:
            raise ValueError(f"frames: got {t} frames, this adapter accepts at most {self.max_frames}")
        if h < 2 or w < 2:
            raise ValueError(f"frames: frame size {h}x{w} is too small (need at least 2x2 pixels)")
        return frames

    def preprocess(self, frames: Any) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` -> normalized float ``[T, 3, H', W']`` at :attr:`frame_size`
        (bicubic, antialiased, like the model's processor), in the model's dtype and device."""
        frames = self.check_frames(frames)
        x = frames.to(self.device).permute(0, 3, 1, 2).float()
        size = tuple(self.frame_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 255)
        x = x * float(self.processor.get("rescale_factor", 1 / 255))
        mean, std = self.image_mean_std
        x = (x - mean.to(x.device)[:, None, None]) / std.to(x.device)[:, None, None]
        return x.to(self.dtype)

    def encode_video(self, frames: Any) -> torch.Tensor:
        """uint8 frames ``[T, H, W, 3]`` -> ``X[T', N, D]`` (model dtype, not an inference tensor)."""
        return self.encode_video_with_side(frames)[0]

    def encode_video_with_side(self, frames: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(X, side)``: :meth:`encode_video` and the family's per-token side features, each
        ``[T', N, ...]`` (``{}`` for most families); pass ``side`` on to score/prefill/generate."""
        with torch.inference_mode():
            pixels = self.preprocess(frames)
            out = self._encode(pixels)
        X, side = out if isinstance(out, tuple) else (out, {})
        t, gh, gw = self.visual_grid(pixels.shape[0])
        assert X.shape == (t, gh * gw, self.hidden_size), (X.shape, (t, gh, gw))
        side = self._flat_side(side, (t, gh * gw))
        return X.clone(), {k: v.unflatten(0, (t, gh * gw)).clone() for k, v in side.items()}

    # ------------------------------------------------------------------ text / templates
    def _pad_id(self) -> int:
        for v in (
            getattr(self.tokenizer, "pad_token_id", None),
            getattr(self.tokenizer, "eos_token_id", None),
        ):
            if v is not None:
                return int(v)
        return 0

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for v in (getattr(gen, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(i) for i in v)
        return ids

    def _tokenize(self, text: str, bos: bool) -> list[int]:
        """Token ids of ``text``; ``bos``: with the tokenizer's special tokens (an empty text then
        gives what the tokenizer puts before any text, e.g. ``[<bos>]``)."""
        if not text and not bos:
            return []
        return list(self.tokenizer(text, add_special_tokens=bos)["input_ids"])

    def _memoised(self, key: tuple, make: Any) -> Any:
        if key not in self._memo:
            if len(self._memo) >= 4096:  # bounded: prompts are few, but a caller may vary them
                self._memo.clear()
            self._memo[key] = make()
        return self._memo[key]

    def _template(self, prompt: Prompt, target: str | None, t: int, n: int) -> _Template:
        return self._memoised(("template", _key(prompt), target, t, n), lambda: self._make_template(prompt, target, t, n))

    def _make_template(self, prompt: Prompt, target: str | None, t: int, n: int) -> _Template:
        """Token ids, slots and target flags of a conversation (:mod:`pipeline.mllm.chat`): its
        pieces tokenized one by one, the placeholder replaced by :meth:`_video_layout`. A
        conversation that ends in a user turn gets the assistant's generation header."""
        conv = conversation(prompt, target)
        pieces = self.chat.segments(conv, generation=conv[-1][0] != "assistant")
        ids: list[int] = []
        slot: list[int] = []
        is_tgt: list[bool] = []

        def add(tokens: list[int], slots: list[int] | None = None, target: bool = False) -> None:
            ids.extend(tokens)
            slot.extend([_TEXT] * len(tokens) if slots is None else slots)
            is_tgt.extend([target] * len(tokens))

        for k, (text, target_piece) in enumerate(pieces):
            bos = k == 0 and self.chat.adds_bos
            if target_piece:
                tokens = self._tokenize(text, bos)
                if not tokens:
                    raise ValueError(f"target {text!r} tokenizes to no tokens (nothing to score)")
                add(tokens, target=True)
            elif VIDEO_PLACEHOLDER in text:
                before, after = text.split(VIDEO_PLACEHOLDER)
                add(self._tokenize(before, bos))
                add(*self._video_layout(t, n))
                add(self._tokenize(after, False))
            else:
                add(self._tokenize(text, bos))
        return _Template(
            torch.tensor(ids, dtype=torch.long),
            torch.tensor(slot, dtype=torch.long),
            torch.tensor(is_tgt, dtype=torch.bool),
        )

    # ------------------------------------------------------------------ masked batches
    def _check_X(self, X: torch.Tensor, batched: bool) -> torch.Tensor:
        want = 4 if batched else 3
        if not isinstance(X, torch.Tensor) or X.ndim != want:
            shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
            raise ValueError(f"X must be a tensor [{'B, ' if batched else ''}T', N, D], got {shape}")
        if X.shape[-1] != self.hidden_size:
            raise ValueError(f"X has width {X.shape[-1]}, the language model's embedding width is {self.hidden_size}")
        n = X.shape[-2]
        _, gh, gw = self.visual_grid(self._frames_for(X.shape[-3]))
        if n != gh * gw:
            raise ValueError(f"X has {n} tokens per frame, this model's grid has {gh}x{gw} = {gh * gw}")
        return X.to(self.device, self.dtype)

    def _flat_side(self, side: dict[str, torch.Tensor] | None, lead: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Side features checked against ``lead`` (``(T', N)`` or ``(B, T', N)``) with the token
        axes flattened (``[..., T'*N, ...]``), on the adapter's device (dtype kept)."""
        if not side:
            return {}
        if not isinstance(side, dict):
            raise TypeError(f"side features must be a dict of tensors, got {type(side).__name__}")
        *outer, t, n = lead
        k = len(outer)
        names = "B, " * k
        out = {}
        for name, v in side.items():
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else None
            if shape is not None and shape[: k + 1] == (*outer, t * n):
                out[name] = v.to(self.device)
            elif shape is not None and shape[: k + 2] == (*outer, t, n):
                out[name] = v.flatten(k, k + 1).to(self.device)
            else:
                got = shape if shape is not None else type(v).__name__
                raise ValueError(
                    f"side feature {name!r} must have shape [{names}T', N, ...] = {(*outer, t, n)} or "
                    f"[{names}T'*N, ...] = {(*outer, t * n)} (then any trailing axes), got {got}"
                )
        return out

    def _frames_for(self, t_prime: int) -> int:
        """A frame count whose grid has ``t_prime`` temporal steps (identity unless temporal patches)."""
        return t_prime

    def _build(
        self,
        vis: torch.Tensor,
        templates: list[_Template],
        unit_sample: torch.Tensor,
        row_unit: torch.Tensor,
        row_keep: torch.Tensor,
        grid: tuple[int, int, int],
        side: dict[str, torch.Tensor] | None = None,
    ) -> MaskedBatch:
        """Gather the kept positions of each row into one right-padded batch.

        vis ``[S, TN+E, D]`` visual tables; templates: U units (unit u uses sample
        ``unit_sample[u]``); rows: ``row_unit[r]`` and visual keep ``row_keep[r, TN]``; side
        features ``[S, TN, ...]`` are gathered with the same kept positions as the tokens.
        """
        dev = self.device
        tn = row_keep.shape[1]
        U = len(templates)
        Lf = max(int(t.ids.numel()) for t in templates)
        ids_f = torch.full((U, Lf), self.pad_token_id, dtype=torch.long)
        slot_f = torch.full((U, Lf), _PAD, dtype=torch.long)
        tgt_f = torch.zeros((U, Lf), dtype=torch.bool)
        for u, t in enumerate(templates):
            L = t.ids.numel()
            ids_f[u, :L], slot_f[u, :L], tgt_f[u, :L] = t.ids, t.slot, t.target
        ids_f, slot_f, tgt_f = ids_f.to(dev), slot_f.to(dev), tgt_f.to(dev)
        valid_f = slot_f != _PAD
        pos_f = self._full_positions(ids_f, slot_f, valid_f, grid)  # [P, U, Lf]

        # which full positions each row keeps
        row_unit = row_unit.to(dev)
        row_keep = row_keep.to(dev).bool()
        is_vis = slot_f >= 0
        always = (slot_f == _TEXT) | (slot_f >= tn)  # text and extras
        vis_slot = is_vis & (slot_f < tn)
        slot_r = slot_f[row_unit]
        kept_vis = torch.gather(row_keep, 1, slot_r.clamp(0, tn - 1)) & vis_slot[row_unit]
        keep_f = always[row_unit] | kept_vis  # [R, Lf]
        lengths = keep_f.sum(1)
        Lmax = int(lengths.max())
        order = torch.sort((~keep_f).to(torch.int8), dim=1, stable=True).indices[:, :Lmax]  # kept first, in order
        am = torch.arange(Lmax, device=dev).unsqueeze(0) < lengths.unsqueeze(1)
        ru = row_unit.unsqueeze(1)
        # embeddings of the gathered positions only (a pruned row embeds K tokens, not the full
        # sequence): token embeddings, visual slots taken from the visual table
        ids_k, slot_k = ids_f[ru, order], slot_f[ru, order]
        emb = self.embed_tokens(ids_k)
        width = vis.shape[1]
        flat = (unit_sample.to(dev)[row_unit].unsqueeze(1) * width + slot_k.clamp(min=0)).flatten()
        feats = vis.reshape(-1, vis.shape[-1]).index_select(0, flat).view(*slot_k.shape, -1).to(emb.dtype)
        embeds = torch.where((slot_k >= 0).unsqueeze(-1), feats, emb)
        input_ids = torch.where(am, ids_k, self.pad_token_id)
        target = tgt_f[ru, order] & am
        if self.compact_positions:
            pos = torch.arange(Lmax, device=dev).expand(self.position_dims, len(row_unit), Lmax)
        else:
            pos = pos_f[:, ru, order]
        pos = pos.masked_fill(~am.unsqueeze(0), 0)
        if self.position_dims == 1:
            pos = pos[0]
        visual = am & (slot_k >= 0) & (slot_k < tn)  # kept tokens of X (not the extras)
        kept_side = {}
        if side:
            sample = unit_sample.to(dev)[row_unit].unsqueeze(1)
            idx = slot_k.clamp(0, tn - 1)
            for name, v in side.items():
                g = v[sample, idx]  # [R, Lmax, ...]
                on = visual.reshape(*visual.shape, *([1] * (g.ndim - 2)))
                kept_side[name] = torch.where(on, g, torch.zeros((), dtype=g.dtype, device=g.device))
        return MaskedBatch(embeds, am.long(), pos.contiguous(), input_ids, target, lengths, visual, kept_side)

    def _lm(self, batch: MaskedBatch, use_cache: bool = False, cache: Any = None):
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        return self.language_model(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=use_cache,
            **kwargs,
            **self._lm_kwargs(batch),
        )

    def _target_nll(self, hidden: torch.Tensor, batch: MaskedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of target-token NLL and target count per row (float32)."""
        pred = batch.target_mask[:, 1:]
        h = hidden[:, :-1][pred]
        labels = batch.input_ids[:, 1:][pred]
        rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1).expand_as(pred)[pred]
        nll = torch.empty(h.shape[0], dtype=torch.float32, device=hidden.device)
        head = self.lm_head
        for s in range(0, h.shape[0], self.logits_chunk):
            logits = head(h[s : s + self.logits_chunk]).float()
            nll[s : s + self.logits_chunk] = F.cross_entropy(logits, labels[s : s + self.logits_chunk], reduction="none")
        sums = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add_(0, rows, nll)
        return sums, pred.sum(1)

    def _check_keep(self, keep: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(keep, torch.Tensor) or tuple(keep.shape) != shape:
            got = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"keep mask must have shape {shape} (B, G, T'*N), got {got}")
        if keep.dtype != torch.bool:
            if keep.is_floating_point() or not torch.isin(keep, torch.tensor([0, 1], device=keep.device)).all():
                raise ValueError(f"keep mask must be boolean (or 0/1 integers), got dtype {keep.dtype}")
            keep = keep.bool()
        empty = (~keep.any(-1)).nonzero()
        if len(empty):
            b, g = empty[0].tolist()
            raise ValueError(
                f"all-zero keep mask: sample {b}, mask {g} keeps no visual token "
                f"({len(empty)} such mask(s)); keep at least one token"
            )
        return keep

    def masked_batch(
        self, X: torch.Tensor, keep: torch.Tensor, prompts: Sequence[Prompt], targets: list[str] | None = None, *, side: dict | None = None
    ) -> MaskedBatch:
        """The ``B*G``-row padded batch that :meth:`score` feeds to the language model
        (row ``b*G + g`` is sample ``b`` under mask ``g``)."""
        with torch.inference_mode():
            return self._masked_batch(X, keep, prompts, targets, side=side)

    def _masked_batch(self, X, keep, prompts, targets, *, side=None) -> MaskedBatch:
        X = self._check_X(X, batched=True)
        B, T, N, _ = X.shape
        if len(prompts) != B:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {B} videos")
        if targets is not None and len(targets) != B:
            raise ValueError(f"got {len(targets)} targets for a batch of {B} videos")
        if not isinstance(keep, torch.Tensor) or keep.ndim != 3:
            got = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"keep mask must have shape (B, G, T'*N) = ({B}, G, {T * N}), got {got}")
        G = keep.shape[1]
        keep = self._check_keep(keep, (B, G, T * N))
        side = self._flat_side(side, (B, T, N))
        templates = [self._template(p, None if targets is None else targets[b], T, N) for b, p in enumerate(prompts)]
        vis = torch.cat([X.flatten(1, 2), torch.stack([self._extras(x) for x in X])], dim=1)
        grid = (T, *self.visual_grid(self._frames_for(T))[1:])
        unit_sample = torch.arange(B)
        row_unit = torch.arange(B).repeat_interleave(G)
        return self._build(vis, templates, unit_sample, row_unit, keep.reshape(B * G, T * N), grid, side)

    def score(
        self, X: torch.Tensor, keep: torch.Tensor, prompts: Sequence[Prompt], targets: list[str], *, side: dict | None = None
    ) -> torch.Tensor:
        """Mean NLL of each target under each mask: ``X[B,T',N,D]``, ``keep[B,G,T'*N]`` (bool),
        ``B`` prompts (each with one ``<video>``) and targets -> ``[B, G]`` float32.
        All ``B*G`` sequences run as one right-padded batch. ``side``: the side features of
        :meth:`encode_video_with_side`, stacked over the batch (``[B, T', N, ...]``)."""
        if targets is None:
            raise ValueError("score needs targets")
        with torch.inference_mode():
            ce = self.target_ce(X, keep, prompts, targets, side=side)
        return ce.clone()

    def target_ce(
        self, X: torch.Tensor, keep: torch.Tensor, prompts: Sequence[Prompt], targets: list[str], *, side: dict | None = None
    ) -> torch.Tensor:
        """:meth:`score` without inference mode, so gradients flow: pre-training the project's
        own reference model goes through the same masked path that scores rollouts."""
        batch = self._masked_batch(X, keep, prompts, targets, side=side)
        hidden = self._lm(batch).last_hidden_state
        sums, counts = self._target_nll(hidden, batch)
        return (sums / counts.clamp(min=1)).view(len(prompts), -1)

    def _keep_from_index(self, keep_index: torch.Tensor, tn: int) -> torch.Tensor:
        if not isinstance(keep_index, torch.Tensor):
            keep_index = torch.as_tensor(keep_index)
        if keep_index.ndim != 1 or keep_index.dtype in (torch.bool,) or keep_index.is_floating_point():
            raise ValueError(f"keep_index must be a 1-D integer tensor of flat indices into T'*N={tn}, got {keep_index.dtype} {tuple(keep_index.shape)}")
        if keep_index.numel() == 0:
            raise ValueError("keep_index is empty: keep at least one visual token")
        ki = keep_index.long().cpu()
        if int(ki.min()) < 0 or int(ki.max()) >= tn:
            raise ValueError(f"keep_index out of range [0, {tn}): min {int(ki.min())}, max {int(ki.max())}")
        if ki.numel() > 1 and not bool((ki[1:] > ki[:-1]).all()):
            raise ValueError("keep_index must be sorted ascending without duplicates")
        mask = torch.zeros(tn, dtype=torch.bool)
        mask[ki] = True
        return mask

    def _single(
        self, X: torch.Tensor, keep_index: torch.Tensor, prompts_targets: list[tuple[Prompt, str | None]], side: dict | None = None
    ) -> MaskedBatch:
        X = self._check_X(X, batched=False)
        T, N, _ = X.shape
        mask = self._keep_from_index(keep_index, T * N).to(self.device)
        side = {k: v.unsqueeze(0) for k, v in self._flat_side(side, (T, N)).items()}
        templates = [self._template(p, tg, T, N) for p, tg in prompts_targets]
        vis = torch.cat([X.flatten(0, 1), self._extras(X)], dim=0).unsqueeze(0)
        grid = (T, *self.visual_grid(self._frames_for(T))[1:])
        U = len(templates)
        return self._build(vis, templates, torch.zeros(U, dtype=torch.long), torch.arange(U), mask.expand(U, -1), grid, side)

    def _next_position(self, batch: MaskedBatch, full_max: int | torch.Tensor) -> torch.Tensor:
        L = int(batch.lengths[0])
        nxt = L if self.compact_positions else int(full_max) + 1
        shape = (1, 1) if self.position_dims == 1 else (self.position_dims, 1, 1)
        return torch.full(shape, nxt, dtype=torch.long, device=self.device)

    def prefill(self, X: torch.Tensor, keep_index: torch.Tensor, prompt: Prompt, *, side: dict | None = None) -> PrefillOutput:
        """Run the prompt with only ``keep_index`` (sorted flat indices into ``T'*N``) visual
        tokens; returns the last position's logits and the cache for decoding. ``side``: the
        side features of :meth:`encode_video_with_side` (here and in the methods below)."""
        with torch.inference_mode():
            out, _ = self._prefill(X, keep_index, prompt, side)
        return out

    def _prefill(self, X, keep_index, prompt, side=None) -> tuple[PrefillOutput, MaskedBatch]:
        batch = self._single(X, keep_index, [(prompt, None)], side)
        full = self._full_position_max(X, prompt)
        res = self._lm(batch, use_cache=True)
        cache = getattr(res, "cache", None)
        if cache is None:
            cache = getattr(res, "past_key_values", None)
        L = int(batch.lengths[0])
        logits = self.lm_head(res.last_hidden_state[0, L - 1]).float()
        t, n = X.shape[0], X.shape[1]
        full_len = int(self._template(prompt, None, t, n).ids.numel())
        out = PrefillOutput(logits, cache, self._next_position(batch, full), L, full_len)
        return out, batch

    def _full_position_max(self, X: torch.Tensor, prompt: Prompt) -> int:
        """Largest position id of the full (unpruned) prompt sequence."""
        T, N = int(X.shape[0]), int(X.shape[1])
        return self._memoised(("position_max", _key(prompt), T, N), lambda: self._position_max(prompt, T, N))

    def _position_max(self, prompt: Prompt, T: int, N: int) -> int:
        t = self._template(prompt, None, T, N)
        ids, slot = t.ids.unsqueeze(0).to(self.device), t.slot.unsqueeze(0).to(self.device)
        grid = (T, *self.visual_grid(self._frames_for(T))[1:])
        return int(self._full_positions(ids, slot, torch.ones_like(ids, dtype=torch.bool), grid).max())

    def generate(
        self, X: torch.Tensor, keep_index: torch.Tensor, prompt: Prompt, max_new_tokens: int = 16, *, side: dict | None = None
    ) -> str:
        """Greedy decoding after a pruned prefill; stops at EOS. Returns the decoded text."""
        ids = self.generate_ids(X, keep_index, prompt, max_new_tokens, side=side)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate_ids(
        self, X: torch.Tensor, keep_index: torch.Tensor, prompt: Prompt, max_new_tokens: int = 16, *, side: dict | None = None
    ) -> list[int]:
        """Greedy token ids (EOS included when reached)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = self.eos_token_ids
        out: list[int] = []
        with torch.inference_mode():
            pre, _ = self._prefill(X, keep_index, prompt, side)
            cache, pos, length = pre.past_key_values, pre.next_position_ids, pre.cache_length
            tok = int(pre.logits.argmax())
            for step in range(max_new_tokens):
                out.append(tok)
                if tok in eos or step == max_new_tokens - 1:
                    break
                emb = self.embed_tokens(torch.tensor([[tok]], device=self.device))
                am = torch.ones((1, length + 1), dtype=torch.long, device=self.device)
                kwargs = {self._cache_kw: cache}
                res = self.language_model(inputs_embeds=emb, attention_mask=am, position_ids=pos, use_cache=True, **kwargs)
                cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None) or cache
                length += 1
                pos = pos + 1
                tok = int(self.lm_head(res.last_hidden_state[0, -1]).argmax())
        return out

    def option_logprobs(
        self, X: torch.Tensor, keep_index: torch.Tensor, prompt: Prompt, options: list[str], *, side: dict | None = None
    ) -> torch.Tensor:
        """Sum log-probability of each option as the answer after ``prompt`` (one padded batch
        over the options, same kept tokens) -> ``[len(options)]`` float32."""
        if not options:
            raise ValueError("options is empty")
        with torch.inference_mode():
            batch = self._single(X, keep_index, [(prompt, o) for o in options], side)
            hidden = self._lm(batch).last_hidden_state
            sums, _ = self._target_nll(hidden, batch)
        return (-sums).clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__}, dtype={self.dtype}, device={self.device})"


def stack_side(sides: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The side features of several videos (:meth:`MLLMAdapter.encode_video_with_side`) stacked
    into one batch ``{name: [B, T', N, ...]}`` (``{}`` when the family has none)."""
    if not sides or not sides[0]:
        return {}
    return {k: torch.stack([s[k] for s in sides]) for k in sides[0]}


def _key(prompt: Prompt) -> str | tuple:
    """A hashable memo key of a prompt (a conversation's normalized form)."""
    return prompt if isinstance(prompt, str) else conversation(prompt)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "MLLMAdapter",
    "PrefillOutput",
    "MaskedBatch",
    "VIDEO_PLACEHOLDER",
    "processor_settings",
    "stack_side",
    "freeze",
]

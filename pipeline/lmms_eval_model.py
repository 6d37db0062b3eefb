"""lmms-eval model ``score``: any supported MLLM with any token selector, inside lmms-eval.

    pip install -e '.[eval]' && pip install --no-deps lmms-eval==0.7.3   # why two steps: docs/lmms-eval.md
    lmms-eval --model score \
        --model_args pretrained=.cache/score-tiny,compressor=runs/score-demo/final/policy,retention=0.1,method=score,num_frames=16 \
        --tasks shapes_video_qa --include_path lmms_tasks --batch_size 8

The package registers the model through the ``lmms_eval.models`` entry-point group
(:func:`manifest`); no fork of lmms-eval is needed. ``--model score`` resolves to the chat class
:class:`ScoreChat` (``generate_until`` from the task's ``doc_to_messages``, the video taken from the
messages); ``--force_simple`` gives :class:`ScoreSimple`, which also serves multiple-choice
(``loglikelihood``) tasks. Both share :class:`ScoreLMM`.

Model arguments (``--model_args k=v,...``):

* ``pretrained``: the frozen MLLM, any checkpoint the adapters load (``save_pretrained`` layout, a
  local directory or ``s3://``; ``pipeline.mllm.loader.load_mllm``).
* ``compressor``: a trained SCORE policy directory (local or ``s3://``); its token width must be the
  MLLM's.
* ``method``: ``score`` (needs ``compressor``) or a baseline: ``random``, ``uniform``,
  ``uniform_spatial``, ``fastv``, ``visionzip``, ``dycoke``, ``fastvid``; ``full`` keeps every
  token. Default: ``score`` with a compressor, else ``full``.
* ``retention``: the kept share of the visual tokens, in (0, 1]; ``K = ceil(retention * T'*N)``
  per video, as in ``jobs/evaluate.py``. ``retention=1.0`` is the full-token reference whatever
  the method.
* ``num_frames`` (16): frames sampled uniformly over the whole clip (``round(linspace(0, n-1,
  num_frames))``, PyAV), resized to the model's frame size (``pipeline.inference.read_frames``).
* ``seed`` (0), ``fastv_layer`` (2), ``min_per_frame`` (the compressor's), ``dtype`` (float32),
  ``attn_implementation`` (sdpa), ``device`` (cuda when available), ``max_new_tokens`` (the task's),
  ``chat_template`` (``auto``: the checkpoint's chat template when it has one, else the plain
  prompt; ``none``: always plain), ``system_prompt``, ``compact_positions``.

The prompt: the messages' parts in order, each video as the adapter's ``<video>`` placeholder,
joined by a space (plain) or, with the checkpoint's chat template, a conversation with each turn's
parts joined by a newline, which the adapter renders as training does (pipeline/mllm/chat.py). The shapes task's user turn ``[video, "question : q
answer :"]`` thus reads exactly ``qa_prompt(q)``, the prompt ``jobs/evaluate.py`` scores.

Batching: ``--batch_size B`` runs ``B`` requests as one right-padded batch (the adapter's
``masked_batch``: each row keeps its own tokens and the position ids of its full sequence), then
greedy decoding of all rows together over one KV cache; ``loglikelihood`` scores ``B``
(context, continuation) pairs in one forward. The answers are those of ``--batch_size 1``.
Per-request seeds (``random``) are ``seed * 100003 + doc_id``: ``jobs/evaluate.py``'s for the
``doc_id``-th video.

``python -m pipeline.lmms_eval_model export-task WORLD [--out FILE]`` writes the shapes task's
JSONL (one document per annotated held-out video of a world, in ``jobs/evaluate.py``'s order).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.mllm.base import stack_side
from pipeline.mllm.chat import conversation

try:  # the harness is an optional extra: this module (and the exporter) import without it
    from lmms_eval.api.instance import GenerationResult as _GenerationResult
    from lmms_eval.api.model import lmms as _LMMBase

    _LMMS_EVAL_ERROR: ImportError | None = None
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    _LMMBase = object  # type: ignore[assignment,misc]
    _GenerationResult = None  # type: ignore[assignment,misc]
    _LMMS_EVAL_ERROR = _e

log = logging.getLogger(__name__)

MODEL_ID = "score"
#: token selectors the model accepts besides ``score``; ``oracle`` needs world annotations and is
#: only in ``jobs/evaluate.py``
BASELINES = ("random", "uniform", "uniform_spatial", "fastv", "visionzip", "dycoke", "fastvid")
METHODS = ("score", *BASELINES, "full")
TASK_FILE = "shapes_video_qa.jsonl"  # under <world>/heldout/


if _GenerationResult is not None:
    from dataclasses import dataclass

    @dataclass
    class Scored(_GenerationResult):  # type: ignore[misc,valid-type]
        """A ``loglikelihood`` answer, ``(nll, greedy)``: unpacks as that pair. lmms-eval 0.7.3's
        evaluator passes every model output through ``unwrap_generation_output``, which turns a
        bare ``(float, bool)`` tuple into its ``str`` (and multiple-choice scoring then fails);
        a ``GenerationResult`` whose ``text`` is the pair reaches the task intact."""

        def __iter__(self):
            return iter(self.text)

        def __getitem__(self, i):
            return self.text[i]

        def __len__(self) -> int:
            return len(self.text)

        def __eq__(self, other):
            return tuple(self.text) == tuple(other)
else:  # pragma: no cover
    Scored = None  # type: ignore[assignment,misc]


class BadRequest(ValueError):
    """A request the model cannot answer (no video, several videos, an unreadable one)."""


def manifest():
    """The ``lmms_eval.models`` entry point: ``--model score`` (chat) and, with ``--force_simple``,
    the simple class (for ``loglikelihood`` / multiple-choice tasks)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, chat_class_path=f"{__name__}.ScoreChat",
                         simple_class_path=f"{__name__}.ScoreSimple")


# ------------------------------------------------------------------------------------------------
# arguments

def parse_retention(value: Any) -> float:
    try:
        r = float(value)
    except (TypeError, ValueError):
        r = float("nan")
    if not 0.0 < r <= 1.0:  # (nan fails too)
        raise ValueError(f"retention={value!r}: must be a ratio in (0, 1] (1.0 keeps every visual token: the full-token reference)")
    return r


def resolve_method(method: Any, compressor: Any) -> str:
    """``method`` checked against :data:`METHODS`; ``None``: ``score`` with a compressor, else ``full``."""
    if method is None or method == "":
        return "score" if compressor else "full"
    name = str(method).strip().lower()
    if name not in METHODS:
        raise ValueError(f"method={method!r} is not a known method; known: {', '.join(METHODS)}")
    if name == "score" and not compressor:
        raise ValueError("method=score needs compressor=DIR (a trained SCORE policy); without one, pick a baseline "
                         f"({', '.join(BASELINES)}) or retention=1.0 for the full-token reference")
    return name


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _as_int(name: str, value: Any, lo: int = 1) -> int:
    try:
        v = int(value)
        if v != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: must be an integer") from None
    if v < lo:
        raise ValueError(f"{name}={value!r}: must be >= {lo}")
    return v


# ------------------------------------------------------------------------------------------------
# messages -> (prompt, video)

def _video_source(item: Any) -> Any:
    """A message's / doc_to_visual's video entry -> a path or bytes."""
    if isinstance(item, dict):
        for key in ("url", "path", "video"):
            if item.get(key) is not None:
                return _video_source(item[key])
        raise BadRequest(f"video entry {sorted(item)} names no file (url / path / video)")
    if isinstance(item, (str, os.PathLike, bytes)):
        return item
    raise BadRequest(f"video entry of type {type(item).__name__}: give a file path")


def message_parts(messages: Sequence[dict]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """``[(role, [(kind, value), ...]), ...]`` with kind ``text``/``video``/``image``/``audio``;
    a message's content may be a string or a list of ``{"type": ..., ...}`` items."""
    out = []
    for m in messages:
        role = m.get("role", "user") if isinstance(m, dict) else getattr(m, "role", "user")
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        parts: list[tuple[str, Any]] = []
        if isinstance(content, str):
            parts.append(("text", content))
        else:
            for c in content or []:
                kind = c.get("type") if isinstance(c, dict) else getattr(c, "type", None)
                if kind == "text":
                    parts.append(("text", c["text"] if isinstance(c, dict) else c.text))
                elif kind in ("video", "image", "audio"):
                    parts.append((kind, c.get("url", c.get(kind)) if isinstance(c, dict) else c.url))
                else:
                    raise BadRequest(f"message content of type {kind!r} (expected text, video, image or audio)")
        out.append((str(role), parts))
    return out


def _describe(turns: list[tuple[str, list[tuple[str, Any]]]]) -> str:
    kinds: dict[str, int] = {}
    for _, parts in turns:
        for kind, _v in parts:
            kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "nothing"


class FrameList(list):
    """A video given as its frames (images, e.g. MVBench's frame folders): sampled like a clip."""


def render_prompt(adapter: Any, turns: list[tuple[str, list[tuple[str, Any]]]],
                  where: str = "request") -> tuple[Any, Any]:
    """``(prompt, the video source)`` of a request's turns; the prompt holds the video placeholder
    once and the adapter renders it (pipeline/mllm/chat.py). With the plain format it is every
    part in order joined by a space (``"<video> question : ... answer :"``, what ``jobs/evaluate.py``
    scores); with the checkpoint's chat template it is the conversation, each turn's parts joined
    by a newline. A request of two or more images and no video (a frame list) is one video of
    those frames, placed where its first image is; the source is then a :class:`FrameList`."""
    videos = [v for _, parts in turns for kind, v in parts if kind == "video"]
    images = [v for _, parts in turns for kind, v in parts if kind == "image"]
    frames = not videos and len(images) >= 2
    if len(videos) != 1 and not frames:
        what = "no video" if not videos else f"{len(videos)} videos"
        raise BadRequest(f"{where}: the request has {what} (it holds {_describe(turns)}); model {MODEL_ID!r} answers "
                         "questions about exactly one video (or a list of its frames) per request")
    others = sorted({kind for _, parts in turns for kind, _v in parts if kind == "audio" or (kind == "image" and not frames)})
    if others:
        raise BadRequest(f"{where}: the request also holds {', '.join(others)} input(s), which model {MODEL_ID!r} cannot see")
    ph = adapter.video_placeholder
    seen = []

    def text_of(kind: str, value: Any) -> str:
        if kind in ("video", "image"):  # (images only as a frame list: the first stands for the video)
            seen.append(kind)
            return ph if len(seen) == 1 else ""
        if ph in value:
            raise BadRequest(f"{where}: the text itself holds the video placeholder {ph!r}")
        return value.strip()

    if adapter.chat.plain:
        prompt: Any = " ".join(t for _, parts in turns for kind, v in parts if (t := text_of(kind, v)))
    else:
        prompt = [{"role": role, "content": "\n".join(t for kind, v in parts if (t := text_of(kind, v)))}
                  for role, parts in turns]
        try:
            conversation(prompt)
        except (TypeError, ValueError) as e:
            raise BadRequest(f"{where}: {e}") from e
    return prompt, (FrameList(images) if frames else _video_source(videos[0]))


# ------------------------------------------------------------------------------------------------
# the model

class ScoreLMM(_LMMBase):  # type: ignore[misc,valid-type]
    """A frozen MLLM (:mod:`pipeline.mllm`) that sees only the visual tokens a selector keeps
    (module docstring: arguments, prompt, batching)."""

    def __init__(self, pretrained: str | None = None, compressor: str | None = None, retention: float = 1.0,
                 method: str | None = None, num_frames: int = 16, batch_size: int | str = 1,
                 max_batch_size: Any = None, device: str | None = None, dtype: str = "float32",
                 attn_implementation: str = "sdpa", seed: int = 0, fastv_layer: int = 2,
                 min_per_frame: int | None = None, max_new_tokens: int | None = None, chat_template: str = "auto",
                 system_prompt: str | None = None, compact_positions: bool = False, **unknown: Any) -> None:
        if _LMMS_EVAL_ERROR is not None:
            raise ImportError(f"lmms-eval is not installed ({_LMMS_EVAL_ERROR}); install the eval extra: "
                              "see docs/lmms-eval.md") from _LMMS_EVAL_ERROR
        super().__init__()
        if unknown:
            raise TypeError(f"model {MODEL_ID!r}: unknown model_args {sorted(unknown)}; known: pretrained, compressor, "
                            "retention, method, num_frames, seed, fastv_layer, min_per_frame, dtype, attn_implementation, "
                            "device, max_new_tokens, chat_template, system_prompt, compact_positions")
        if not pretrained:
            raise ValueError(f"model {MODEL_ID!r} needs pretrained=DIR (a frozen MLLM in save_pretrained layout, local or s3://)")
        import torch

        from pipeline import storage
        from pipeline.config import MLLMConfig
        from pipeline.evaluation import method_selectors
        from pipeline.mllm.loader import default_device, load_mllm

        self.retention = parse_retention(retention)
        self.method = resolve_method(method, compressor)
        if self.method == "full" and self.retention < 1.0:
            raise ValueError(f"method=full keeps every token; it contradicts retention={retention!r} (drop one of them)")
        self.num_frames = _as_int("num_frames", num_frames)
        self.batch_size_per_gpu = _as_int("batch_size", 1 if str(batch_size).startswith("auto") else batch_size)
        self.seed = _as_int("seed", seed, lo=0)
        self.max_new_tokens = None if max_new_tokens in (None, "") else _as_int("max_new_tokens", max_new_tokens)
        if str(chat_template).lower() not in ("auto", "none", "false", "plain"):
            raise ValueError(f"chat_template={chat_template!r}: auto (the checkpoint's template, if any) or none")
        chat = "auto" if str(chat_template).lower() == "auto" else "plain"
        self.system_prompt = self._resolve_system_prompt(str(system_prompt)) if system_prompt else None

        dev = device
        if dev in (None, "", "auto") or (str(dev).startswith("cuda") and not torch.cuda.is_available()):
            if dev not in (None, "", "auto"):
                log.warning("device=%s requested but CUDA is not available; using %s", dev, default_device())
            dev = default_device()
        self.adapter = load_mllm(MLLMConfig(path=str(pretrained), dtype=dtype, attn_implementation=attn_implementation,
                                            compact_positions=_as_bool(compact_positions), chat_template=chat), device=dev)
        self._device = self.adapter.device
        self.policy = None
        if compressor and self.method in ("score", "full"):
            from pipeline.policy import ScorePolicy

            local = storage.localize(str(compressor), tempfile.mkdtemp(prefix="score-compressor-")) \
                if storage.is_s3(str(compressor)) else Path(str(compressor))
            if not local.is_dir():
                raise FileNotFoundError(f"compressor={compressor!r}: no such directory (a ScorePolicy.save_pretrained folder)")
            self.policy = ScorePolicy.from_pretrained(str(local), map_location=self.adapter.device).eval()
            if self.policy.embed_dim != self.adapter.hidden_size:
                raise ValueError(f"compressor={compressor!r} was trained for {self.policy.embed_dim}-wide tokens, but the MLLM "
                                 f"pretrained={pretrained!r} embeds {self.adapter.hidden_size}-wide tokens: use a compressor "
                                 "trained on this MLLM")
        elif compressor:
            log.warning("compressor=%s is not used by method=%s", compressor, self.method)
        mpf = (self.policy.cfg.min_per_frame if self.policy is not None else 0) if min_per_frame in (None, "") \
            else _as_int("min_per_frame", min_per_frame, lo=0)
        self.min_per_frame = mpf
        # retention 1.0 (or method full): every token, exactly evaluate_qa's selector=None
        self.full = self.method == "full" or self.retention >= 1.0
        self.selector = None if self.full else method_selectors(
            self.adapter, self.policy, [self.method], fastv_layer=_as_int("fastv_layer", fastv_layer, lo=0),
            min_per_frame=mpf)[self.method]
        self._videos: OrderedDict = OrderedDict()  # source -> X (a few, reused by a doc's options)
        self._warned: set[str] = set()
        self.stats: dict[str, dict[str, float]] = {}
        log.info("score: %r, method=%s, retention=%g, %d frames, batch size %d", self.adapter, self.method,
                 self.retention, self.num_frames, self.batch_size_per_gpu)

    # -------------------------------------------------------------- lmms-eval properties
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def tokenizer(self):
        return self.adapter.tokenizer

    @property
    def eot_token_id(self):
        return self.adapter.tokenizer.eos_token_id

    # -------------------------------------------------------------- videos and selection
    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as e:
            raise BadRequest(f"task {task!r} split {split!r}: no document {doc_id} ({type(e).__name__})") from None

    def _frames(self, source: Any, where: str):
        """uint8 ``[num_frames, S, S, 3]``: a video file decoded (``pipeline.inference.read_frames``:
        uniform over the clip, resized to the model's frame size), or a frame list sampled the same way."""
        import numpy as np

        from pipeline.data.video import resize_rgb, sample_indices
        from pipeline.inference import read_frames

        size = max(self.adapter.frame_size)
        if isinstance(source, FrameList):
            try:
                pick = [source[int(i)] for i in sample_indices(len(source), self.num_frames)]
                rgb = [np.asarray(f.convert("RGB") if hasattr(f, "convert") else f, dtype=np.uint8) for f in pick]
                return np.stack([resize_rgb(f, size) for f in rgb])
            except Exception as e:  # noqa: BLE001
                raise BadRequest(f"{where}: cannot read its {len(source)} frames as RGB images: {e}") from e
        if not isinstance(source, bytes):
            p = Path(str(source))
            if p.is_dir():
                raise BadRequest(f"{where}: video {str(source)!r} is a directory; give a video file (or its frames as images)")
            if not p.is_file():
                raise BadRequest(f"{where}: video {str(source)!r} does not exist")
        try:
            return read_frames(source, self.num_frames, size)
        except Exception as e:  # noqa: BLE001 - decoding errors (BadSample, av errors) name the file
            raise BadRequest(f"{where}: cannot decode video {str(source)[:200]!r}: {e}") from e

    def _encode(self, source: Any, where: str):
        """``(X[T', N, D], side)`` of a video (decoded once; the last few files are kept)."""
        key = None if isinstance(source, FrameList) else source if isinstance(source, bytes) else str(source)
        if key is not None and key in self._videos:
            self._videos.move_to_end(key)
            return self._videos[key]
        enc = self.adapter.encode_video_with_side(self._frames(source, where))
        if key is None:
            return enc
        self._videos[key] = enc
        while len(self._videos) > self.batch_size + 4:
            self._videos.popitem(last=False)
        return enc

    def _keep(self, X, prompt: Any, doc_id: int, side: dict):
        """Sorted kept indices into ``T'*N`` (every token at full retention)."""
        import torch

        from pipeline.select import SelectionContext, budget

        t, n = X.shape[:2]
        if self.selector is None:
            return torch.arange(t * n)
        grid = (t, *self.adapter.visual_grid(t)[1:])
        seed = self.seed * 100_003 + int(doc_id)  # evaluate_qa's per-video seed
        ctx = SelectionContext(grid=grid, seed=seed, prompt=prompt, adapter=self.adapter, side=side)
        return self.selector(X, budget(self.retention, t * n), ctx)

    def _prepare(self, turns, doc_id: int, where: str):
        if self.system_prompt:
            turns = [("system", [("text", self.system_prompt)])] + [t for t in turns if t[0] != "system"]
        prompt, source = render_prompt(self.adapter, turns, where)
        X, side = self._encode(source, where)
        return X, self._keep(X, prompt, doc_id, side), prompt, side

    def _request_turns(self, args: tuple, where: str):
        """Turns of a ``generate_until`` request: chat ``(ctx, doc_to_messages, gen_kwargs, doc_id,
        task, split)`` or simple ``(ctx, gen_kwargs, doc_to_visual, doc_id, task, split)``."""
        if len(args) != 6:
            raise BadRequest(f"{where}: unexpected generate_until arguments ({len(args)} fields)")
        ctx, a, b, doc_id, task, split = args
        doc = self._doc(task, split, doc_id)
        if callable(a):  # chat: the task's doc_to_messages
            return message_parts(a(doc)), doc_id
        visuals = b(doc) if callable(b) else b
        return self._visual_turns(visuals, ctx), doc_id

    @staticmethod
    def _visual_turns(visuals: Any, ctx: str):
        parts: list[tuple[str, Any]] = []
        for v in visuals or []:
            kind = "image" if not isinstance(v, (str, os.PathLike, bytes, dict)) else "video"
            if isinstance(v, (str, os.PathLike)) and Path(str(v)).suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}:
                kind = "image"
            parts.append((kind, v))
        parts.append(("text", ctx))
        return [("user", parts)]

    def _gen_settings(self, gen: dict) -> tuple[int, list[str]]:
        gen = dict(gen or {})
        for key, bad in (("temperature", lambda v: float(v or 0) > 0), ("do_sample", bool),
                         ("num_beams", lambda v: int(v or 1) > 1), ("top_p", lambda v: v not in (None, 1, 1.0))):
            if key in gen and bad(gen[key]) and key not in self._warned:
                self._warned.add(key)
                log.warning("score decodes greedily; %s=%r is ignored", key, gen[key])
        until = gen.get("until") or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        n = self.max_new_tokens or gen.get("max_new_tokens") or gen.get("max_gen_toks") or 128
        return int(n), list(until)

    # -------------------------------------------------------------- lmms-eval API
    def generate_until(self, requests: list) -> list[str]:
        """Greedy answers, ``batch_size`` requests (with the same generation settings) at a time."""
        from tqdm import tqdm

        res: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        gens: dict[str, dict] = {}
        for i, req in enumerate(requests):
            args = req.args  # chat: (ctx, doc_to_messages, gen, ...); simple: (ctx, gen, doc_to_visual, ...)
            gen = (args[2] if len(args) > 2 and callable(args[1]) else args[1] if len(args) > 1 else None) or {}
            key = json.dumps(gen, sort_keys=True, default=str)
            gens[key] = gen
            groups.setdefault(key, []).append(i)
        t0 = time.perf_counter()
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="score: generate")
        for key, idx in groups.items():
            max_new, until = self._gen_settings(gens[key])
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                rows = []
                for i in chunk:
                    args = requests[i].args
                    where = f"task {args[-2]!r} doc {args[-3]}"
                    turns, doc_id = self._request_turns(args, where)
                    rows.append(self._prepare(turns, doc_id, where))
                texts = generate_batch(self.adapter, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                       max_new, until, sides=[r[3] for r in rows])
                for i, text in zip(chunk, texts):
                    res[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gens[key]), text)
                bar.update(len(chunk))
        bar.close()
        self._record("generate_until", len(requests), time.perf_counter() - t0)
        return res  # type: ignore[return-value]

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        """``(-sum log p(continuation | video, context), greedy?)`` per request: the continuation's
        negative log-likelihood, lower is likelier, as lmms-eval's own models return it (its
        multiple-choice scoring picks the argmin), in a :class:`Scored` that unpacks as the pair;
        ``batch_size`` (context, continuation) pairs per forward."""
        from tqdm import tqdm

        t0 = time.perf_counter()
        out: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="score: loglikelihood")
        for s in range(0, len(requests), self.batch_size):
            rows, targets = [], []
            for req in requests[s:s + self.batch_size]:
                args = req.args
                if len(args) < 6:
                    raise BadRequest(f"loglikelihood request {args[:2]!r} carries no document (an unconditional "
                                     f"request, e.g. acc_mutual_info): model {MODEL_ID!r} needs a video")
                ctx, cont, doc_to_visual, doc_id, task, split = args[:6]
                where = f"task {task!r} doc {doc_id}"
                doc = self._doc(task, split, doc_id)
                turns = self._visual_turns(doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual, ctx)
                rows.append(self._prepare(turns, doc_id, where))
                targets.append(cont)
            out.extend(loglikelihood_batch(self.adapter, [r[0] for r in rows], [r[1] for r in rows],
                                           [r[2] for r in rows], targets, sides=[r[3] for r in rows]))
            bar.update(len(rows))
        bar.close()
        self._record("loglikelihood", len(requests), time.perf_counter() - t0)
        # lmms-eval's convention (its multiple-choice scoring takes the argmin, "since we return the
        # actual loss"): the first element is the continuation's negative log-likelihood
        return [Scored(text=(-lp, greedy)) for lp, greedy in out]  # type: ignore[misc]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"model {MODEL_ID!r} does not support multi-round generation "
                                  "(generate_until_multi_round); run single-round tasks")

    def _record(self, what: str, n: int, seconds: float) -> None:
        st = self.stats.setdefault(what, {"requests": 0, "seconds": 0.0})
        st["requests"] += n
        st["seconds"] += seconds
        if n:
            log.info("score: %s, %d requests in %.2f s (%.2f requests/s, batch size %d)", what, n, seconds,
                     n / seconds if seconds > 0 else float("inf"), self.batch_size)


class ScoreChat(ScoreLMM):
    """``--model score``: chat tasks (``doc_to_messages``; lmms-eval builds the messages of tasks
    that only have ``doc_to_visual`` / ``doc_to_text``)."""

    is_simple = False


class ScoreSimple(ScoreLMM):
    """``--model score --force_simple``: simple tasks, including ``multiple_choice`` (loglikelihood)."""

    is_simple = True


# ------------------------------------------------------------------------------------------------
# batched greedy decoding and scoring over the adapter's masked batches

def _stack(adapter: Any, Xs: Sequence, keeps: Sequence):
    """``X[B, T', N, D]`` and the keep masks ``[B, 1, T'*N]`` of one batch (one grid for all rows)."""
    import torch

    shapes = {tuple(x.shape) for x in Xs}
    if len(shapes) != 1:
        raise ValueError(f"a batch must share one token grid, got {sorted(shapes)}")
    X = torch.stack(list(Xs))
    B, T, N = X.shape[:3]
    mask = torch.zeros(B, 1, T * N, dtype=torch.bool)
    for b, k in enumerate(keeps):
        mask[b, 0, torch.as_tensor(k, dtype=torch.long).cpu()] = True
    return X, mask


def _by_grid(Xs: Sequence) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(Xs):
        groups.setdefault(tuple(x.shape), []).append(i)
    return list(groups.values())


def generate_batch(adapter: Any, Xs: Sequence, keeps: Sequence, prompts: Sequence[Any], max_new_tokens: int = 16,
                   until: Iterable[str] = (), sides: Sequence[dict] | None = None) -> list[str]:
    """Greedy answers of ``len(Xs)`` videos (``X[T', N, D]`` each, its sorted kept indices and its
    prompt) decoded together: one right-padded prefill (:meth:`MLLMAdapter.masked_batch`, each row
    with its full sequence's position ids), then one token per row per step over the shared
    cache, the padding masked out. Row ``b`` equals ``adapter.generate(Xs[b], keeps[b],
    prompts[b], max_new_tokens, side=sides[b])`` cut at the first ``until`` string (``sides``: each
    video's side features, :meth:`MLLMAdapter.encode_video_with_side`; none for most families)."""
    until = [u for u in until if u]
    out: list[str] = [""] * len(Xs)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for idx in _by_grid(Xs):
        texts = _generate_group(adapter, [Xs[i] for i in idx], [keeps[i] for i in idx], [prompts[i] for i in idx],
                                max_new_tokens, until, _side_of(sides, idx))
        for i, t in zip(idx, texts):
            out[i] = t
    return out


def _cut(text: str, until: Sequence[str]) -> str:
    for u in until:
        j = text.find(u)
        if j >= 0:
            text = text[:j]
    return text


def _side_of(sides: Sequence[dict] | None, idx: Sequence[int]) -> dict:
    return stack_side([sides[i] for i in idx]) if sides else {}


def _generate_group(adapter, Xs, keeps, prompts, max_new_tokens, until, side):
    import torch

    with torch.inference_mode():
        X, mask = _stack(adapter, Xs, keeps)
        B = X.shape[0]
        batch = adapter._masked_batch(X, mask, list(prompts), None, side=side)
        res = adapter._lm(batch, use_cache=True)
        cache = getattr(res, "cache", None)
        if cache is None:
            cache = getattr(res, "past_key_values", None)
        last = batch.lengths.to(adapter.device) - 1
        # per row, as MLLMAdapter._prefill: the logits at the last real position
        tok = torch.stack([adapter.lm_head(res.last_hidden_state[b, int(last[b])]).float().argmax() for b in range(B)])
        if adapter.compact_positions:
            nxt = batch.lengths.to(adapter.device)
        else:
            nxt = torch.tensor([adapter._full_position_max(Xs[b], prompts[b]) + 1 for b in range(B)], device=adapter.device)
        pos = nxt.view(B, 1) if adapter.position_dims == 1 else nxt.view(1, B, 1).expand(adapter.position_dims, B, 1).contiguous()
        am = batch.attention_mask
        eos = adapter.eos_token_ids
        ids: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for step in range(max_new_tokens):
            for b in range(B):
                if done[b]:
                    continue
                t = int(tok[b])
                ids[b].append(t)
                if t in eos:
                    done[b] = True
                elif until and any(u in adapter.tokenizer.decode(ids[b], skip_special_tokens=True) for u in until):
                    done[b] = True
            if all(done) or step == max_new_tokens - 1:
                break
            emb = adapter.embed_tokens(tok.view(B, 1).to(adapter.device))
            am = torch.cat([am, torch.ones((B, 1), dtype=am.dtype, device=am.device)], dim=1)
            step_out = adapter.language_model(inputs_embeds=emb, attention_mask=am, position_ids=pos, use_cache=True,
                                              **{adapter._cache_kw: cache})
            cache = getattr(step_out, "cache", None) or getattr(step_out, "past_key_values", None) or cache
            pos = pos + 1
            h = step_out.last_hidden_state[:, -1]
            tok = torch.stack([adapter.lm_head(h[b]).float().argmax() for b in range(B)])
    return [_cut(adapter.tokenizer.decode(i, skip_special_tokens=True).strip(), until).strip() for i in ids]


def loglikelihood_batch(adapter: Any, Xs: Sequence, keeps: Sequence, prompts: Sequence[Any],
                        targets: Sequence[str], sides: Sequence[dict] | None = None) -> list[tuple[float, bool]]:
    """``(sum log p(target), greedy?)`` of each (video, kept tokens, prompt, target) row, the rows
    of one grid in one right-padded forward (:meth:`MLLMAdapter.masked_batch` with targets): the
    values ``adapter.option_logprobs`` gives for the same row."""
    import torch
    import torch.nn.functional as F

    out: list[tuple[float, bool] | None] = [None] * len(Xs)
    with torch.inference_mode():
        for idx in _by_grid(Xs):
            X, mask = _stack(adapter, [Xs[i] for i in idx], [keeps[i] for i in idx])
            batch = adapter._masked_batch(X, mask, [prompts[i] for i in idx], [targets[i] for i in idx],
                                          side=_side_of(sides, idx))
            hidden = adapter._lm(batch).last_hidden_state
            pred = batch.target_mask[:, 1:]
            h = hidden[:, :-1][pred]
            labels = batch.input_ids[:, 1:][pred]
            rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1).expand_as(pred)[pred]
            nll = torch.empty(h.shape[0], dtype=torch.float32, device=hidden.device)
            hit = torch.empty(h.shape[0], dtype=torch.bool, device=hidden.device)
            for s in range(0, h.shape[0], adapter.logits_chunk):
                logits = adapter.lm_head(h[s:s + adapter.logits_chunk]).float()
                lab = labels[s:s + adapter.logits_chunk]
                nll[s:s + adapter.logits_chunk] = F.cross_entropy(logits, lab, reduction="none")
                hit[s:s + adapter.logits_chunk] = logits.argmax(-1) == lab
            R = hidden.shape[0]
            sums = torch.zeros(R, dtype=torch.float32, device=hidden.device).index_add_(0, rows, nll)
            miss = torch.zeros(R, dtype=torch.long, device=hidden.device).index_add_(0, rows, (~hit).long())
            for j, i in enumerate(idx):
                out[i] = (float(-sums[j]), bool(miss[j] == 0))
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# the shapes task's documents

def task_documents(world: str | Path, limit: int | None = None) -> list[dict]:
    """One document per annotated held-out video of ``world``, in ``load_eval_videos``' order
    (annotation files sorted, records in file order, videos without QA skipped), with the
    primary question (``qa[0]``): ``{id, video (absolute path), question, answer, options, type}``."""
    from pipeline.data import readers
    from pipeline.data.world import heldout_videos

    docs: list[dict] = []
    for ann in readers.list_video_annotations(str(heldout_videos(world))):
        for rec in readers.read_video_index(ann):
            if isinstance(rec, Exception):
                raise rec
            qa = json.loads(rec["qa"])
            if not qa:
                continue
            q = qa[0]
            docs.append({"id": rec["id"], "video": str(Path(rec["video"]).resolve()), "question": q["question"],
                         "answer": q["answer"], "options": [str(o) for o in (q.get("options") or [q["answer"]])],
                         "type": q.get("type", "qa")})
            if limit is not None and len(docs) >= limit:
                return docs
    return docs


def export_task(world: str | Path, out: str | Path | None = None, limit: int | None = None) -> Path:
    """Write :func:`task_documents` as JSONL (default ``<world>/heldout/shapes_video_qa.jsonl``); returns the path."""
    docs = task_documents(world, limit)
    if not docs:
        raise ValueError(f"world {str(world)!r} has no annotated held-out video")
    out = Path(out) if out is not None else Path(world) / "heldout" / TASK_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, prefix=out.name, suffix=".tmp", delete=False) as f:
        f.write("".join(json.dumps(d, sort_keys=True) + "\n" for d in docs))
    Path(f.name).replace(out)  # atomic: a concurrent reader sees the old file or the new one
    return out


def task_file(world: str | Path) -> Path:
    """The shapes task's JSONL for ``world``, exported again when missing or older than the
    world's held-out annotations (absolute path)."""
    from pipeline.data.world import heldout_videos

    held = heldout_videos(world)  # FileNotFoundError naming the world
    out = (Path(world) / "heldout" / TASK_FILE).resolve()
    newest = max((p.stat().st_mtime for p in held.rglob("*.jsonl")), default=0.0)
    if not out.is_file() or out.stat().st_mtime < newest:
        export_task(world, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.lmms_eval_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export-task", help="write the shapes_video_qa JSONL of a world's held-out videos")
    ex.add_argument("world", help="world directory (jobs/make_world.py, or runs/world after make demo)")
    ex.add_argument("--out", default=None, help=f"output JSONL (default <world>/heldout/{TASK_FILE})")
    ex.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        path = export_task(args.world, args.out, args.limit)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    n = sum(1 for _ in path.open())
    print(json.dumps({"out": str(path), "documents": n}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

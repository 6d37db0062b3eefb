"""Inference with a trained compressor: a frozen Hugging Face MLLM that sees only the top-K tokens.

    from pipeline.inference import load_compressed
    cm = load_compressed(".cache/score-tiny", "runs/train/final", retention=0.1)
    out = cm.generate("clip.mp4", "what color is the circle ?")
    out["answer"], out["kept"], out["total"], out["prefill_s"], out["policy_s"]

Path: frames -> ``adapter.encode_video_with_side`` -> ``X[T', N, D]`` -> policy keep logits -> deterministic
global top-K (:func:`pipeline.select.topk_keep`, ``K = ceil(retention * T'*N)``, original order,
optional per-frame minimum) -> ``adapter.generate`` with only the kept visual tokens (their
original position ids; text tokens are always kept).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.select import budget
from pipeline.data.prompts import qa_prompt
from pipeline.mllm.base import MLLMAdapter
from pipeline.metrics import sync
from pipeline.select import inference_forward, question_input, topk_keep


def as_prompt(adapter: MLLMAdapter, question_or_prompt: str) -> str:
    """A prompt that already holds the video placeholder is used as is; a bare question becomes
    the user turn ``"<video>\n<question>"`` for a checkpoint with a chat template, and the
    project's QA prompt (``"<video> question : ... answer :"``, what score-tiny learned) otherwise."""
    if not isinstance(question_or_prompt, str) or not question_or_prompt.strip():
        raise ValueError("question/prompt must be a non-empty string")
    if adapter.video_placeholder in question_or_prompt:
        return question_or_prompt
    if not adapter.chat.plain:
        return f"{adapter.video_placeholder}\n{question_or_prompt.strip()}"
    return qa_prompt(question_or_prompt.strip())


def read_frames(video: str | Path | bytes, num_frames: int, size: int) -> np.ndarray:
    """A video file path (or its bytes) -> uint8 ``[num_frames, size, size, 3]`` (PyAV, uniform sampling)."""
    from pipeline.data.video import decode_video

    data = video if isinstance(video, bytes) else Path(video).read_bytes()
    return decode_video(data, num_frames, size)


class CompressedMLLM:
    """A frozen MLLM adapter + a SCORE policy: ``generate`` keeps ``retention`` of the visual tokens.

    ``frames`` may be uint8 ``[T, H, W, 3]`` (array, tensor or list of frames) or a video path /
    bytes, decoded to ``num_frames`` frames at the model's frame size."""

    def __init__(self, adapter: MLLMAdapter, policy: torch.nn.Module, retention: float = 0.1,
                 min_per_frame: int = 0, num_frames: int = 16, compile: bool = False) -> None:
        budget(retention, 1)  # validates the ratio
        if getattr(policy, "embed_dim", adapter.hidden_size) != adapter.hidden_size:
            raise ValueError(f"the compressor reads {policy.embed_dim}-wide tokens, this MLLM's width is {adapter.hidden_size}")
        self.adapter = adapter
        self.policy = policy.to(adapter.device).eval()
        self._forward = inference_forward(self.policy, compile)  # compile: see pipeline.select.inference_forward
        self.retention = float(retention)
        self.min_per_frame = int(min_per_frame)
        self.num_frames = int(num_frames)

    # ------------------------------------------------------------------ steps
    def frames(self, frames: Any) -> Any:
        if isinstance(frames, (str, Path, bytes)):
            return read_frames(frames, self.num_frames, max(self.adapter.frame_size))
        return frames

    def encode(self, frames: Any) -> tuple[torch.Tensor, dict]:
        """Frames (or a video path) -> ``(X[T', N, D], side)`` (side features: DeepStack's; ``{}`` for most families)."""
        return self.adapter.encode_video_with_side(self.frames(frames))

    @torch.inference_mode()
    def select(self, X: torch.Tensor, retention: float | None = None, prompt: str | None = None
               ) -> tuple[torch.Tensor, float]:
        """``(keep index LongTensor[K] sorted, policy seconds)`` for ``X[T', N, D]``. A question-aware
        policy needs the ``prompt`` (its words are read in the timed policy step)."""
        t = X.shape[0]
        _, gh, gw = self.adapter.visual_grid(self.adapter._frames_for(t))
        r = self.retention if retention is None else float(retention)
        dev = next(self.policy.parameters()).device
        sync(dev)
        t0 = time.perf_counter()
        kw = {"question": question_input(self.adapter, prompt, dev)} if self.policy.cfg.question_aware else {}
        z = self._forward(X.to(dev), (gh, gw), **kw)
        keep = topk_keep(z, r, grid=(t, gh, gw), min_per_frame=self.min_per_frame)
        sync(dev)
        return keep.cpu(), time.perf_counter() - t0

    # ------------------------------------------------------------------ user API
    def generate(self, frames: Any, question_or_prompt: str, max_new_tokens: int = 16,
                 retention: float | None = None) -> dict:
        """Answer with only the kept tokens: ``{answer, kept, total, prefill_s, policy_s, encode_s}``.
        ``prefill_s`` is the wall time of the pruned prefill inside this very generation."""
        prompt = as_prompt(self.adapter, question_or_prompt)
        t0 = time.perf_counter()
        X, side = self.encode(frames)
        encode_s = time.perf_counter() - t0
        keep, policy_s = self.select(X, retention, prompt)
        ids, prefill_s = self._generate_timed(X, keep, prompt, max_new_tokens, side)
        answer = self.adapter.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return {"answer": answer, "kept": int(keep.numel()), "total": int(X.shape[0] * X.shape[1]),
                "prefill_s": prefill_s, "policy_s": policy_s, "encode_s": encode_s}

    def _generate_timed(self, X: torch.Tensor, keep: torch.Tensor, prompt: str, max_new_tokens: int,
                        side: dict | None = None) -> tuple[list[int], float]:
        """``adapter.generate_ids`` with its prefill timed (the adapter's prefill step is wrapped for
        this one call, so nothing runs twice)."""
        ad = self.adapter
        timing: dict[str, float] = {}
        inner = ad._prefill

        def timed(*args, **kwargs):
            sync(ad.device)
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(ad.device)
            timing["prefill"] = time.perf_counter() - t0
            return out

        ad._prefill = timed  # instance attribute shadows the method for this call only
        try:
            ids = ad.generate_ids(X, keep, prompt, max_new_tokens, side=side)
        finally:
            del ad._prefill
        return ids, timing.get("prefill", float("nan"))

    def __repr__(self) -> str:
        return f"CompressedMLLM({self.adapter!r}, retention={self.retention}, min_per_frame={self.min_per_frame})"


def load_compressed(mllm_dir: str, compressor_dir: str, retention: float = 0.1, min_per_frame: int | None = None,
                    num_frames: int = 16, device: str | torch.device | None = None, compile: bool = False,
                    **mllm_kwargs: Any) -> CompressedMLLM:
    """Load a saved MLLM (``save_pretrained`` layout, local or ``s3://``) and a saved compressor
    (:meth:`ScorePolicy.save_pretrained`). ``min_per_frame=None`` takes the compressor's own
    ``min_per_frame`` setting; ``compile`` runs the policy through ``torch.compile``.
    ``mllm_kwargs`` go to :class:`~pipeline.config.MLLMConfig`."""
    from pipeline.config import MLLMConfig
    from pipeline.mllm.loader import load_mllm
    from pipeline.policy import ScorePolicy

    adapter = load_mllm(MLLMConfig(path=str(mllm_dir), **mllm_kwargs), device=device)
    policy = ScorePolicy.from_pretrained(compressor_dir, map_location=adapter.device)
    mpf = policy.cfg.min_per_frame if min_per_frame is None else int(min_per_frame)
    return CompressedMLLM(adapter, policy, retention, mpf, num_frames, compile)

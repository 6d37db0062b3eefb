"""Video decoding with PyAV: sample T frames, resize to S x S (PIL), uint8 [T,S,S,3].

Frame sampling (:class:`FrameSampling`, ``data.sampling``), the two rules the models' own
processors use. With ``n`` frames in the video:

* ``uniform`` (LLaVA's ``np.linspace`` rule; the default): ``T = data.video_frames`` for every
  video, indices ``round(linspace(0, n-1, T))`` (both ends included; a video shorter than T
  repeats frames);
* ``fps`` (qwen-vl-utils' ``smart_nframes``): ``T = n / video_fps * fps`` clamped to
  ``[min_frames, min(max_frames, n)]`` (``min_frames`` rounded up, ``max_frames`` down to the
  family's temporal patch ``multiple``), then rounded down to that multiple; the same linspace
  indices. Real videos then give samples of different lengths (the rollout pads them).

A video with fewer than ``min_frames`` frames (rounded up to the multiple in ``fps`` mode) is
``BadSample("too_short")``. ``n`` comes from the container's frame count when it has one, else
from one demux pass (no decoding); then one decode pass converts only the selected frames, so
memory stays O(T) for long videos. If the container's count was wrong (fewer frames decode than it
promised) the indices are recomputed from the real count in a second pass.

Every failure raises :class:`~pipeline.data.quarantine.BadSample` with a quarantine reason.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from PIL import Image

from pipeline.data.quarantine import BadSample

MIN_SIDE = 8  # pixels: smaller frames cannot be resized into anything meaningful
MAX_ASPECT = 4.0  # width/height (or inverse) beyond this is treated as a wrong frame shape
SAMPLING_MODES = ("uniform", "fps")


def sample_indices(n: int, t: int) -> np.ndarray:
    """``round(linspace(0, n-1, t))`` as int64: ``t`` frame indices spread uniformly over ``n`` frames."""
    if n < 1 or t < 1:
        raise ValueError(f"need n >= 1 and t >= 1, got n={n}, t={t}")
    return np.round(np.linspace(0, n - 1, t)).astype(np.int64)


@dataclass(frozen=True)
class FrameSampling:
    """How many frames of a clip become the sample, and which (module doc). ``multiple``: the
    MLLM's temporal patch (2 for the Qwen families, which merge 2 frames per token step; 1
    otherwise), used by ``fps`` mode only: a uniform ``num_frames`` is checked against it before
    a stage starts (``pipeline.mllm.loader.check_model_dir``)."""

    mode: str = "uniform"
    num_frames: int = 16
    fps: float = 2.0
    min_frames: int = 1
    max_frames: int = 768
    multiple: int = 1

    def __post_init__(self) -> None:
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"frame sampling mode {self.mode!r} is not one of {SAMPLING_MODES}")
        if self.multiple < 1 or self.min_frames < 1 or self.num_frames < 1 or not self.fps > 0:
            raise ValueError(f"frame sampling needs num_frames, min_frames, multiple >= 1 and fps > 0, got {self}")
        if self.mode == "fps" and self.lowest > self.highest:
            raise ValueError(f"fps sampling: min_frames={self.min_frames} rounded up to a multiple of {self.multiple} "
                             f"({self.lowest}) exceeds max_frames={self.max_frames} rounded down ({self.highest})")

    @classmethod
    def from_config(cls, dcfg: Any, multiple: int | None = None) -> "FrameSampling":
        """The sampling of a :class:`~pipeline.config.DataConfig`. The frame multiple is
        ``data.frame_multiple`` when set, else ``multiple`` (the MLLM's temporal patch, which the
        caller knows: ``adapter._frames_for(1)`` or :func:`pipeline.mllm.loader.temporal_patch`),
        else 1."""
        m = int(dcfg.frame_multiple or multiple or 1)
        return cls(dcfg.sampling, int(dcfg.video_frames), float(dcfg.fps), int(dcfg.min_frames), int(dcfg.max_frames), m)

    @classmethod
    def at_fps(cls, fps: float, multiple: int | None = None) -> "FrameSampling":
        """Each video at ``fps`` frames per second, the other limits ``DataConfig``'s defaults (the
        evaluation and build jobs' ``--fps``: every held-out video at its own length)."""
        from pipeline.config import DataConfig

        return cls.from_config(DataConfig(sampling="fps", fps=fps), multiple)

    @property
    def lowest(self) -> int:
        """The fewest frames a video needs (``min_frames``; rounded up to ``multiple`` in fps mode)."""
        m = self.multiple if self.mode == "fps" else 1
        return math.ceil(self.min_frames / m) * m

    @property
    def highest(self) -> int:
        """fps mode: ``max_frames`` rounded down to ``multiple`` (the most frames ever sampled)."""
        return self.max_frames // self.multiple * self.multiple

    def count(self, n: int, video_fps: float | None) -> int:
        """Frames sampled from a video of ``n`` frames at ``video_fps`` (fps mode needs it).
        ``too_short`` below :attr:`lowest`; ``corrupt_video`` without a frame rate in fps mode."""
        if n < self.lowest:
            raise BadSample("too_short", "sample", f"{n} frames < min_frames {self.lowest}")
        if self.mode == "uniform":
            return self.num_frames
        if not video_fps or not math.isfinite(video_fps) or video_fps <= 0:
            raise BadSample("corrupt_video", "sample", "no frame rate: fps sampling needs the clip's duration")
        m = self.multiple
        hi = min(self.max_frames, n) // m * m  # as qwen-vl-utils' smart_nframes
        t = min(max(n / float(video_fps) * self.fps, self.lowest), hi)
        return int(t // m * m)

    def indices(self, n: int, video_fps: float | None) -> np.ndarray:
        """The frame indices taken from a video of ``n`` frames: :func:`sample_indices` of :meth:`count`."""
        return sample_indices(n, self.count(n, video_fps))


def as_sampling(frames: "int | FrameSampling") -> FrameSampling:
    """An ``int`` is uniform sampling of that many frames (every existing caller's meaning)."""
    return frames if isinstance(frames, FrameSampling) else FrameSampling(num_frames=int(frames))


def check_frame_shape(h: int, w: int, where: str = "frame") -> None:
    """Raise ``BadSample('bad_shape')`` for frames too small or too elongated to resize to a square."""
    if min(h, w) < MIN_SIDE or max(h, w) / max(1, min(h, w)) > MAX_ASPECT:
        raise BadSample("bad_shape", "shape", f"{where} is {h}x{w} (min side {MIN_SIDE}, max aspect {MAX_ASPECT:g})")


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H,W,3] -> uint8 [size,size,3] (bilinear, PIL); returned unchanged if already that size."""
    if image.shape[0] == size and image.shape[1] == size:
        return np.ascontiguousarray(image, dtype=np.uint8)
    return np.asarray(Image.fromarray(image, mode="RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _open(data: bytes):
    if not data:
        raise BadSample("empty_file", "read", "zero-length video")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise BadSample("corrupt_video", "decode", f"open: {type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise BadSample("corrupt_video", "decode", "no video stream")
    return container


def probe(data: bytes) -> tuple[int, float | None]:
    """``(frames, frames per second)`` of the first video stream: the container's frame count,
    else one demux pass (no decode); the stream's average rate (else its guessed rate, else
    frames / duration), ``None`` when the container says nothing about time."""
    with _open(data) as c:
        s = c.streams.video[0]
        if s.frames:
            n = int(s.frames)
        else:
            try:
                n = sum(1 for p in c.demux(s) if p.size)
            except av.FFmpegError as e:
                raise BadSample("corrupt_video", "decode", f"demux: {type(e).__name__}: {e}") from None
        rate = s.average_rate or s.guessed_rate
        if rate:
            return n, float(rate)
        if s.duration and s.time_base:
            seconds = float(s.duration * s.time_base)
            return n, (n / seconds if seconds > 0 else None)
        return n, None


def count_frames(data: bytes) -> int:
    """Frames in the first video stream: the container's count, else one demux pass (no decode)."""
    return probe(data)[0]


def _decode_selected(data: bytes, wanted: np.ndarray) -> tuple[dict[int, np.ndarray], int, tuple[int, int] | None]:
    """Decode once; keep rgb arrays for the indices in ``wanted``. Returns (frames, n_decoded, hw)."""
    want = set(int(i) for i in wanted)
    kept: dict[int, np.ndarray] = {}
    n = 0
    hw: tuple[int, int] | None = None
    with _open(data) as c:
        s = c.streams.video[0]
        try:
            for frame in c.decode(s):
                fhw = (frame.height, frame.width)
                if hw is None:
                    hw = fhw
                elif fhw != hw:
                    raise BadSample("bad_shape", "shape", f"frame size changes from {hw} to {fhw} at frame {n}")
                if n in want:
                    kept[n] = frame.to_ndarray(format="rgb24")
                n += 1
        except av.FFmpegError as e:
            if n == 0:
                raise BadSample("corrupt_video", "decode", f"decode: {type(e).__name__}: {e}") from None
            # a damaged tail: keep what decoded (the caller re-samples from the real count)
    return kept, n, hw


def decode_video(
    data: bytes,
    num_frames: int | FrameSampling,
    size: int,
    expect_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """mp4 (or any container PyAV reads) bytes -> uint8 [T, size, size, 3] RGB.

    ``num_frames``: an ``int`` (uniform sampling of that many frames, ``T = num_frames``) or a
    :class:`FrameSampling` (``fps`` mode: ``T`` follows the clip's duration). ``expect_hw``: the
    (height, width) the annotation declares; a decoded size that differs is ``bad_shape`` (the
    annotation and the file do not belong together).
    """
    sampling = as_sampling(num_frames)
    n, rate = probe(data)
    if n < 1:
        raise BadSample("corrupt_video", "decode", "no frames")
    idx = sampling.indices(n, rate)
    kept, n_real, hw = _decode_selected(data, idx)
    if n_real < 1 or hw is None:
        raise BadSample("corrupt_video", "decode", "no frames decode")
    if n_real != n:  # the container's count was wrong: sample again over the frames that exist
        idx = sampling.indices(n_real, rate)
        if not set(int(i) for i in idx) <= kept.keys():
            kept, n_real2, hw = _decode_selected(data, idx)
            if n_real2 != n_real or not set(int(i) for i in idx) <= kept.keys():
                raise BadSample("corrupt_video", "decode", f"frame count unstable ({n}, {n_real}, {n_real2})")
    h, w = hw
    if expect_hw is not None and tuple(int(v) for v in expect_hw) != (h, w):
        raise BadSample("bad_shape", "shape", f"decoded {h}x{w}, annotation says {expect_hw[0]}x{expect_hw[1]}")
    check_frame_shape(h, w, "video frame")
    out = np.empty((len(idx), size, size, 3), dtype=np.uint8)
    for j, i in enumerate(idx):
        out[j] = resize_rgb(kept[int(i)], size)
    return out

"""Video decoders behind one interface (``data.decoder``): PyAV (the default) or decord.

:func:`decode` takes the clip's bytes and returns uint8 ``[T, size, size, 3]`` RGB with the same
frame sampling (:class:`pipeline.data.video.FrameSampling`: which indices, ``too_short``) and
the same quarantine reasons whichever decoder runs. decord is an optional extra
(``pip install -e '.[decord]'``: the ``decord`` wheel only, never a torch); asking for it
without the package installed is one error naming the extra (:func:`check_decoder`), raised
before any Ray work rather than quarantining every clip.

decord 0.6.0 copies frames whose width is not a multiple of 32 with the wrong row stride
(``DECORDArrayCopyFromTo: The size must exactly match``), so it is asked to scale to a
32-aligned width and PIL does the last resize; the source size (for ``expect_hw`` and the shape
checks) comes from the container header, read with PyAV without decoding.
"""

from __future__ import annotations

import io
from typing import Any

import av
import numpy as np

from pipeline.data import video
from pipeline.data.quarantine import BadSample

DECODERS = ("pyav", "decord")
EXTRA = "pip install -e '.[decord]'"


class DecoderUnavailable(RuntimeError):
    """The configured decoder cannot run here (a setup error, not a bad sample)."""


def check_decoder(name: str) -> None:
    """Raise :class:`DecoderUnavailable` naming the extra when ``name`` cannot be used here."""
    if name not in DECODERS:
        raise DecoderUnavailable(f"data.decoder: unknown decoder {name!r} (one of {', '.join(DECODERS)})")
    if name == "decord":
        _decord()


def _decord() -> Any:
    try:
        import decord
    except ImportError as e:
        raise DecoderUnavailable(f"data.decoder=decord needs the decord extra: {EXTRA} ({e})") from None
    return decord


def decode(data: bytes, sampling: Any, size: int, expect_hw: tuple[int, int] | None = None,
           decoder: str = "pyav") -> np.ndarray:
    """Clip bytes -> uint8 ``[T, size, size, 3]``; ``sampling`` an int (uniform T) or a FrameSampling."""
    if decoder == "pyav":
        return video.decode_video(data, sampling, size, expect_hw=expect_hw)
    if decoder == "decord":
        return _decode_decord(data, sampling, size, expect_hw)
    raise DecoderUnavailable(f"data.decoder: unknown decoder {decoder!r}")


def _header(data: bytes) -> tuple[int, int]:
    """(height, width) of the first video stream, from the container header (no decoding)."""
    if not data:
        raise BadSample("empty_file", "read", "zero-length video")
    try:
        with av.open(io.BytesIO(data), mode="r") as c:
            if not c.streams.video:
                raise BadSample("corrupt_video", "decode", "no video stream")
            cc = c.streams.video[0].codec_context
            return int(cc.height), int(cc.width)
    except (av.FFmpegError, ValueError, OSError) as e:
        raise BadSample("corrupt_video", "decode", f"open: {type(e).__name__}: {e}") from None


def _decode_decord(data: bytes, sampling: Any, size: int, expect_hw: tuple[int, int] | None) -> np.ndarray:
    decord = _decord()
    h, w = _header(data)
    if expect_hw is not None and tuple(int(v) for v in expect_hw) != (h, w):
        raise BadSample("bad_shape", "shape", f"decoded {h}x{w}, annotation says {expect_hw[0]}x{expect_hw[1]}")
    video.check_frame_shape(h, w, "video frame")
    aligned_w = -(-size // 32) * 32
    try:
        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1, width=aligned_w, height=size)
        n, rate = len(vr), float(vr.get_avg_fps() or 0) or None
    except (RuntimeError, AssertionError, decord.DECORDError) as e:  # type: ignore[attr-defined]
        raise BadSample("corrupt_video", "decode", f"decord: {type(e).__name__}: {e}"[:300]) from None
    if n < 1:
        raise BadSample("corrupt_video", "decode", "no frames")
    idx = video.as_sampling(sampling).indices(n, rate)
    try:
        frames = vr.get_batch([int(i) for i in idx]).asnumpy()
    except (RuntimeError, decord.DECORDError) as e:  # type: ignore[attr-defined]
        raise BadSample("corrupt_video", "decode", f"decord: {type(e).__name__}: {e}"[:300]) from None
    return np.stack([video.resize_rgb(np.ascontiguousarray(f), size) for f in frames]).astype(np.uint8)

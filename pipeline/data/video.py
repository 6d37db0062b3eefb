"""Video decoding with PyAV: sample T frames uniformly, resize to S x S (PIL), uint8 [T,S,S,3].

Frame sampling: with ``n`` frames in the video, frame indices ``round(linspace(0, n-1, T))`` (both
ends included; a video shorter than T repeats frames). ``n`` comes from the container's frame count
when it has one, else from one demux pass (no decoding); then one decode pass converts only the
selected frames, so memory stays O(T) for long videos. If the container's count was wrong (fewer
frames decode than it promised) the indices are recomputed from the real count in a second pass.

Every failure raises :class:`~pipeline.data.quarantine.BadSample` with a quarantine reason.
"""

from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image

from pipeline.data.quarantine import BadSample

MIN_SIDE = 8  # pixels: smaller frames cannot be resized into anything meaningful
MAX_ASPECT = 4.0  # width/height (or inverse) beyond this is treated as a wrong frame shape


def sample_indices(n: int, t: int) -> np.ndarray:
    """``round(linspace(0, n-1, t))`` as int64: ``t`` frame indices spread uniformly over ``n`` frames."""
    if n < 1 or t < 1:
        raise ValueError(f"need n >= 1 and t >= 1, got n={n}, t={t}")
    return np.round(np.linspace(0, n - 1, t)).astype(np.int64)


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


def count_frames(data: bytes) -> int:
    """Frames in the first video stream: the container's count, else one demux pass (no decode)."""
    with _open(data) as c:
        s = c.streams.video[0]
        if s.frames:
            return int(s.frames)
        try:
            return sum(1 for p in c.demux(s) if p.size)
        except av.FFmpegError as e:
            raise BadSample("corrupt_video", "decode", f"demux: {type(e).__name__}: {e}") from None


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
    num_frames: int,
    size: int,
    expect_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """mp4 (or any container PyAV reads) bytes -> uint8 [num_frames, size, size, 3] RGB.

    ``expect_hw``: the (height, width) the annotation declares; a decoded size that differs is
    ``bad_shape`` (the annotation and the file do not belong together).
    """
    n = count_frames(data)
    if n < 1:
        raise BadSample("corrupt_video", "decode", "no frames")
    idx = sample_indices(n, num_frames)
    kept, n_real, hw = _decode_selected(data, idx)
    if n_real < 1 or hw is None:
        raise BadSample("corrupt_video", "decode", "no frames decode")
    if n_real != n:  # the container's count was wrong: sample again over the frames that exist
        idx = sample_indices(n_real, num_frames)
        if not set(int(i) for i in idx) <= kept.keys():
            kept, n_real2, hw = _decode_selected(data, idx)
            if n_real2 != n_real or not set(int(i) for i in idx) <= kept.keys():
                raise BadSample("corrupt_video", "decode", f"frame count unstable ({n}, {n_real}, {n_real2})")
    h, w = hw
    if expect_hw is not None and tuple(int(v) for v in expect_hw) != (h, w):
        raise BadSample("bad_shape", "shape", f"decoded {h}x{w}, annotation says {expect_hw[0]}x{expect_hw[1]}")
    check_frame_shape(h, w, "video frame")
    out = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for j, i in enumerate(idx):
        out[j] = resize_rgb(kept[int(i)], size)
    return out

"""Metrics: per-step scalar dicts, phase timing and a TensorBoard writer.

One training step produces a flat ``dict[str, float]`` whose keys are TensorBoard tags
(``reward``, ``dce/min``, ``timing/rollout``, ...; the names are fixed in
:mod:`pipeline.trainer`). Helpers here are shared by the single-process trainer and the Ray roles:

* :func:`timed` - ``with timed(m, "rollout"): ...`` adds ``m["timing/rollout"]`` (seconds,
  accumulated if the phase runs more than once in the step);
* :class:`MetricsWriter` - a thin wrapper over ``torch.utils.tensorboard.SummaryWriter`` that
  writes every finite scalar of a step dict (non-scalars are skipped), images and text;
* :func:`mean_metrics` - the per-key mean of several step dicts (summaries, first/last windows).
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

TIMING_PREFIX = "timing/"


def as_scalar(v: Any) -> float | None:
    """A Python float for a scalar-like value (number, 0-d/1-element tensor or array), else None."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.detach().float().cpu())
    if isinstance(v, np.ndarray) and v.size == 1:
        return float(v.reshape(()))
    return None


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar entries of ``metrics`` as floats (others dropped)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        s = as_scalar(v)
        if s is not None:
            out[k] = s
    return out


def sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a timer reads real time."""
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


@contextmanager
def timed(metrics: dict[str, float], phase: str) -> Iterator[None]:
    """Time the block into ``metrics[f"timing/{phase}"]`` (seconds, added to any earlier value)."""
    key = TIMING_PREFIX + phase
    t0 = time.perf_counter()
    try:
        yield
    finally:
        metrics[key] = metrics.get(key, 0.0) + (time.perf_counter() - t0)


def mean_metrics(steps: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Per-key mean over step dicts (a key missing from some steps is averaged where present)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for m in steps:
        for k, v in scalars(m).items():
            if math.isfinite(v):
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


class MetricsWriter:
    """TensorBoard event files under ``logdir`` (created).

    ``log(step, metrics)`` writes every finite scalar of ``metrics`` as ``add_scalar(tag, value,
    step)``; ``image(tag, img, step)`` takes uint8/float ``[H, W, 3]``; ``text(tag, s, step)``.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, logdir: str | Path, flush_secs: int = 10, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        # purge_step: a resumed run hides the events a crashed run wrote from that step on
        self._w = SummaryWriter(log_dir=str(self.logdir), flush_secs=flush_secs, purge_step=purge_step)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for k, v in scalars(metrics).items():
            if math.isfinite(v):
                self._w.add_scalar(k, v, int(step))

    def image(self, tag: str, img: np.ndarray | torch.Tensor, step: int) -> None:
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        self._w.add_image(tag, arr, int(step), dataformats="HWC")

    def text(self, tag: str, s: str, step: int) -> None:
        self._w.add_text(tag, s, int(step))

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProgressLine:
    """Line-based progress with ETA for processes whose stdout is a log (Ray jobs stream their
    logs, where a tqdm bar's carriage returns would pile up): :meth:`update` returns a line like
    ``[stage] step 12/60 (20%) 1.25 steps/s ETA 38s kept_ratio=0.85`` at most every ``every_s`` seconds
    and at the last step, else None. The rate (and so the ETA) is measured from the end of the
    first step this process ran, so its one-off costs (workers starting, ops compiling) do not
    inflate the ETA. A console that sees such lines (:func:`progress_tag`) may redraw them in place."""

    def __init__(self, name: str, total: int, start: int = 0, every_s: float = 10.0):
        self.name, self.total, self.start, self.every_s = name, int(total), int(start), float(every_s)
        self.t0 = self.t_last = time.perf_counter()
        self._first: tuple[int, float] | None = None  # (steps done, time) after the first step

    def update(self, step: int, metrics: Mapping[str, Any] | None = None, keys: Iterable[str] = ()) -> str | None:
        now = time.perf_counter()
        done = step + 1
        if self._first is None:
            self._first = (done, now)
        if now - self.t_last < self.every_s and done < self.total:
            return None
        self.t_last = now
        d0, t0 = self._first
        if done > d0:
            steps_per_s = (done - d0) / max(now - t0, 1e-9)
            rate, eta = f"{steps_per_s:.3g} steps/s", _hms((self.total - done) / steps_per_s)
        else:  # only the first step so far: its time is mostly start-up, no rate to extrapolate
            rate, eta = f"first step in {now - self.t0:.1f} s", ("0s" if done >= self.total else "?")
        extra = f" {format_metrics(metrics, keys, short=True)}" if metrics else ""
        return (f"[{self.name}] step {done}/{self.total} ({100 * done / max(1, self.total):.0f}%) "
                f"{rate} ETA {eta}{extra}")


# a progress line: ``[tag] step 12/60 ...`` (ProgressLine) or ``[tag] 3/14 ...`` (a count of items),
# possibly behind the ``  | `` of a streamed job log
PROGRESS = re.compile(r"^(?:\s*\|\s)?\[(?P<tag>[\w.-]+)\] (?:step )?\d+/\d+\b")


def progress_tag(line: str) -> str | None:
    """The tag of a progress line (``"pseudo_video"`` for ``[pseudo_video] step 3/60 ...``), else None."""
    m = PROGRESS.match(line)
    return m.group("tag") if m else None


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def format_metrics(metrics: Mapping[str, Any], keys: Iterable[str], digits: int = 3, short: bool = False) -> str:
    """``"key=value key=value"`` for the given keys present in ``metrics`` (``short``: each key
    without its TensorBoard group, ``kept_ratio`` for ``sparsity/kept_ratio``)."""
    sc = scalars(metrics)
    return " ".join(f"{k.rsplit('/', 1)[-1] if short else k}={sc[k]:.{digits}g}" for k in keys if k in sc)

"""Figures: accuracy vs retention, and token-mask overlays like the SCORE paper's Figure 5.

Matplotlib with the non-interactive Agg backend; every function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.baselines import ORACLES  # noqa: E402


def plot_accuracy_vs_retention(results: dict, path: str | Path, title: str | None = None) -> Path:
    """One line per method (accuracy vs retention, log x), the full-token accuracy dashed."""
    path = Path(path)
    by_method: dict[str, list[tuple[float, float]]] = {}
    for row in results["rows"]:
        by_method.setdefault(row["method"], []).append((row["retention"], row["accuracy"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, pts in by_method.items():
        pts.sort()
        style = dict(lw=2.4, marker="o", zorder=3) if name == "score" else dict(lw=1.3, marker=".")
        if name in ORACLES:
            style.update(ls=":", color="grey" if name == "oracle" else "silver")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
    full = results["full"]["accuracy"]
    ax.axhline(full, ls="--", color="black", lw=1, label=f"all tokens ({full:.3f})")
    rs = sorted({row["retention"] for row in results["rows"]})
    if rs and min(rs) > 0:
        ax.set_xscale("log")
        ax.set_xticks(rs)
        ax.set_xticklabels([f"{r:.0%}" if r >= 0.01 else f"{r:.1%}" for r in rs])
        ax.minorticks_off()
    ax.set_xlabel("retention (kept visual tokens)")
    ax.set_ylabel("QA accuracy (greedy exact match)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"accuracy vs retention ({results['setup']['videos']} videos)")
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_validation(scored: Sequence[Mapping], retentions: Sequence[float], best_step: int, path: str | Path,
                    title: str | None = None, full: float | None = None, average: Mapping | None = None) -> Path:
    """Validation accuracy of each candidate checkpoint against its learner step, one line per
    retention, the best checkpoint (``best_step``) marked, ``full`` (all tokens) dashed, and the
    weight ``average`` of some of them (its score, at its last step, a star) where there is one
    (``jobs/select_policy.py``)."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    steps = [c["step"] + 1 for c in scored]
    for r in retentions:
        ax.plot(steps, [c[f"{r:g}"] for c in scored], marker=".", lw=1.4, label=f"top-K at {r:.0%}")
    ax.plot(steps, [c["score"] for c in scored], color="black", lw=2, marker="o", label="score (mean)")
    if full is not None:
        ax.axhline(full, ls="--", color="grey", lw=1, label=f"all tokens ({full:.3f})")
    best = next(c for c in scored if c["step"] == best_step)
    ax.axvline(best_step + 1, color="tab:red", ls="--", lw=1)
    ax.annotate(f"{'best single' if average else 'chosen'}: step {best_step + 1} ({best['score']:.3f})",
                (best_step + 1, best["score"]), textcoords="offset points", xytext=(6, -14), color="tab:red", fontsize=8)
    if average is not None:
        steps_avg = [s + 1 for s in average["averaged"]]
        ax.axvspan(steps_avg[0], steps_avg[-1], color="tab:purple", alpha=0.08, lw=0)  # the averaged window
        ax.plot([average["step"] + 1], [average["score"]], marker="*", ms=14, color="tab:purple", ls="none",
                label=f"chosen: average of steps {steps_avg[0]}-{steps_avg[-1]} ({average['score']:.3f})")
    ax.set_xlabel("learner step")
    ax.set_ylabel("validation QA accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"policy selection ({scored[0].get('videos', '?')} validation videos)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def frame_for_step(num_frames: int, steps: int) -> list[int]:
    """Source frame shown for each temporal step of the token grid (``steps <= num_frames``, e.g.
    Qwen2-VL's temporal patches of 2 frames): the first frame of the step."""
    return [min(num_frames - 1, (t * num_frames) // steps) for t in range(steps)]


def masked_frame(frame: np.ndarray, kept: np.ndarray, dim: float = 0.22) -> np.ndarray:
    """uint8 ``[H, W, 3]`` and bool ``kept[gh, gw]`` -> the frame with dropped grid cells dimmed
    (cell boundaries at ``round(i * H / gh)``) and a thin light grid between cells."""
    h, w = frame.shape[:2]
    gh, gw = kept.shape
    ys = np.round(np.arange(gh + 1) * h / gh).astype(int)
    xs = np.round(np.arange(gw + 1) * w / gw).astype(int)
    cell = np.zeros((h, w), dtype=bool)
    for i in range(gh):
        for j in range(gw):
            if kept[i, j]:
                cell[ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = True
    out = frame.astype(np.float32)
    out[~cell] = out[~cell] * dim + 255 * 0.04
    if min(h / gh, w / gw) >= 6:  # grid lines only where cells are big enough to see
        for y in ys[1:-1]:
            out[y, :] = out[y, :] * 0.5 + 255 * 0.25
        for x in xs[1:-1]:
            out[:, x] = out[:, x] * 0.5 + 255 * 0.25
    return out.clip(0, 255).astype(np.uint8)


def mask_strip(frames: np.ndarray, masks: Sequence[np.ndarray], max_frames: int = 8, gap: int = 2) -> np.ndarray:
    """One uint8 ``[H', W', 3]`` image for TensorBoard (no matplotlib): row 0 the frames, then one
    row per mask with its dropped cells dimmed.

    frames: uint8 ``[F, H, W, 3]``; masks: bool ``[T, gh, gw]`` each (T <= F token steps). At most
    ``max_frames`` evenly spaced steps are shown."""
    T = int(masks[0].shape[0]) if masks else len(frames)
    src = frame_for_step(len(frames), T)
    n = min(T, max_frames)
    cols = sorted({round(i * (T - 1) / max(1, n - 1)) for i in range(n)})
    rows = [[frames[src[t]] for t in cols]] + [[masked_frame(frames[src[t]], np.asarray(m[t], bool)) for t in cols]
                                              for m in masks]
    h, w = frames.shape[1:3]
    out = np.full((len(rows) * (h + gap) - gap, len(cols) * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = img
    return out


def mask_overlay(frames: np.ndarray, keeps: Mapping[str, torch.Tensor | np.ndarray], grid: tuple[int, int, int],
                 path: str | Path, title: str | None = None, max_frames: int = 8) -> Path:
    """Paper-Figure-5-style panel: the frames in a row (top: original), then one row per method
    with its kept tokens shown and the dropped ones dimmed.

    frames: uint8 ``[F, H, W, 3]``; keeps: ``{method: sorted flat keep index into T*gh*gw}``;
    grid: ``(T, gh, gw)`` of the token grid (T <= F). At most ``max_frames`` evenly spaced steps
    are drawn; each row's label gives the kept count over the whole video."""
    path = Path(path)
    frames = np.asarray(frames)
    T, gh, gw = grid
    n = gh * gw
    steps = np.unique(np.round(np.linspace(0, T - 1, min(T, max_frames))).astype(int))
    src = frame_for_step(len(frames), T)
    rows = [("all tokens", None)] + list(keeps.items())
    fig, axes = plt.subplots(len(rows), len(steps), figsize=(1.25 * len(steps) + 1.2, 1.3 * len(rows) + 0.5),
                             dpi=110, squeeze=False)
    for r, (name, keep) in enumerate(rows):
        mask = None
        if keep is not None:
            idx = np.asarray(keep.cpu() if isinstance(keep, torch.Tensor) else keep, dtype=np.int64)
            mask = np.zeros(T * n, dtype=bool)
            mask[idx] = True
            mask = mask.reshape(T, gh, gw)
        for c, t in enumerate(steps):
            ax = axes[r, c]
            img = frames[src[t]]
            ax.imshow(img if mask is None else masked_frame(img, mask[t]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={t}", fontsize=7)
            if c == 0:
                label = name if mask is None else f"{name}\n{int(mask.sum())}/{T * n}"
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def check_png(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of a PNG, read back with PIL (raises if it is not a valid image)."""
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


__all__: Sequence[str] = ("plot_accuracy_vs_retention", "plot_validation", "mask_overlay", "masked_frame", "frame_for_step", "check_png")

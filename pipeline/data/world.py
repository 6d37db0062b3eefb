"""The shapes world: a seeded generator of image-caption pairs and videos with captions and QA.

Static textured backgrounds are the redundant tokens; small coloured shapes that move, appear,
disappear or change colour carry the answers. Every question names or asks about a small object
(colour, shape, motion direction, colour change, appearance order), so which tokens are kept
decides whether it can be answered. Each sample is drawn from its own RNG stream
``(seed, split, kind, index)``: the written shards are reproducible byte for byte, and training
code can draw unlimited fresh samples from another split without touching the held-out ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import COLORS, SHAPES, WorldConfig
from pipeline.data.shards import write_video_shard

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
QUESTION_TYPES = ("color", "shape", "direction", "change", "order")
SPLITS = {"eval": 0, "train": 1, "test": 2, "val": 3}
_KINDS = {"image": 0, "video": 1}

# Word-level vocabulary of everything the world writes (captions, questions, answers).
_FIXED_WORDS = (
    "a what color is the shape object which way does move moves stays appears disappears "
    "turn turns bounces first or then describe video image question answer and"
).split()
VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(_FIXED_WORDS + list(COLORS) + list(SHAPES) + list(DIRECTIONS) + [".", ",", "?", ":"])
)


@dataclass
class Obj:
    """One object's track. ``window`` is the half-open range of frames where it is visible."""

    id: int
    shape: str
    color: str
    motion: str
    pos: np.ndarray  # [T, 2] centre (x, y) in pixels
    window: tuple[int, int]
    new_color: str | None = None
    change_at: int | None = None
    direction: str | None = None
    boxes: list = field(default_factory=list)

    def color_at(self, t: int) -> str:
        if self.change_at is not None and t >= self.change_at:
            return self.new_color
        return self.color


def sample_rng(seed: int, split: str, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], _KINDS[kind], index])


# ---------------------------------------------------------------------------------------------
# Rendering


@functools.lru_cache(maxsize=4)
def _photos(size: int) -> tuple[np.ndarray, ...]:
    """Real photos bundled with scikit-image, centre-cropped and resized to ``2*size``."""
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        a = getattr(data, name)()
        h, w = a.shape[:2]
        s = min(h, w)
        a = a[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        out.append(np.asarray(Image.fromarray(a).resize((2 * size, 2 * size), Image.BILINEAR)))
    return tuple(out)


def _background(rng: np.random.Generator, cfg: WorldConfig, span: int, kind: str) -> np.ndarray:
    """A float [span, span, 3] canvas in 0..1 (larger than the frame when the camera pans)."""
    base = rng.uniform(0.25, 0.55, size=3) * np.array([1.0, 0.95, 0.85])  # muted, low saturation
    if kind == "plain":
        return np.broadcast_to(base, (span, span, 3)).copy()
    yy, xx = np.mgrid[0:span, 0:span] / span
    if kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        g = (np.cos(a) * xx + np.sin(a) * yy)[..., None]
        return np.clip(base + 0.25 * (g - 0.5), 0, 1)
    if kind == "texture":
        # Smooth value noise: a few octaves of bilinearly upsampled random grids.
        tex = np.zeros((span, span))
        for cells, amp in ((4, 0.5), (8, 0.3), (16, 0.2)):
            grid = rng.uniform(-1, 1, size=(cells + 1, cells + 1))
            gy, gx = yy * cells, xx * cells
            y0, x0 = gy.astype(int), gx.astype(int)
            fy, fx = gy - y0, gx - x0
            tex += amp * (
                grid[y0, x0] * (1 - fy) * (1 - fx) + grid[y0 + 1, x0] * fy * (1 - fx)
                + grid[y0, x0 + 1] * (1 - fy) * fx + grid[y0 + 1, x0 + 1] * fy * fx
            )
        return np.clip(base + 0.18 * tex[..., None], 0, 1)
    photos = _photos(cfg.size)
    p = photos[rng.integers(len(photos))].astype(np.float64) / 255.0
    off = rng.integers(0, p.shape[0] - span + 1, size=2) if p.shape[0] > span else (0, 0)
    crop = p[off[0] : off[0] + span, off[1] : off[1] + span]
    return 0.35 + 0.4 * crop  # low contrast so the shapes' colours stay distinct


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.82 * r) & (np.abs(dy) <= 0.82 * r)
    if shape == "triangle":
        return (dy <= 0.8 * r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.62)
    if shape == "cross":
        arm = 0.33 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape}")


def _draw_range(rng: np.random.Generator, v: float | tuple[float, float]) -> float:
    """A knob's value for one sample: a scalar as it is (no draw: a fixed world's stream is
    unchanged), a ``[lo, hi]`` range uniformly."""
    return float(rng.uniform(v[0], v[1])) if isinstance(v, tuple) else float(v)


def _render(cfg: WorldConfig, rng: np.random.Generator, objs: list[Obj], frames: int) -> np.ndarray:
    size = cfg.size
    kind = cfg.background if isinstance(cfg.background, str) else cfg.background[rng.integers(len(cfg.background))]
    noise = _draw_range(rng, cfg.noise)
    pan = int(round(_draw_range(rng, cfg.pan) * size))
    canvas = _background(rng, cfg, size + pan, kind)
    pan_dir = DIRECTIONS[list(DIRECTIONS)[rng.integers(4)]] if pan else (0, 0)
    r = cfg.object_size * size / 2
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        # Camera pan: a window sliding over the larger canvas (objects stay in frame coordinates).
        s = t / max(frames - 1, 1) * pan
        ox = int(round(s if pan_dir[0] > 0 else pan - s if pan_dir[0] < 0 else pan / 2))
        oy = int(round(s if pan_dir[1] > 0 else pan - s if pan_dir[1] < 0 else pan / 2))
        img = canvas[oy : oy + size, ox : ox + size].copy()
        for o in objs:
            if o.window[0] <= t < o.window[1]:
                cx, cy = o.pos[t]
                m = _shape_mask(o.shape, cx, cy, r, size)
                img[m] = np.array(COLORS[o.color_at(t)]) / 255.0
        if noise > 0:
            img = img + rng.normal(0, noise, size=img.shape)
        out[t] = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    return out


def _boxes(o: Obj, r: float, size: int, frames: int) -> list:
    """Per-frame ``[x0, y0, x1, y1]`` pixel box (``None`` while invisible): the oracle's annotation."""
    out = []
    for t in range(frames):
        if o.window[0] <= t < o.window[1]:
            cx, cy = o.pos[t]
            out.append([round(max(cx - r, 0.0), 2), round(max(cy - r, 0.0), 2),
                        round(min(cx + r, size), 2), round(min(cy + r, size), 2)])
        else:
            out.append(None)
    return out


# ---------------------------------------------------------------------------------------------
# Scenes


def _cell_centre(cfg: WorldConfig, cell: np.ndarray) -> np.ndarray:
    return (np.asarray(cell, dtype=float) + 0.5) * (cfg.size / cfg.grid)


def _track(rng: np.random.Generator, cfg: WorldConfig, motion: str, frames: int) -> tuple[np.ndarray, str | None]:
    """Per-frame grid cells ``[T, 2]`` (x, y) of one object, and its direction for linear motion.

    Objects sit in the cells of the token grid and move a whole cell at a time: each object is
    then exactly one visual token, so a question's object is a small, well-defined set of tokens.
    """
    g = cfg.grid
    if motion == "linear" and g > 1:
        direction = list(DIRECTIONS)[rng.integers(4)]
        d = np.array(DIRECTIONS[direction])
        travel = int(rng.integers(max(1, (g - 1) // 2), g))  # cells travelled over the video
        start = rng.integers(0, g, size=2)
        for axis in (0, 1):
            if d[axis] > 0:
                start[axis] = rng.integers(0, g - travel)
            elif d[axis] < 0:
                start[axis] = rng.integers(travel, g)
        steps = np.round(np.linspace(0, travel, frames)).astype(int)
        return start[None] + d[None] * steps[:, None], direction
    cells = np.repeat(rng.integers(0, g, size=2)[None], frames, axis=0)
    if motion == "bounce":  # a random walk of single-cell hops that stays inside the grid
        for t in range(1, frames):
            cells[t] = cells[t - 1]
            if rng.random() < 0.3:
                axis = rng.integers(2)
                step = rng.choice([-1, 1])
                if not 0 <= cells[t, axis] + step < g:
                    step = -step
                cells[t, axis] += step
    return cells, None


def _collide(cells: list[np.ndarray]) -> bool:
    """Whether any two of these ``[T, 2]`` tracks share a cell in some frame."""
    occupied = np.stack([c[:, 0] * 1_000_003 + c[:, 1] for c in cells])  # [n, T]
    return any(len(set(occupied[:, t])) < len(cells) for t in range(occupied.shape[1]))


def _make_objects(rng: np.random.Generator, cfg: WorldConfig, n: int, frames: int, motions: list[str]) -> list[Obj]:
    size, r = cfg.size, cfg.object_size * cfg.size / 2
    shapes = rng.permutation(SHAPES)[:n]
    colors = rng.permutation(list(COLORS))
    # Tracks that never share a cell in a frame: joint rejection sampling, then (crowded grids)
    # each object redrawn in turn until it misses the ones already placed.
    for _ in range(100):
        tracks = [_track(rng, cfg, motions[i], frames) for i in range(n)]
        if not _collide([c for c, _ in tracks]):
            break
    else:
        for i in range(1, n):
            for _ in range(1000):
                if not _collide([c for c, _ in tracks[:i + 1]]):
                    break
                tracks[i] = _track(rng, cfg, motions[i], frames)
            else:  # WorldConfig's checks keep worlds out of this
                raise ValueError(f"cannot place {n} objects with motions {motions} on a {cfg.grid}x{cfg.grid} grid "
                                 "without overlap: lower world.max_objects or raise world.grid")
    objs = []
    for i in range(n):
        cells, direction = tracks[i]
        jitter = rng.uniform(-cfg.jitter, cfg.jitter, size=2)
        pos = _cell_centre(cfg, cells) + jitter[None]
        o = Obj(id=i, shape=str(shapes[i]), color=str(colors[i]), motion=motions[i], pos=pos,
                window=(0, frames), direction=direction)
        if o.motion == "appear":
            o.window = (int(rng.integers(frames // 4, frames - frames // 4)), frames)
        elif o.motion == "disappear":
            o.window = (0, int(rng.integers(frames // 4, frames - frames // 4)))
        elif o.motion == "color_change":
            o.change_at = int(rng.integers(frames // 4, frames - frames // 4))
            o.new_color = str(colors[n + i % (len(colors) - n)])  # a colour no other object has
        objs.append(o)
    for o in objs:
        o.boxes = _boxes(o, r, size, frames)
    return objs


def _describe(o: Obj) -> str:
    verb = {
        "static": "stays",
        "linear": f"moves {o.direction}",
        "bounce": "bounces",
        "appear": "appears",
        "disappear": "disappears",
        "color_change": f"turns {o.new_color}",
    }[o.motion]
    return f"a {o.color} {o.shape} {verb} ."


def _questions(rng: np.random.Generator, objs: list[Obj]) -> list[dict[str, Any]]:
    """All answerable questions about the scene, each naming the objects it is about."""
    qs: list[dict[str, Any]] = []

    def add(qtype: str, question: str, answer: str, pool: list[str], about: list[Obj]) -> None:
        distract = [w for w in pool if w != answer]
        opts = [answer] + [str(w) for w in rng.permutation(distract)[:3]]
        qs.append({"type": qtype, "question": question, "answer": answer,
                   "options": [str(w) for w in rng.permutation(opts)], "objects": [o.id for o in about]})

    for o in objs:
        if o.motion != "color_change":
            add("color", f"what color is the {o.shape} ?", o.color, list(COLORS), [o])
            add("shape", f"what shape is the {o.color} object ?", o.shape, list(SHAPES), [o])
        else:
            add("change", f"what color does the {o.shape} turn ?", o.new_color, list(COLORS), [o])
        if o.motion == "linear":
            add("direction", f"which way does the {o.color} {o.shape} move ?", o.direction, list(DIRECTIONS), [o])
    appear = [o for o in objs if o.motion == "appear"]
    steady = [o for o in objs if o.window[0] == 0 and o.motion != "appear"]
    for a in appear:
        for b in steady[:1]:
            first, other = (b, a)
            pair = [first.shape, other.shape] if rng.random() < 0.5 else [other.shape, first.shape]
            add("order", f"which appears first , the {pair[0]} or the {pair[1]} ?", first.shape, pair, [a, b])
    return qs


def make_video(cfg: WorldConfig, rng: np.random.Generator, frames: int | None = None) -> dict[str, Any]:
    """One video sample: frames uint8 [T,S,S,3], caption, qa list, object tracks. ``T``: ``frames``,
    else ``cfg.frames``, or with ``cfg.frames_max`` a count drawn first from ``rng`` in
    ``[frames, frames_max]`` (no draw without a range, so a world without one is unchanged)."""
    if frames is None and cfg.frames_max is not None:
        frames = int(rng.integers(cfg.frames, cfg.frames_max + 1))
    frames = frames or cfg.frames
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    motions = [str(rng.choice(cfg.motion)) for _ in range(n)]
    objs = _make_objects(rng, cfg, n, frames, motions)
    order = sorted(objs, key=lambda o: (o.window[0], o.id))
    qa = _questions(rng, objs)
    rng.shuffle(qa)  # qa[0] is the sample's primary question; balanced over types by randomness
    return {
        "frames": _render(cfg, rng, objs, frames),
        "caption": " ".join(_describe(o) for o in order),
        "qa": qa,
        "objects": [{"id": o.id, "shape": o.shape, "color": o.color, "motion": o.motion, "new_color": o.new_color,
                     "change_at": o.change_at, "direction": o.direction, "boxes": o.boxes} for o in objs],
    }


def token_labels(objects: list[dict], frames: int, size: int, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Dense per-token targets ``(color_id, shape_id)``, each int64 ``[frames, gh*gw]``: the
    object covering most of a token's cell (index into COLORS / SHAPES), or -1 for background.
    Used only as an auxiliary pre-training signal for the reference model's vision side."""
    gh, gw = grid
    ch, cw = size / gh, size / gw
    colors, shapes = list(COLORS), list(SHAPES)
    best = np.zeros((frames, gh, gw))
    col = np.full((frames, gh, gw), -1, dtype=np.int64)
    shp = np.full((frames, gh, gw), -1, dtype=np.int64)
    min_area = 0.25 * (min((b[2] - b[0]) * (b[3] - b[1]) for o in objects for b in o["boxes"] if b) if objects else 0)
    for o in objects:
        for t, b in enumerate(o["boxes"]):
            if b is None:
                continue
            c = o["new_color"] if o.get("change_at") is not None and t >= o["change_at"] else o["color"]
            for gy in range(gh):
                iy = min(b[3], (gy + 1) * ch) - max(b[1], gy * ch)
                for gx in range(gw):
                    ix = min(b[2], (gx + 1) * cw) - max(b[0], gx * cw)
                    area = ix * iy if ix > 0 and iy > 0 else 0.0
                    if area >= min_area and area > best[t, gy, gx]:
                        best[t, gy, gx] = area
                        col[t, gy, gx] = colors.index(c)
                        shp[t, gy, gx] = shapes.index(o["shape"])
    return col.reshape(frames, -1), shp.reshape(frames, -1)


def token_directions(objects: list[dict], frames: int, size: int, grid: tuple[int, int]) -> np.ndarray:
    """Dense per-token motion targets, int64 ``[frames, gh*gw]``: index into DIRECTIONS on the
    token of a linearly moving object in every frame after it has left its first cell (before
    that its tokens cannot tell the direction), -1 elsewhere. An auxiliary pre-training signal."""
    gh, gw = grid
    out = np.full((frames, gh, gw), -1, dtype=np.int64)
    for o in objects:
        if not o.get("direction"):
            continue
        cells = [None if b is None else (int((b[1] + b[3]) / 2 * gh / size), int((b[0] + b[2]) / 2 * gw / size))
                 for b in o["boxes"]]
        start = next((c for c in cells if c is not None), None)
        for t, c in enumerate(cells):
            if c is not None and c != start:
                out[t, min(c[0], gh - 1), min(c[1], gw - 1)] = list(DIRECTIONS).index(o["direction"])
    return out.reshape(frames, -1)


def make_image(cfg: WorldConfig, rng: np.random.Generator) -> dict[str, Any]:
    """One image-caption sample: static objects, caption lists them left to right."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objs = _make_objects(rng, cfg, n, 1, ["static"] * n)
    image = _render(cfg, rng, objs, 1)[0]
    left_to_right = sorted(objs, key=lambda o: o.pos[0, 0])
    caption = " , ".join(f"a {o.color} {o.shape}" for o in left_to_right) + " ."
    return {"image": image, "caption": caption,
            "objects": [{"id": o.id, "shape": o.shape, "color": o.color, "box": o.boxes[0]} for o in objs]}


def generate_world(cfg: WorldConfig, out: str | Path, progress: bool = True, fmt: str = "native") -> dict[str, int]:
    """Write the training material from the ``train`` split, ``out/images/shard-*.parquet`` and
    ``out/videos/{clips/*.mp4, annotations-*.jsonl}``, and the evaluation set from the disjoint
    ``eval`` split, ``out/heldout/videos/`` (``cfg.heldout_videos`` videos, never trained on: not
    by score-tiny, which draws fresh ``train`` samples, nor by the policy, which reads ``videos/``),
    and the validation set from the disjoint ``val`` split, ``out/val/videos/`` (``cfg.val_videos``;
    what ``jobs/select_policy.py`` chooses the final policy on, so the eval split stays unseen).
    ``fmt``: the format of ``images/`` and ``videos/`` (:mod:`pipeline.data.world_formats`:
    native, llava, webdataset); the held-out and validation videos are always native."""
    from tqdm import tqdm

    from pipeline.data.world_formats import WorldWriter

    out = Path(out)
    writer = WorldWriter(fmt, out, {"images": -(-cfg.images // cfg.shard_size), "videos": -(-cfg.videos // cfg.shard_size)})
    n_img_shards = 0
    for start in tqdm(range(0, cfg.images, cfg.shard_size), desc="image shards", disable=not progress):
        recs = []
        for i in range(start, min(start + cfg.shard_size, cfg.images)):
            s = make_image(cfg, sample_rng(cfg.seed, "train", "image", i))
            recs.append({"id": f"img-train-{cfg.seed}-{i:06d}", **s})
        writer.images(n_img_shards, recs)
        n_img_shards += 1
    shards = {}
    splits = (("train", out / "videos", cfg.videos), ("eval", out / HELDOUT, cfg.heldout_videos), ("val", out / VAL, cfg.val_videos))
    for split, folder, count in splits:
        n = 0
        for start in tqdm(range(0, count, cfg.shard_size), desc=f"{split} video shards", disable=not progress):
            recs = []
            for i in range(start, min(start + cfg.shard_size, count)):
                s = make_video(cfg, sample_rng(cfg.seed, split, "video", i))
                recs.append({"id": f"vid-{split}-{cfg.seed}-{i:06d}", **s})
            if split == "train":
                writer.videos(n, recs, fps=cfg.fps)
            else:
                write_video_shard(folder, n, recs, fps=cfg.fps)
            n += 1
        shards[split] = n
    writer.close()
    (out / "world.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    return {"images": cfg.images, "videos": cfg.videos, "heldout_videos": cfg.heldout_videos, "val_videos": cfg.val_videos,
            "image_shards": n_img_shards, "video_shards": shards["train"], "heldout_shards": shards["eval"],
            "val_shards": shards["val"], "format": fmt}


HELDOUT = "heldout/videos"  # under a world directory: the evaluation videos (eval split)
VAL = "val/videos"  # under a world directory: the validation videos (val split)


def heldout_videos(world: str | Path) -> Path:
    """``<world>/heldout/videos``, or ``FileNotFoundError`` saying how to make it."""
    p = Path(world) / HELDOUT
    if not p.is_dir():
        raise FileNotFoundError(f"{world} has no held-out videos ({HELDOUT}/): regenerate it with "
                                f"python jobs/make_world.py --out {world}")
    return p

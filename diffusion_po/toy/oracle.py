"""The toy world's preference oracle: a deterministic reward of (image, caption) computed from pixels.

How an image is scored against its caption (all numbers in pixels of the 32x32 image):

1. **Background**: the per-channel median of the one-pixel border. A pixel is *foreground* when its RGB
   distance to the background exceeds 60 (palette colours are 150+ away from every background).
2. **Slots**: a single-shape caption looks at the whole image; "A and B" at the left / right halves;
   "A above B" at the top / bottom halves. In each slot the shape is the largest 4-connected foreground
   component (at least 4 pixels, else every score of that slot is 0).
3. Per shape (each in [0, 1]):
   - *colour*: mean over the slot's foreground pixels of exp(-(d / 80)^2), d = RGB distance to the
     caption's colour (so stray or wrong-coloured pixels count against it);
   - *shape*: IoU of the component with the caption's shape drawn with the same area and centroid;
   - *size*: exp(-((h - h*) / 1.5)^2), h = the half-extent implied by the area for the caption's shape,
     h* = 4 (small) or 7 (large);
   - *position*: exp(-(dist / 4)^2), dist = distance of the shape's centre from where the caption puts it.
4. *clean* (whole image): 1 - (foreground pixels outside the slots' shapes) / 40, floored at 0, times the
   *sharpness* 1 - clip((r - 0.3) / 0.5, 0, 1), r = the ratio of soft pixels (distance to the background
   between 25 and 60, i.e. neither background nor shape) to foreground pixels.

    reward = mean over shapes of (0.30 colour + 0.25 shape + 0.15 size + 0.15 position) + 0.15 clean

A perfect render scores about 0.95; blur, wrong colours, wrong shapes, misplaced or missing shapes
lower it smoothly, so sampled images land mid-range with room to improve.

Accuracy sub-scores (caption following): `colour_ok` (the majority palette colour of the slot's
foreground is the caption's), `shape_ok` (the caption's shape has the highest IoU of the three),
`size_ok`, `position_ok`; `describe(image, caption)` writes what the oracle sees as a caption of the same
layout (the per-image captions of DCPO data). `colour_fraction(image, colour)` measures a concept for
negative prompts (NPO / Perp-Neg).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from diffusion_po.toy import world
from diffusion_po.toy.world import COLOURS, POSITIONS, SHAPES, SIZES, SceneSpec, ShapeSpec

FG_THRESHOLD = 60.0
SOFT_THRESHOLD = 25.0
WEIGHTS = {"colour": 0.30, "shape": 0.25, "size": 0.15, "position": 0.15, "clean": 0.15}
_AREA_FACTOR = {"circle": float(np.pi), "square": 4.0, "triangle": 2.0}
_PALETTE = np.array([COLOURS[c] for c in COLOURS], dtype=np.float64)
_PALETTE_NAMES = list(COLOURS)


@dataclass
class ShapeScore:
    """The scores of one shape slot."""

    colour: float = 0.0
    shape: float = 0.0
    size: float = 0.0
    position: float = 0.0
    colour_ok: bool = False
    shape_ok: bool = False
    size_ok: bool = False
    position_ok: bool = False
    seen_colour: str | None = None
    seen_shape: str | None = None
    seen_size: str | None = None
    seen_position: str | None = None


@dataclass
class OracleResult:
    """The reward of one (image, caption) and its parts."""

    reward: float
    colour: float
    shape: float
    size: float
    position: float
    clean: float
    colour_ok: float
    shape_ok: float
    size_ok: float
    position_ok: float
    shapes: list[ShapeScore]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("shapes")
        return d


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB float array (H, W, 3) in [0, 255]; images of another size are resized to 32x32."""
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float64)
        if arr.max() <= 1.0 + 1e-6 and arr.dtype != np.uint8:
            arr = arr * 255.0
        return arr
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (world.RESOLUTION, world.RESOLUTION):
        image = image.resize((world.RESOLUTION, world.RESOLUTION), Image.BILINEAR)
    return np.asarray(image, dtype=np.float64)


def background_colour(arr: np.ndarray) -> np.ndarray:
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    return np.median(border, axis=0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (empty if none)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = []
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _slot_masks(spec: SceneSpec, size: int) -> list[np.ndarray]:
    full = np.ones((size, size), dtype=bool)
    if spec.layout == "single":
        return [full]
    half = size // 2
    a, b = np.zeros_like(full), np.zeros_like(full)
    if spec.layout == "row":
        a[:, :half], b[:, half:] = True, True
    else:
        a[:half, :], b[half:, :] = True, True
    return [a, b]


def _template(shape: str, area: float, cx: float, cy: float, size: int) -> tuple[np.ndarray, float, float]:
    """`shape` with the given area whose centroid is (cx, cy); returns (coverage, half-extent, centre y)."""
    half = float(np.sqrt(max(area, 1.0) / _AREA_FACTOR[shape]))
    centre_y = cy - half / 3.0 if shape == "triangle" else cy  # a triangle's centroid sits h/3 below its centre
    return world.shape_mask(shape, cx, centre_y, half, size, ss=2), half, centre_y


def _iou(mask: np.ndarray, cover: np.ndarray) -> float:
    m = mask.astype(np.float64)
    inter = np.minimum(m, cover).sum()
    union = np.maximum(m, cover).sum()
    return float(inter / union) if union > 0 else 0.0


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(pixels[:, None, :] - _PALETTE[None, :, :], axis=-1)
    return d.argmin(axis=1)


def _score_shape(arr: np.ndarray, fg: np.ndarray, slot: np.ndarray, want: ShapeSpec,
                 centre: tuple[float, float]) -> tuple[ShapeScore, np.ndarray]:
    size = arr.shape[0]
    region = fg & slot
    comp = _largest_component(region)
    score = ShapeScore()
    if comp.sum() < 4:
        return score, comp
    pixels = arr[region]
    target = np.array(COLOURS[want.colour], dtype=np.float64)
    d = np.linalg.norm(pixels - target, axis=1)
    score.colour = float(np.exp(-((d / 80.0) ** 2)).mean())
    votes = np.bincount(_nearest_palette(arr[comp]), minlength=len(_PALETTE_NAMES))
    score.seen_colour = _PALETTE_NAMES[int(votes.argmax())]
    score.colour_ok = score.seen_colour == want.colour

    ys, xs = np.nonzero(comp)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    area = float(comp.sum())
    ious, halves, centres = {}, {}, {}
    for shape in SHAPES:
        cover, half, centre_y = _template(shape, area, cx, cy, size)
        ious[shape], halves[shape], centres[shape] = _iou(comp, cover), half, (cx, centre_y)
    score.shape = ious[want.shape]
    score.seen_shape = max(ious, key=lambda k: ious[k])
    score.shape_ok = score.seen_shape == want.shape

    half = halves[want.shape]
    score.size = float(np.exp(-(((half - SIZES[want.size]) / 1.5) ** 2)))
    seen_half = halves[score.seen_shape]
    score.seen_size = min(SIZES, key=lambda k: abs(SIZES[k] - seen_half))
    score.size_ok = score.seen_size == want.size

    scx, scy = centres[want.shape]
    dist = float(np.hypot(scx - centre[0], scy - centre[1]))
    score.position = float(np.exp(-((dist / 4.0) ** 2)))
    seen_cx, seen_cy = centres[score.seen_shape]
    score.seen_position = min(POSITIONS, key=lambda k: np.hypot(POSITIONS[k][0] - seen_cx, POSITIONS[k][1] - seen_cy))
    score.position_ok = dist < 4.0 if want.position is None else score.seen_position == want.position
    return score, comp


def score(image: Image.Image | np.ndarray, caption: str | SceneSpec) -> OracleResult:
    """Score one image against its caption (see the module docstring for the formula)."""
    spec = world.parse_caption(caption) if isinstance(caption, str) else caption
    arr = to_array(image)
    size = arr.shape[0]
    bg = background_colour(arr)
    dist = np.linalg.norm(arr - bg, axis=-1)
    fg = dist > FG_THRESHOLD
    soft = (dist > SOFT_THRESHOLD) & ~fg
    slots = _slot_masks(spec, size)
    scale = size / world.RESOLUTION
    shapes: list[ShapeScore] = []
    covered = np.zeros_like(fg)
    for want, slot, centre in zip(spec.shapes, slots, spec.expected_centres()):
        s, comp = _score_shape(arr, fg, slot, want, (centre[0] * scale, centre[1] * scale))
        shapes.append(s)
        covered |= comp
    stray = float((fg & ~covered).sum())
    n_fg = float(fg.sum())
    tidy = max(0.0, 1.0 - stray / (40.0 * scale * scale))
    soft_ratio = float(soft.sum()) / max(n_fg, 1.0)
    sharp = 1.0 - float(np.clip((soft_ratio - 0.3) / 0.5, 0.0, 1.0))
    clean = tidy * sharp if n_fg > 0 else 0.0

    def mean(key: str) -> float:
        return float(np.mean([float(getattr(s, key)) for s in shapes]))

    per_shape = sum(WEIGHTS[k] * mean(k) for k in ("colour", "shape", "size", "position"))
    reward = per_shape + WEIGHTS["clean"] * clean
    return OracleResult(
        reward=float(reward), colour=mean("colour"), shape=mean("shape"), size=mean("size"),
        position=mean("position"), clean=float(clean), colour_ok=mean("colour_ok"), shape_ok=mean("shape_ok"),
        size_ok=mean("size_ok"), position_ok=mean("position_ok"), shapes=shapes,
    )


def reward(image: Image.Image | np.ndarray, caption: str | SceneSpec) -> float:
    """The scalar reward in [0, 1]."""
    return score(image, caption).reward


def describe(image: Image.Image | np.ndarray, caption: str | SceneSpec) -> str:
    """What the oracle sees, as a caption of the same layout as `caption` (unseen parts keep the caption's words)."""
    spec = world.parse_caption(caption) if isinstance(caption, str) else caption
    result = score(image, spec)
    shapes = []
    for want, seen in zip(spec.shapes, result.shapes):
        new = replace(want, colour=seen.seen_colour or want.colour, shape=seen.seen_shape or want.shape,
                      size=seen.seen_size or want.size)
        if spec.layout == "single":
            new = replace(new, position=seen.seen_position or want.position)
        shapes.append(new)
    return SceneSpec(spec.layout, tuple(shapes)).caption()


def colour_fraction(image: Image.Image | np.ndarray, colour: str, of_foreground: bool = False) -> float:
    """Fraction of the image's pixels that are foreground and within RGB distance 80 of palette colour `colour`
    (how much of a concept is present; blended edge pixels count for nothing). `of_foreground`: the fraction of
    the foreground pixels instead (0 without foreground), so an image drawn all in `colour` scores about 1."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour '{colour}'; choose one of {', '.join(COLOURS)}")
    arr = to_array(image)
    fg = np.linalg.norm(arr - background_colour(arr), axis=-1) > FG_THRESHOLD
    close = np.linalg.norm(arr - np.array(COLOURS[colour], dtype=np.float64), axis=-1) < 80.0
    total = float(fg.sum()) if of_foreground else float(fg.size)
    return float((fg & close).sum()) / total if total else 0.0


def score_many(images: list, captions: list[str]) -> list[OracleResult]:
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    return [score(im, c) for im, c in zip(images, captions)]


def summarize(results: list[OracleResult]) -> dict[str, float]:
    """Means of the reward and of every sub-score over `results`."""
    if not results:
        return {}
    keys = results[0].to_dict().keys()
    return {k: float(np.mean([r.to_dict()[k] for r in results])) for k in keys}


__all__ = [
    "OracleResult", "ShapeScore", "WEIGHTS", "colour_fraction", "describe", "reward", "score", "score_many",
    "summarize", "to_array",
]

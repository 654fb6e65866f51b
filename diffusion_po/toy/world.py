"""The toy world: procedural captioned scenes of coloured shapes, 32x32, deterministic from a seed.

A scene holds one shape (placed left / center / right / top / bottom) or two shapes side by side
("... and ...", left then right) or stacked ("... above ..."). Every shape has a colour (red, green,
blue, yellow), a kind (circle, square, triangle) and a size (small, large). The caption is generated
from the scene and `parse_caption` reads it back into a `SceneSpec`, so a caption can be perturbed
(DCPO), a colour word can serve as a negative concept (NPO / Perp-Neg), and any caption can be rendered
perfectly (the "expert" images for DRO). The background (light colour, plain or lightly textured) and
small jitters of position and size are not in the caption.

Captions (984 in all) are split by a fixed hash into `train`, `val` and `test` prompts; the base model is
pretrained on the whole world, preference data comes from `train` prompts and evaluation uses `test`.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image

RESOLUTION = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 4.0, "large": 7.0}
"""Half-extent in pixels: circle radius, half the square's side, half the triangle's base and height."""
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (9.0, 16.0),
    "center": (16.0, 16.0),
    "right": (23.0, 16.0),
    "top": (16.0, 9.0),
    "bottom": (16.0, 23.0),
}
POSITION_PHRASES = {
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
LAYOUTS = ("single", "row", "column")
"""single: one shape at a named position; row: two shapes left and right; column: two shapes top and bottom."""
SLOT_CENTRES: dict[str, tuple[tuple[float, float], ...]] = {
    "single": (),
    "row": ((8.5, 16.0), (23.5, 16.0)),
    "column": ((16.0, 8.5), (16.0, 23.5)),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 236),
    "grey": (205, 205, 205),
    "beige": (232, 222, 200),
    "mist": (212, 224, 232),
}
TEXTURES = ("plain", "noise", "stripes")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ShapeSpec:
    """What a caption says about one shape."""

    colour: str
    shape: str
    size: str
    position: str | None = None
    """Only for the single-shape layout; in two-shape layouts the slot fixes the place."""

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class SceneSpec:
    """The caption-level content of a scene: its layout and its shapes (left/top first)."""

    layout: str
    shapes: tuple[ShapeSpec, ...]

    def caption(self) -> str:
        if self.layout == "single":
            s = self.shapes[0]
            return f"{s.phrase()} {POSITION_PHRASES[s.position or 'center']}"
        joiner = " and " if self.layout == "row" else " above "
        return joiner.join(s.phrase() for s in self.shapes)

    def expected_centres(self) -> list[tuple[float, float]]:
        """Where each shape's centre should be, in pixels (x, y)."""
        if self.layout == "single":
            return [POSITIONS[self.shapes[0].position or "center"]]
        return list(SLOT_CENTRES[self.layout])

    def colours(self) -> list[str]:
        return [s.colour for s in self.shapes]


@dataclass(frozen=True)
class PlacedShape:
    """A shape as drawn: its spec plus the exact centre and half-extent (jittered)."""

    spec: ShapeSpec
    cx: float
    cy: float
    half: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """A fully determined scene: spec, placed shapes, background colour and texture, texture seed."""

    spec: SceneSpec
    shapes: tuple[PlacedShape, ...]
    background: str
    texture: str
    texture_seed: int

    @property
    def caption(self) -> str:
        return self.spec.caption()


# ----------------------------------------------------------------------------- captions
def all_specs() -> list[SceneSpec]:
    """Every caption-level scene of the world, in a fixed order (120 single + 432 row + 432 column)."""
    out: list[SceneSpec] = []
    for colour, shape, size, pos in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS):
        out.append(SceneSpec("single", (ShapeSpec(colour, shape, size, pos),)))
    for layout in ("row", "column"):
        for c1, c2 in itertools.permutations(COLOURS, 2):
            for s1, s2 in itertools.product(SHAPES, SHAPES):
                for z1, z2 in itertools.product(SIZES, SIZES):
                    out.append(SceneSpec(layout, (ShapeSpec(c1, s1, z1), ShapeSpec(c2, s2, z2))))
    return out


@lru_cache(maxsize=1)
def all_captions() -> tuple[str, ...]:
    return tuple(s.caption() for s in all_specs())


def caption_split(text: str) -> str:
    """The fixed split of a caption: 'train' (about 60%), 'val' (15%) or 'test' (25%), by SHA-1."""
    h = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 100
    return "test" if h < 25 else ("val" if h < 40 else "train")


def split_captions(split: str) -> list[str]:
    """All captions of one split, in the world's fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    return [c for c in all_captions() if caption_split(c) == split]


def held_out_prompts(n: int, seed: int = 0, split: str = "test") -> list[str]:
    """`n` prompts from a held-out split (default `test`), shuffled by `seed`; cycles when `n` exceeds the split."""
    return shuffled_cycle(split_captions(split), n, seed)


def shuffled_cycle(pool: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """`n` items of `pool`: the pool shuffled by `seed`, then shuffled again for each further pass."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        block = list(pool)
        rng.shuffle(block)
        out.extend(block)
    return out[:n]


def train_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts from the `train` split (shuffled, cycling)."""
    return held_out_prompts(n, seed, split="train")


_SHAPE_RE = r"an? (small|large) (red|green|blue|yellow) (circle|square|triangle)"
_SINGLE_RE = re.compile(rf"^{_SHAPE_RE} (on the left|in the center|on the right|at the top|at the bottom)$")
_PAIR_RE = re.compile(rf"^{_SHAPE_RE} (and|above) {_SHAPE_RE}$")


def parse_caption(text: str) -> SceneSpec:
    """Read a toy caption back into a `SceneSpec`; raises ValueError naming the text when it is not one."""
    t = " ".join(text.strip().lower().rstrip(".").split())
    m = _SINGLE_RE.match(t)
    if m:
        size, colour, shape, phrase = m.groups()
        pos = {v: k for k, v in POSITION_PHRASES.items()}[phrase]
        return SceneSpec("single", (ShapeSpec(colour, shape, size, pos),))
    m = _PAIR_RE.match(t)
    if m:
        z1, c1, s1, joiner, z2, c2, s2 = m.groups()
        return SceneSpec("row" if joiner == "and" else "column", (ShapeSpec(c1, s1, z1), ShapeSpec(c2, s2, z2)))
    raise ValueError(
        f"not a toy-world caption: {text!r} (expected e.g. 'a small red circle on the left' or "
        "'a large blue square and a small green triangle')"
    )


def perturb_spec(spec: SceneSpec, rng: random.Random, attribute: str | None = None) -> SceneSpec:
    """Change one attribute (colour, shape, size, or position/order) of one shape: a near-miss caption (DCPO)."""
    attribute = attribute or rng.choice(["colour", "shape", "size", "position"])
    i = rng.randrange(len(spec.shapes))
    s = spec.shapes[i]
    if attribute == "position":
        if spec.layout == "single":
            return replace(spec, shapes=(replace(s, position=rng.choice([p for p in POSITIONS if p != s.position])),))
        return replace(spec, shapes=spec.shapes[::-1])
    if attribute == "colour":
        taken = set(spec.colours())
        new = replace(s, colour=rng.choice([c for c in COLOURS if c not in taken]))
    elif attribute == "shape":
        new = replace(s, shape=rng.choice([x for x in SHAPES if x != s.shape]))
    elif attribute == "size":
        new = replace(s, size="large" if s.size == "small" else "small")
    else:
        raise ValueError(f"unknown attribute '{attribute}'; choose colour, shape, size or position")
    shapes = list(spec.shapes)
    shapes[i] = new
    return replace(spec, shapes=tuple(shapes))


def perturb_caption(text: str, rng: random.Random, attribute: str | None = None) -> str:
    return perturb_spec(parse_caption(text), rng, attribute).caption()


# ----------------------------------------------------------------------------- scenes
def sample_spec(rng: random.Random) -> SceneSpec:
    """A random caption-level scene: single 40%, row 30%, column 30%."""
    u = rng.random()
    if u < 0.4:
        return SceneSpec("single", (ShapeSpec(rng.choice(list(COLOURS)), rng.choice(SHAPES),
                                              rng.choice(list(SIZES)), rng.choice(list(POSITIONS))),))
    layout = "row" if u < 0.7 else "column"
    c1, c2 = rng.sample(list(COLOURS), 2)
    return SceneSpec(layout, (ShapeSpec(c1, rng.choice(SHAPES), rng.choice(list(SIZES))),
                              ShapeSpec(c2, rng.choice(SHAPES), rng.choice(list(SIZES)))))


def jittered_rgb(colour: str, rng: random.Random) -> tuple[int, int, int]:
    """Palette colour `colour` with +-12 per channel of jitter (not in the caption)."""
    r, g, b = (int(min(255, max(0, v + rng.randint(-12, 12)))) for v in COLOURS[colour])
    return r, g, b


def scene_from_spec(spec: SceneSpec, rng: random.Random) -> Scene:
    """Place `spec`'s shapes with small jitters (+-1.5 px position, +-0.5 px size, +-12 colour) and pick a background."""
    placed = []
    jitter = 1.5 if spec.layout == "single" else 1.0
    for s, (cx, cy) in zip(spec.shapes, spec.expected_centres()):
        rgb = jittered_rgb(s.colour, rng)
        placed.append(PlacedShape(s, cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter),
                                  SIZES[s.size] + rng.uniform(-0.5, 0.5), rgb))
    return Scene(spec, tuple(placed), rng.choice(list(BACKGROUNDS)), rng.choice(TEXTURES), rng.randrange(2**31))


def sample_scene(rng: random.Random) -> Scene:
    """A random scene (caption-level content and its drawing details) from `rng`."""
    return scene_from_spec(sample_spec(rng), rng)


def scene_for_caption(text: str, seed: int = 0) -> Scene:
    """A perfect drawing of `text` (the DRO "expert" images), deterministic from `seed`."""
    return scene_from_spec(parse_caption(text), random.Random(seed))


# ----------------------------------------------------------------------------- rendering
_SS = 4  # supersampling factor for antialiased edges


@lru_cache(maxsize=2)
def _grid(resolution: int, ss: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel sample coordinates (pixel units; pixel i covers [i, i+1))."""
    c = (np.arange(resolution * ss) + 0.5) / ss
    return np.meshgrid(c, c)  # x, y


def shape_mask(shape: str, cx: float, cy: float, half: float, resolution: int = RESOLUTION, ss: int = _SS) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by `shape` centred at (cx, cy) with half-extent `half`.

    Circle: radius `half`. Square: side 2*half. Triangle: apex up at (cx, cy - half), base from
    (cx - half, cy + half) to (cx + half, cy + half).
    """
    x, y = _grid(resolution, ss)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":
        # at height dy (from -half at the apex to +half at the base) the half-width is (dy + half) / 2
        inside = (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    else:
        raise ValueError(f"unknown shape '{shape}'; choose one of {', '.join(SHAPES)}")
    return inside.reshape(resolution, ss, resolution, ss).mean(axis=(1, 3))


def _background(background: str, texture: str, texture_seed: int, resolution: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[background], dtype=np.float64)
    img = np.broadcast_to(base, (resolution, resolution, 3)).copy()
    rng = np.random.default_rng(texture_seed)
    if texture == "noise":
        img += rng.normal(0.0, 5.0, size=(resolution, resolution, 1))
    elif texture == "stripes":
        period = rng.uniform(5.0, 9.0)
        phase = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:resolution, 0:resolution]
        img += 7.0 * np.sin(2 * np.pi * (xx + yy) / period + phase)[..., None]
    return img


def paint(shapes: Sequence[tuple[str, float, float, float, tuple[int, int, int]]], background: str, texture: str,
          texture_seed: int, resolution: int = RESOLUTION) -> np.ndarray:
    """Shapes `(kind, cx, cy, half, rgb)` (32x32 pixel units) drawn in order over a background, as a float
    array (H, W, 3) in [0, 255]; the one drawing routine of every toy world."""
    img = _background(background, texture, texture_seed, resolution)
    scale = resolution / RESOLUTION
    for kind, cx, cy, half, rgb in shapes:
        cov = shape_mask(kind, cx * scale, cy * scale, half * scale, resolution)[..., None]
        img = img * (1 - cov) + np.array(rgb, dtype=np.float64) * cov
    return np.clip(img, 0, 255)


def render_array(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """The scene as a float array (H, W, 3) in [0, 255]."""
    shapes = [(p.spec.shape, p.cx, p.cy, p.half, p.rgb) for p in scene.shapes]
    return paint(shapes, scene.background, scene.texture, scene.texture_seed, resolution)


def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """Render `scene` as an RGB PIL image (antialiased edges)."""
    return Image.fromarray(np.round(render_array(scene, resolution)).astype(np.uint8), "RGB")


def caption(scene: Scene) -> str:
    """The caption of `scene` (e.g. 'a small red circle on the left')."""
    return scene.spec.caption()


def sample_dataset(n: int, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """`n` (image, caption) pairs from seed `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        out.append((render(scene), scene.caption))
    return out


def expert_images(captions: list[str], seed: int = 0) -> list[Image.Image]:
    """Perfect renders of `captions` (top-reward images under the oracle; DRO's expert set)."""
    return [render(scene_for_caption(c, seed * 1_000_003 + i)) for i, c in enumerate(captions)]


__all__ = [
    "BACKGROUNDS", "COLOURS", "LAYOUTS", "POSITIONS", "RESOLUTION", "SHAPES", "SIZES", "SPLITS",
    "PlacedShape", "Scene", "SceneSpec", "ShapeSpec", "all_captions", "all_specs", "caption", "caption_split",
    "expert_images", "held_out_prompts", "jittered_rgb", "paint", "parse_caption", "perturb_caption", "perturb_spec", "render",
    "render_array", "sample_dataset", "sample_scene", "sample_spec", "scene_for_caption", "scene_from_spec",
    "shape_mask", "split_captions", "train_prompts",
]

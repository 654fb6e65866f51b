"""The compositional toy world (in progress): counts, attribute binding, spatial relations, sizes and negations.

A harder sibling of `world.py` on the same 32x32 canvas, palette, shapes, backgrounds and drawing routine
(imported from there). The caption grammar:

    caption  := body [", without " COLOUR]
    body     := group | object JOINER object
    group    := ("a" | "two" | "three" | "four") COLOUR SHAPE["s"]        e.g. "three red circles"
    object   := "a" [("large" | "small")] COLOUR SHAPE                       e.g. "a large red circle"
    JOINER   := "and" | "left of" | "right of" | "above" | "below"

with the rules: the two objects of a pair have different colours *and* different shapes (so each colour is
bound to one shape), they carry sizes both or neither and then one is large and one small, and a negated
colour is none of the caption's colours. There are 3432 captions: 192 groups (48 with no negation) and
3240 pairs.

Splits: captions that mean the same scene ("A and B" / "B and A", "A left of B" / "B right of A", "A above
B" / "B below A") share one meaning key, and `world.caption_split` of that key puts them all in the same
split, so train / val / test never share a caption nor a meaning.

Scenes: `scene_for_caption(text, seed)` draws an image that satisfies its caption exactly (the "expert"
images): objects are placed by rejection sampling with at least 2 px of background between their bounding
boxes and 1 px from the border; a relation "A left of B" puts A's centre at least `RELATION_MARGIN` px
further left than the vertical offset of the two (likewise for the other relations). Sizes: large and small
are world.SIZES (7 and 4 px half-extent, +-0.5 px jitter); objects without a size word get a half-extent in
`FREE_HALF` (pairs) or `GROUP_HALF` (groups). Colours carry world's +-12 jitter; backgrounds are world's.

Sampler (`sample_spec`): body a group (1/3, count uniform in 1-4), an "and" pair (1/3) or a spatial pair
(1/3, relation uniform); pairs carry sizes with probability 1/2; any caption a negation with probability
1/4; a `split` argument redraws until the caption falls in that split.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image

from diffusion_po.toy import world
from diffusion_po.toy.world import BACKGROUNDS, COLOURS, RESOLUTION, SHAPES, SIZES, SPLITS, TEXTURES

COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
JOINERS = ("and", *RELATIONS)
SIZE_WORDS = tuple(SIZES)  # ("small", "large")
PARTS = ("count", "colour", "shape", "binding", "relation", "size", "negation")
"""Every part a caption can have, in a fixed order (see `CompSpec.parts`)."""
GROUP_HALF = (4.0, 5.0)
"""Half-extent range (px) of the objects of a group (no size word)."""
FREE_HALF = (4.0, 6.0)
"""Half-extent range (px) of the objects of a pair without size words."""
GAP = 2.0
"""Minimum background (px) between two objects' bounding boxes, so each is its own connected component."""
RELATION_MARGIN = 6.0
"""In expert images, the displacement along a relation's axis exceeds the offset across it by this much (px)."""
NEGATION_PROBABILITY = 0.25
SIZED_PROBABILITY = 0.5
_MAX_PLACEMENT_TRIES = 5000


@dataclass(frozen=True)
class Thing:
    """One object (or the kind of object of a group) as a caption names it."""

    colour: str
    shape: str
    size: str | None = None

    def phrase(self) -> str:
        size = f"{self.size} " if self.size else ""
        return f"a {size}{self.colour} {self.shape}"


@dataclass(frozen=True)
class CompSpec:
    """The caption-level content of a compositional scene.

    A group has one `Thing` and `count` 1-4; a pair has two `Thing`s and `relation` None (for "and") or one
    of `RELATIONS` (the first object is the relation's subject). `without` is a negated colour or None.
    """

    things: tuple[Thing, ...]
    count: int = 1
    relation: str | None = None
    without: str | None = None

    @property
    def is_pair(self) -> bool:
        return len(self.things) == 2

    def caption(self) -> str:
        if self.is_pair:
            body = f" {self.relation or 'and'} ".join(t.phrase() for t in self.things)
        else:
            t = self.things[0]
            body = f"{COUNT_WORDS[self.count]} {t.colour} {t.shape}{'s' if self.count > 1 else ''}"
        return f"{body}, without {self.without}" if self.without else body

    def n_objects(self) -> int:
        """How many objects the caption asks for."""
        return 2 if self.is_pair else self.count

    def parts(self) -> tuple[str, ...]:
        """The parts of `PARTS` that this caption has (what the oracle scores)."""
        have = {"count", "colour", "shape"}
        if self.is_pair:
            have.add("binding")
            if self.relation:
                have.add("relation")
            if self.things[0].size:
                have.add("size")
        if self.without:
            have.add("negation")
        return tuple(p for p in PARTS if p in have)

    def colours(self) -> list[str]:
        return [t.colour for t in self.things]

    def meaning_key(self) -> str:
        """The caption of a canonical equivalent: "B right of A" -> "A left of B", "B below A" -> "A above B",
        "A and B" with the objects in sorted order; equal keys mean the same scene."""
        things, relation = self.things, self.relation
        if relation in ("right of", "below"):
            things, relation = things[::-1], {"right of": "left of", "below": "above"}[relation]
        elif self.is_pair and relation is None:
            things = tuple(sorted(things, key=lambda t: t.phrase()))
        return replace(self, things=things, relation=relation).caption()

    def validate(self) -> None:
        """Raise ValueError naming the caption when it breaks the grammar's rules (see the module docstring)."""
        problem = None
        if any(t.colour not in COLOURS or t.shape not in SHAPES or t.size not in (None, *SIZE_WORDS)
               for t in self.things):
            problem = "an unknown colour, shape or size"
        elif len(self.things) not in (1, 2):
            problem = "one or two objects"
        elif not self.is_pair and (self.count not in COUNT_WORDS or self.things[0].size or self.relation):
            problem = "a group with a count of 1-4, no size and no relation"
        elif self.is_pair:
            a, b = self.things
            if self.count != 1 or self.relation not in (None, *RELATIONS):
                problem = "a pair with count 1 and a known relation"
            elif a.colour == b.colour or a.shape == b.shape:
                problem = "two objects with different colours and different shapes"
            elif (a.size is None) != (b.size is None) or (a.size is not None and a.size == b.size):
                problem = "sizes on both objects (one large, one small) or on neither"
        if problem is None and self.without is not None and (
                self.without not in COLOURS or self.without in self.colours()):
            problem = "a negated colour that is a palette colour not in the caption"
        if problem:
            raise ValueError(f"not a compositional caption: {self.caption()!r} (expected {problem})")


@dataclass(frozen=True)
class PlacedThing:
    """An object as drawn: colour and shape names, centre and half-extent (px), jittered RGB."""

    colour: str
    shape: str
    cx: float
    cy: float
    half: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class CompScene:
    """A fully determined compositional scene: spec, placed objects, background, texture and its seed."""

    spec: CompSpec
    objects: tuple[PlacedThing, ...]
    background: str
    texture: str
    texture_seed: int

    @property
    def caption(self) -> str:
        return self.spec.caption()


# ----------------------------------------------------------------------------- captions
def all_specs() -> list[CompSpec]:
    """Every caption-level scene of the world, in a fixed order (groups, then pairs)."""
    bodies: list[CompSpec] = []
    for n, colour, shape in itertools.product(COUNT_WORDS, COLOURS, SHAPES):
        bodies.append(CompSpec((Thing(colour, shape),), count=n))
    objects = list(itertools.product(COLOURS, SHAPES))
    for (c1, s1), (c2, s2) in itertools.permutations(objects, 2):
        if c1 == c2 or s1 == s2:
            continue
        for relation in (None, *RELATIONS):
            for z1, z2 in ((None, None), ("large", "small"), ("small", "large")):
                bodies.append(CompSpec((Thing(c1, s1, z1), Thing(c2, s2, z2)), relation=relation))
    out: list[CompSpec] = []
    for body in bodies:
        out.append(body)
        out.extend(replace(body, without=c) for c in COLOURS if c not in body.colours())
    return out


@lru_cache(maxsize=1)
def all_captions() -> tuple[str, ...]:
    return tuple(s.caption() for s in all_specs())


def caption_split(text: str | CompSpec) -> str:
    """The fixed split ('train' about 60%, 'val' 15%, 'test' 25%) of a caption, decided by its meaning key."""
    spec = parse_caption(text) if isinstance(text, str) else text
    return world.caption_split(spec.meaning_key())


@lru_cache(maxsize=len(SPLITS))
def _split_captions(split: str) -> tuple[str, ...]:
    return tuple(c for c in all_captions() if caption_split(c) == split)


def split_captions(split: str) -> list[str]:
    """All captions of one split, in the world's fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    return list(_split_captions(split))


_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_OBJECT = rf"an? (?:(small|large) )?({_COLOUR}) ({_SHAPE})"
_GROUP_RE = re.compile(rf"^(a|an|two|three|four) ({_COLOUR}) ({_SHAPE})(s?)$")
_PAIR_RE = re.compile(rf"^{_OBJECT} (and|left of|right of|above|below) {_OBJECT}$")
_WORD_COUNTS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}


def parse_caption(text: str) -> CompSpec:
    """Read a compositional caption back into a `CompSpec`; raises ValueError naming the text when it is not one."""
    t = " ".join(text.strip().lower().rstrip(".").split())
    without = None
    body, sep, negated = t.partition(", without ")
    if sep:
        without = negated.strip()
    spec = None
    m = _GROUP_RE.match(body)
    if m:
        word, colour, shape, plural = m.groups()
        n = _WORD_COUNTS[word]
        if (n > 1) == bool(plural):
            spec = CompSpec((Thing(colour, shape),), count=n, without=without)
    m = _PAIR_RE.match(body)
    if m:
        z1, c1, s1, joiner, z2, c2, s2 = m.groups()
        spec = CompSpec((Thing(c1, s1, z1), Thing(c2, s2, z2)), relation=None if joiner == "and" else joiner,
                        without=without)
    if spec is None:
        raise ValueError(
            f"not a compositional caption: {text!r} (expected e.g. 'three red circles', 'a red circle and a "
            "blue square', 'a large red circle left of a small blue square' or 'a blue square, without red')"
        )
    spec.validate()
    return spec


def sample_spec(rng: random.Random, split: str | None = None) -> CompSpec:
    """A random caption-level scene (probabilities in the module docstring), from `split` when given."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    while True:
        body = rng.randrange(3)
        if body == 0:
            spec = CompSpec((Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES)),), count=rng.choice(list(COUNT_WORDS)))
        else:
            c1, c2 = rng.sample(list(COLOURS), 2)
            s1, s2 = rng.sample(SHAPES, 2)
            z1 = z2 = None
            if rng.random() < SIZED_PROBABILITY:
                z1, z2 = rng.sample(SIZE_WORDS, 2)
            relation = rng.choice(RELATIONS) if body == 2 else None
            spec = CompSpec((Thing(c1, s1, z1), Thing(c2, s2, z2)), relation=relation)
        if rng.random() < NEGATION_PROBABILITY:
            spec = replace(spec, without=rng.choice([c for c in COLOURS if c not in spec.colours()]))
        if split is None or caption_split(spec) == split:
            return spec


def sample_captions(n: int, seed: int = 0, split: str | None = None) -> list[str]:
    """`n` captions drawn by `sample_spec` from seed `seed` (from `split` when given)."""
    rng = random.Random(seed)
    return [sample_spec(rng, split).caption() for _ in range(n)]


# ----------------------------------------------------------------------------- scenes
def relation_margin(a: tuple[float, float], b: tuple[float, float], relation: str) -> float:
    """How clearly centre `a` stands in `relation` to centre `b`: displacement along the relation's axis
    minus the offset across it (px; positive when the relation holds)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along - abs(across)


def _place(halves: list[float], rng: random.Random, relation: str | None) -> list[tuple[float, float]]:
    """Centres for objects of the given half-extents: inside the canvas with a 1 px border, bounding boxes
    `GAP` apart, and (for a pair with a relation) the relation clear by `RELATION_MARGIN`."""
    for _ in range(_MAX_PLACEMENT_TRIES):
        centres = [(rng.uniform(h + 1.0, RESOLUTION - 1.0 - h), rng.uniform(h + 1.0, RESOLUTION - 1.0 - h))
                   for h in halves]
        apart = all(
            max(abs(p[0] - q[0]), abs(p[1] - q[1])) >= hp + hq + GAP
            for (p, hp), (q, hq) in itertools.combinations(zip(centres, halves), 2)
        )
        if apart and (relation is None or relation_margin(centres[0], centres[1], relation) >= RELATION_MARGIN):
            return centres
    raise RuntimeError(f"could not place {len(halves)} objects of half-extents {halves} in {_MAX_PLACEMENT_TRIES} tries")


def scene_from_spec(spec: CompSpec, rng: random.Random) -> CompScene:
    """Draw `spec` exactly (see the module docstring for placement and jitter), choosing a background."""
    spec.validate()
    things = list(spec.things) * spec.count
    halves = []
    for t in things:
        if t.size:
            halves.append(SIZES[t.size] + rng.uniform(-0.5, 0.5))
        else:
            halves.append(rng.uniform(*(FREE_HALF if spec.is_pair else GROUP_HALF)))
    centres = _place(halves, rng, spec.relation)
    objects = tuple(PlacedThing(t.colour, t.shape, cx, cy, h, world.jittered_rgb(t.colour, rng))
                    for t, (cx, cy), h in zip(things, centres, halves))
    return CompScene(spec, objects, rng.choice(list(BACKGROUNDS)), rng.choice(TEXTURES), rng.randrange(2**31))


def sample_scene(rng: random.Random, split: str | None = None) -> CompScene:
    """A random scene (caption and drawing) from `rng`."""
    return scene_from_spec(sample_spec(rng, split), rng)


def scene_for_caption(text: str, seed: int = 0) -> CompScene:
    """A drawing that satisfies `text` exactly, deterministic from `seed`."""
    return scene_from_spec(parse_caption(text), random.Random(seed))


def render_array(scene: CompScene, resolution: int = RESOLUTION) -> np.ndarray:
    """The scene as a float array (H, W, 3) in [0, 255] (world.paint)."""
    shapes = [(o.shape, o.cx, o.cy, o.half, o.rgb) for o in scene.objects]
    return world.paint(shapes, scene.background, scene.texture, scene.texture_seed, resolution)


def render(scene: CompScene, resolution: int = RESOLUTION) -> Image.Image:
    """Render `scene` as an RGB PIL image (antialiased edges)."""
    return Image.fromarray(np.round(render_array(scene, resolution)).astype(np.uint8), "RGB")


def sample_dataset(n: int, seed: int = 0, split: str | None = None) -> list[tuple[Image.Image, str]]:
    """`n` (image, caption) pairs from seed `seed` (captions from `split` when given)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, split)
        out.append((render(scene), scene.caption))
    return out


def expert_images(captions: list[str], seed: int = 0) -> list[Image.Image]:
    """Drawings that satisfy `captions` exactly (every oracle part 1)."""
    return [render(scene_for_caption(c, seed * 1_000_003 + i)) for i, c in enumerate(captions)]


__all__ = [
    "COUNT_WORDS", "FREE_HALF", "GAP", "GROUP_HALF", "JOINERS", "PARTS", "RELATIONS", "RELATION_MARGIN",
    "CompScene", "CompSpec", "PlacedThing", "Thing", "all_captions", "all_specs", "caption_split",
    "expert_images", "parse_caption", "relation_margin", "render", "render_array", "sample_captions",
    "sample_dataset", "sample_scene", "sample_spec", "scene_for_caption", "scene_from_spec", "split_captions",
]

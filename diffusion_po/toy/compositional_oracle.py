"""The compositional world's oracle: each part of a caption scored separately from pixels (in progress).

1. **Objects**: background and foreground as in `oracle` (border median; RGB distance > 60). Every
   4-connected foreground component of at least `MIN_AREA` px (at 32x32) is an object. Its colour is the
   majority nearest palette colour of its pixels; its shape the one of circle / square / triangle whose
   template of the same area and centroid overlaps it best (IoU, as in `oracle`); its half-extent the one
   that area implies for that shape; its centre the drawing centre of that shape (a triangle's sits h/3
   above its centroid). All lengths are in 32x32 pixels whatever the image size.
2. **Parts** (`CompSpec.parts()` says which a caption has), each a score in [0, 1] and a verdict `ok`:

   | part | score | ok when |
   |---|---|---|
   | count | 1 / (1 + abs(seen - asked)) objects | seen == asked |
   | colour | group: share of the objects in the caption's colour; pair: share of the two colours present | 1 |
   | shape | the same for shapes | 1 |
   | binding | pair: share of the two objects present with both their colour and their shape | 1 |
   | relation | clip(0.5 + margin / 8), margin = displacement along the relation's axis minus the offset across it | margin > 0 |
   | size | clip((h_large - h_small) / 1.5), the half-extents of the objects matched to the large and small one | score >= 0.5 |
   | negation | clip(1 - p / 16), p = foreground pixels within RGB distance 80 of the negated colour | p < 4 |

   Relation and size use the two objects matched to the caption's: the one-to-one assignment that
   maximises (1 per matching colour + 0.9 per matching shape), ties to the earlier object in scan order.
   With fewer than two objects both parts score 0.
3. **reward** = the mean of the caption's parts (equal weights); **correct** = every part `ok`.

`explain(caption, image)` writes the breakdown for a person; `summarize(results)` averages each part over
the results that have it (the per-part breakdown that shows a method raising one part by breaking another).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from diffusion_po.toy import oracle, world
from diffusion_po.toy.compositional import PARTS, CompSpec, parse_caption, relation_margin
from diffusion_po.toy.oracle import FG_THRESHOLD, _nearest_palette, _template, background_colour, to_array
from diffusion_po.toy.world import COLOURS, RESOLUTION, SHAPES

MIN_AREA = 8.0
"""Smallest foreground component (px at 32x32) counted as an object."""
RELATION_SCALE = 8.0
SIZE_SCALE = 1.5
NEGATION_PIXELS = 16.0
NEGATION_TRACE = 4.0
"""Fewer negated-colour pixels than this (at 32x32) count as absent."""
_COLOUR_WEIGHT, _SHAPE_WEIGHT = 1.0, 0.9
_PALETTE_NAMES = list(COLOURS)


@dataclass(frozen=True)
class SeenObject:
    """One object the oracle found: colour, shape, centre (x, y) and half-extent in 32x32 pixels, area."""

    colour: str
    shape: str
    cx: float
    cy: float
    half: float
    area: float

    def phrase(self) -> str:
        return f"{self.colour} {self.shape} at ({self.cx:.0f}, {self.cy:.0f}) half {self.half:.1f}"


@dataclass
class CompResult:
    """The oracle's verdict on one (image, caption): per-part scores and verdicts, reward, what it saw."""

    caption: str
    reward: float
    correct: bool
    parts: dict[str, float]
    ok: dict[str, bool]
    notes: dict[str, str]
    objects: list[SeenObject] = field(default_factory=list)

    @property
    def share_ok(self) -> float:
        """The share of the caption's parts that are right (the attribute accuracy of one image)."""
        return float(np.mean(list(self.ok.values())))

    def to_dict(self) -> dict:
        """The scores as plain JSON values (without the notes and the detected objects)."""
        return {"caption": self.caption, "reward": self.reward, "correct": self.correct, "share_ok": self.share_ok,
                "parts": dict(self.parts), "ok": dict(self.ok)}

    @classmethod
    def from_dict(cls, data: dict) -> CompResult:
        """The inverse of `to_dict` (notes and objects empty)."""
        return cls(data["caption"], data["reward"], data["correct"], dict(data["parts"]), dict(data["ok"]),
                   {p: "" for p in data["parts"]})


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a boolean mask, in scan order (row-major of their first pixel)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(comp)
    return out


def _coverage(arr: np.ndarray, bg: np.ndarray, comp: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """How much of each pixel the object of component `comp` covers, in [0, 1]: the projection of the pixel's
    offset from the background on the object's colour (its component's most distinct half of pixels),
    over the component and its one-pixel fringe (antialiased edges below the foreground threshold)."""
    offsets = arr - bg
    dist = np.linalg.norm(offsets, axis=-1)
    inside = offsets[comp]
    colour = np.median(inside[dist[comp] >= np.median(dist[comp])], axis=0)
    grown = comp.copy()
    grown[1:] |= comp[:-1]
    grown[:-1] |= comp[1:]
    grown[:, 1:] |= comp[:, :-1]
    grown[:, :-1] |= comp[:, 1:]
    region = grown & (comp | ~taken)
    alpha = np.clip(offsets @ colour / max(float(colour @ colour), 1e-6), 0.0, 1.0)
    return np.where(region, alpha, 0.0)


def _soft_iou(cover: np.ndarray, template: np.ndarray) -> float:
    union = np.maximum(cover, template).sum()
    return float(np.minimum(cover, template).sum() / union) if union > 0 else 0.0


def detect(image: Image.Image | np.ndarray) -> list[SeenObject]:
    """The objects in `image` (see the module docstring), in scan order."""
    arr = to_array(image)
    size = arr.shape[0]
    scale = size / RESOLUTION
    bg = background_colour(arr)
    fg = np.linalg.norm(arr - bg, axis=-1) > FG_THRESHOLD
    comps = [c for c in _components(fg) if c.sum() >= MIN_AREA * scale * scale]
    taken = np.any(comps, axis=0) if comps else np.zeros_like(fg)
    objects = []
    ys_all, xs_all = np.mgrid[0:size, 0:size]
    for comp in comps:
        votes = np.bincount(_nearest_palette(arr[comp]), minlength=len(_PALETTE_NAMES))
        cover = _coverage(arr, bg, comp, taken)
        area = float(cover.sum())
        cx = float((cover * (xs_all + 0.5)).sum() / area)
        cy = float((cover * (ys_all + 0.5)).sum() / area)
        fits = {s: _template(s, area, cx, cy, size) for s in SHAPES}
        fine = {s: world.shape_mask(s, cx, fits[s][2], fits[s][1], size) for s in SHAPES}  # 4x supersampled
        shape = max(SHAPES, key=lambda s: _soft_iou(cover, fine[s]))
        _, half, centre_y = fits[shape]
        objects.append(SeenObject(_PALETTE_NAMES[int(votes.argmax())], shape, cx / scale, centre_y / scale,
                                  half / scale, area / (scale * scale)))
    return objects


def _match(spec: CompSpec, objects: list[SeenObject]) -> tuple[SeenObject, SeenObject] | None:
    """The two objects matched to a pair caption's (see the module docstring), or None with fewer than two."""
    def weight(pair: tuple[SeenObject, SeenObject]) -> float:
        return sum(_COLOUR_WEIGHT * (o.colour == t.colour) + _SHAPE_WEIGHT * (o.shape == t.shape)
                   for t, o in zip(spec.things, pair))

    best = None
    for pair in itertools.permutations(objects, 2):
        if best is None or weight(pair) > weight(best):
            best = pair
    return best


def score(image: Image.Image | np.ndarray, caption: str | CompSpec) -> CompResult:
    """Score one image against a compositional caption, part by part (formulas in the module docstring)."""
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    objects = detect(image)
    parts: dict[str, float] = {}
    ok: dict[str, bool] = {}
    notes: dict[str, str] = {}
    k, n = len(objects), spec.n_objects()
    parts["count"], ok["count"] = 1.0 / (1.0 + abs(k - n)), k == n
    notes["count"] = f"saw {k} object{'s' if k != 1 else ''}, the caption asks for {n}"

    if not spec.is_pair:
        want = spec.things[0]
        for part, attr in (("colour", "colour"), ("shape", "shape")):
            hits = sum(getattr(o, attr) == getattr(want, attr) for o in objects)
            parts[part] = hits / k if k else 0.0
            ok[part] = k > 0 and hits == k
            notes[part] = f"{hits} of {k} objects are {getattr(want, attr)}"
    else:
        for part, test in (("colour", lambda t, o: o.colour == t.colour), ("shape", lambda t, o: o.shape == t.shape),
                           ("binding", lambda t, o: o.colour == t.colour and o.shape == t.shape)):
            present = [any(test(t, o) for o in objects) for t in spec.things]
            parts[part], ok[part] = sum(present) / 2.0, all(present)
            missing = [t.phrase()[2:] if part == "binding" else getattr(t, part) for t, p in zip(spec.things, present)
                       if not p]
            notes[part] = f"missing: {', '.join(missing)}" if missing else "both present"
        if objects:
            notes["binding"] += " (seen: " + ", ".join(f"{o.colour} {o.shape}" for o in objects) + ")"
        matched = _match(spec, objects)
        if spec.relation:
            if matched is None:
                parts["relation"], ok["relation"] = 0.0, False
                notes["relation"] = "fewer than two objects"
            else:
                a, b = matched
                margin = relation_margin((a.cx, a.cy), (b.cx, b.cy), spec.relation)
                parts["relation"] = float(np.clip(0.5 + margin / RELATION_SCALE, 0.0, 1.0))
                ok["relation"] = margin > 0
                notes["relation"] = (f"{a.colour} {a.shape} {'is' if margin > 0 else 'is not'} {spec.relation} "
                                     f"{b.colour} {b.shape} (margin {margin:+.1f} px)")
        if spec.things[0].size:
            if matched is None:
                parts["size"], ok["size"] = 0.0, False
                notes["size"] = "fewer than two objects"
            else:
                large = 0 if spec.things[0].size == "large" else 1
                big, small = matched[large], matched[1 - large]
                parts["size"] = float(np.clip((big.half - small.half) / SIZE_SCALE, 0.0, 1.0))
                ok["size"] = parts["size"] >= 0.5
                notes["size"] = (f"the one meant large ({big.colour} {big.shape}) has half-extent {big.half:.1f}, "
                                 f"the one meant small ({small.colour} {small.shape}) {small.half:.1f}")
    if spec.without:
        arr = to_array(image)
        pixels = oracle.colour_fraction(arr, spec.without) * RESOLUTION * RESOLUTION
        parts["negation"] = float(np.clip(1.0 - pixels / NEGATION_PIXELS, 0.0, 1.0))
        ok["negation"] = pixels < NEGATION_TRACE
        notes["negation"] = f"{pixels:.0f} px of {spec.without}"
    order = [p for p in PARTS if p in parts]
    parts = {p: float(parts[p]) for p in order}
    return CompResult(spec.caption(), float(np.mean(list(parts.values()))), all(ok.values()), parts,
                      {p: bool(ok[p]) for p in order}, {p: notes[p] for p in order}, objects)


def reward(image: Image.Image | np.ndarray, caption: str | CompSpec) -> float:
    """The scalar reward in [0, 1] (the mean of the caption's parts)."""
    return score(image, caption).reward


def explain(caption: str | CompSpec, image: Image.Image | np.ndarray) -> str:
    """A person's view of the score: what the oracle saw, then one line per part (score, ok/FAIL, why)."""
    result = score(image, caption)
    seen = "; ".join(o.phrase() for o in result.objects) or "nothing"
    lines = [f"caption: {result.caption}", f"seen: {seen}",
             f"reward {result.reward:.2f}, {'correct' if result.correct else 'not correct'}"]
    width = max(len(p) for p in result.parts)
    for part, value in result.parts.items():
        lines.append(f"  {part:<{width}}  {value:.2f}  {'ok  ' if result.ok[part] else 'FAIL'}  {result.notes[part]}")
    return "\n".join(lines)


def seen_caption(image: Image.Image | np.ndarray, caption: str | CompSpec) -> str:
    """What the oracle sees, as a caption of the same kind as `caption` (the per-image captions of DCPO data).

    A group becomes the count seen with the majority colour and shape; a pair the two objects matched to the
    caption's, with the sizes and the relation that hold between them; "without X" stays only while X is
    absent. Where the seen scene is not a caption of the grammar (no objects, five of them, a pair of one
    colour), the caption itself is returned.
    """
    from collections import Counter

    from diffusion_po.toy.compositional import RELATIONS, Thing

    spec = parse_caption(caption) if isinstance(caption, str) else caption
    objects = detect(image)
    without = spec.without
    if without and oracle.colour_fraction(image, without) * RESOLUTION * RESOLUTION >= NEGATION_TRACE:
        without = None
    if not spec.is_pair:
        if not 1 <= len(objects) <= 4:
            return spec.caption()
        colour = Counter(o.colour for o in objects).most_common(1)[0][0]
        shape = Counter(o.shape for o in objects).most_common(1)[0][0]
        seen = CompSpec((Thing(colour, shape),), count=len(objects), without=without)
    else:
        matched = _match(spec, objects)
        if matched is None:
            return spec.caption()
        a, b = matched
        sizes: tuple[str | None, str | None] = (None, None)
        if spec.things[0].size:
            sizes = ("large", "small") if a.half >= b.half else ("small", "large")
        relation = None
        if spec.relation:
            relation = max(RELATIONS, key=lambda r: relation_margin((a.cx, a.cy), (b.cx, b.cy), r))
        seen = CompSpec((Thing(a.colour, a.shape, sizes[0]), Thing(b.colour, b.shape, sizes[1])), relation=relation,
                        without=without)
    if seen.without in seen.colours():
        seen = CompSpec(seen.things, seen.count, seen.relation, None)
    try:
        seen.validate()
    except ValueError:
        return spec.caption()
    return seen.caption()


def score_many(images: list, captions: list[str]) -> list[CompResult]:
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    return [score(im, c) for im, c in zip(images, captions)]


def summarize(results: list[CompResult]) -> dict[str, float]:
    """Per-part breakdown over `results`: mean `reward`, `correct` and `share_ok`, and for each part the captions that
    have it: `<part>` (mean score), `<part>_ok` (share ok) and `<part>_n` (how many)."""
    if not results:
        return {}
    out = {"reward": float(np.mean([r.reward for r in results])),
           "correct": float(np.mean([r.correct for r in results])),
           "share_ok": float(np.mean([r.share_ok for r in results]))}
    for part in PARTS:
        having = [r for r in results if part in r.parts]
        if having:
            out[part] = float(np.mean([r.parts[part] for r in having]))
            out[f"{part}_ok"] = float(np.mean([r.ok[part] for r in having]))
            out[f"{part}_n"] = float(len(having))
    return out


__all__ = [
    "MIN_AREA", "CompResult", "SeenObject", "detect", "explain", "reward", "score", "score_many", "seen_caption",
    "summarize",
]

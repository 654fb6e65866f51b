"""The compositional toy world and its per-part oracle: determinism, splits, exact renders, and for each
attribute kind a hand-made good image ranked above a hand-made bad one."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from diffusion_po.toy import compositional as cw
from diffusion_po.toy import compositional_oracle as co
from diffusion_po.toy import world


def _draw(*objects: tuple[str, str, float, float, float], background: str = "white") -> Image.Image:
    """A hand-made image: objects (colour, shape, cx, cy, half) in exact palette colours on a plain background."""
    shapes = [(shape, cx, cy, half, world.COLOURS[colour]) for colour, shape, cx, cy, half in objects]
    return Image.fromarray(np.round(world.paint(shapes, background, "plain", 0)).astype(np.uint8), "RGB")


def test_world_is_deterministic_from_seed():
    a = cw.sample_dataset(16, seed=3)
    b = cw.sample_dataset(16, seed=3)
    c = cw.sample_dataset(16, seed=4)
    assert [cap for _, cap in a] == [cap for _, cap in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b))
    assert [cap for _, cap in a] != [cap for _, cap in c]
    assert a[0][0].size == (32, 32) and a[0][0].mode == "RGB"
    assert cw.sample_captions(30, seed=5, split="val") == cw.sample_captions(30, seed=5, split="val")
    text = "a large red circle left of a small blue square, without green"
    assert np.array_equal(np.asarray(cw.render(cw.scene_for_caption(text, 2))),
                          np.asarray(cw.render(cw.scene_for_caption(text, 2))))


def test_captions_parse_back_and_follow_the_grammar():
    captions = cw.all_captions()
    assert len(captions) == len(set(captions)) == 3432
    assert all(cw.parse_caption(c).caption() == c for c in captions)
    spec = cw.parse_caption("Three red circles.")
    assert (spec.count, spec.things[0].colour, spec.parts()) == (3, "red", ("count", "colour", "shape"))
    spec = cw.parse_caption("a large red circle left of a small blue square, without green")
    assert spec.parts() == ("count", "colour", "shape", "binding", "relation", "size", "negation")
    for bad in ("a red circle and a red square", "a red circle and a blue circle",
                "a large red circle and a blue square", "a large red circle and a large blue square",
                "a red circle, without red", "three red circle", "two red circle", "a photo of a cat"):
        with pytest.raises(ValueError, match="not a compositional caption"):
            cw.parse_caption(bad)


def test_splits_are_disjoint_and_keep_equivalent_captions_together():
    splits = {s: set(cw.split_captions(s)) for s in world.SPLITS}
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"])
    assert not (splits["val"] & splits["test"])
    assert sum(len(v) for v in splits.values()) == len(cw.all_captions())
    assert min(len(v) for v in splits.values()) >= 300
    for a, b in (("a red circle left of a blue square", "a blue square right of a red circle"),
                 ("a small red circle above a large blue square", "a large blue square below a small red circle"),
                 ("a red circle and a blue square, without green", "a blue square and a red circle, without green")):
        assert cw.caption_split(a) == cw.caption_split(b)
    for split in world.SPLITS:
        assert set(cw.sample_captions(40, seed=1, split=split)) <= splits[split]


def test_a_correct_render_scores_one_on_every_part():
    rng = random.Random(0)
    specs = [cw.sample_spec(rng) for _ in range(150)]
    seen_parts = set()
    for i, spec in enumerate(specs):
        result = co.score(cw.render(cw.scene_from_spec(spec, random.Random(i))), spec)
        assert tuple(result.parts) == spec.parts(), spec.caption()
        assert all(v == pytest.approx(1.0) for v in result.parts.values()), co.explain(spec, cw.render(
            cw.scene_from_spec(spec, random.Random(i))))
        assert result.correct and result.reward == pytest.approx(1.0)
        seen_parts |= set(result.parts)
    assert seen_parts == set(cw.PARTS)
    assert all(co.score(im, c).correct for im, c in zip(cw.expert_images(["four green triangles"] * 5), ["four green triangles"] * 5))


# caption, the part under test, a good hand-made image, a bad one that breaks that part
CASES = {
    "count": ("three red circles", "count",
              [("red", "circle", 8, 8, 4.5), ("red", "circle", 24, 8, 4.5), ("red", "circle", 16, 24, 4.5)],
              [("red", "circle", 8, 8, 4.5), ("red", "circle", 24, 8, 4.5)]),
    "binding": ("a red circle and a blue square", "binding",
                [("red", "circle", 9, 12, 5), ("blue", "square", 23, 20, 5)],
                [("blue", "circle", 9, 12, 5), ("red", "square", 23, 20, 5)]),
    "relation": ("a red circle left of a blue square", "relation",
                 [("red", "circle", 8, 16, 5), ("blue", "square", 24, 16, 5)],
                 [("red", "circle", 24, 16, 5), ("blue", "square", 8, 16, 5)]),
    "size": ("a large red circle and a small blue square", "size",
             [("red", "circle", 10, 16, 7), ("blue", "square", 25, 16, 4)],
             [("red", "circle", 10, 16, 4), ("blue", "square", 23, 16, 7)]),
    "negation": ("a blue square, without red", "negation",
                 [("blue", "square", 16, 16, 6)],
                 [("blue", "square", 10, 16, 5), ("red", "circle", 24, 16, 4)]),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_oracle_ranks_a_good_image_above_a_bad_one_for_each_attribute(kind):
    caption, part, good_objects, bad_objects = CASES[kind]
    good, bad = co.score(_draw(*good_objects), caption), co.score(_draw(*bad_objects), caption)
    assert good.correct and all(v == pytest.approx(1.0) for v in good.parts.values()), good.notes
    assert good.parts[part] > bad.parts[part] and good.reward > bad.reward
    assert good.ok[part] and not bad.ok[part]
    text = co.explain(caption, _draw(*bad_objects))
    failing = [line for line in text.splitlines() if "FAIL" in line]
    assert any(line.split()[0] == part for line in failing), text
    assert "not correct" in text and caption in text


def test_swapped_colours_break_only_the_binding():
    caption, _, _, swapped = CASES["binding"]
    result = co.score(_draw(*swapped), caption)
    assert result.parts == {"count": 1.0, "colour": 1.0, "shape": 1.0, "binding": 0.0}
    assert "missing: red circle, blue square" in result.notes["binding"]


def test_breakdown_names_the_parts_and_summarize_averages_each_part():
    empty = Image.new("RGB", (32, 32), (238, 238, 236))
    result = co.score(empty, "a red circle right of a blue square, without green")
    assert result.parts == {"count": 1 / 3, "colour": 0.0, "shape": 0.0, "binding": 0.0, "relation": 0.0,
                            "negation": 1.0}
    assert not result.correct
    captions = [c for c, _, _, _ in CASES.values()]
    goods = [_draw(*g) for _, _, g, _ in CASES.values()]
    bads = [_draw(*b) for _, _, _, b in CASES.values()]
    good, bad = co.summarize(co.score_many(goods, captions)), co.summarize(co.score_many(bads, captions))
    assert good["correct"] == 1.0 and bad["correct"] == 0.0
    assert good["relation_n"] == 1 and good["size_n"] == 1 and good["negation_n"] == 1 and good["count_n"] == 5
    for part in ("relation", "size", "negation"):
        assert good[part] == 1.0 and bad[f"{part}_ok"] == 0.0
    assert co.summarize([]) == {}


@pytest.mark.parametrize("relation, subject, other", [
    ("left of", (8, 16), (24, 16)), ("right of", (24, 16), (8, 16)),
    ("above", (16, 8), (16, 24)), ("below", (16, 24), (16, 8)),
])
def test_each_relation_holds_only_in_its_own_direction(relation, subject, other):
    caption = f"a green triangle {relation} a yellow circle"
    right = _draw(("green", "triangle", *subject, 5), ("yellow", "circle", *other, 5))
    wrong = _draw(("green", "triangle", *other, 5), ("yellow", "circle", *subject, 5))
    assert co.score(right, caption).parts["relation"] == 1.0
    assert co.score(wrong, caption).parts["relation"] == 0.0

"""The toy world: deterministic scenes, captions that parse back, splits, and the oracle's ranking."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffusion_po.toy import oracle, world


def test_generator_is_deterministic_from_seed():
    a = world.sample_dataset(12, seed=3)
    b = world.sample_dataset(12, seed=3)
    c = world.sample_dataset(12, seed=4)
    assert [cap for _, cap in a] == [cap for _, cap in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, c))
    assert a[0][0].size == (32, 32) and a[0][0].mode == "RGB"


def test_captions_parse_back_and_cover_the_world():
    captions = world.all_captions()
    assert len(captions) == len(set(captions)) == 120 + 2 * 432
    rng = random.Random(0)
    for _ in range(50):
        scene = world.sample_scene(rng)
        assert world.parse_caption(scene.caption) == scene.spec
    assert world.parse_caption("A small red circle on the left.").shapes[0].position == "left"
    with pytest.raises(ValueError, match="not a toy-world caption"):
        world.parse_caption("a photo of a cat")


def test_splits_are_disjoint_and_large_enough():
    splits = {s: set(world.split_captions(s)) for s in world.SPLITS}
    assert not (splits["train"] & splits["test"]) and not (splits["val"] & splits["test"])
    assert sum(len(v) for v in splits.values()) == len(world.all_captions())
    assert len(splits["test"]) >= 200
    held = world.held_out_prompts(300, seed=1)
    assert len(held) == 300 and set(held) <= splits["test"]
    assert held == world.held_out_prompts(300, seed=1)


def test_perturbed_caption_changes_exactly_one_attribute():
    rng = random.Random(0)
    for text in world.all_captions()[::37]:
        spec = world.parse_caption(text)
        for attr in ("colour", "shape", "size", "position"):
            new = world.perturb_spec(spec, rng, attr)
            assert new != spec and new.layout == spec.layout
            assert len(set(new.colours())) == len(new.colours())


def test_shape_mask_areas_match_geometry():
    # coverage sums to the analytic area (circle pi h^2, square 4 h^2, triangle 2 h^2)
    h = 6.0
    for shape, area in (("circle", np.pi * h * h), ("square", 4 * h * h), ("triangle", 2 * h * h)):
        got = world.shape_mask(shape, 16.0, 16.0, h, ss=8).sum()
        assert abs(got - area) / area < 0.03, (shape, got, area)


def _scene(text: str, seed: int = 0) -> Image.Image:
    return world.render(world.scene_for_caption(text, seed))


def test_oracle_ranks_good_image_above_bad_ones():
    caption = "a large red circle on the left"
    good = _scene(caption)
    wrong_colour = _scene("a large blue circle on the left")
    wrong_shape = _scene("a large red triangle on the left")
    wrong_place = _scene("a large red circle on the right")
    blurred = good.filter(ImageFilter.GaussianBlur(1.2))
    empty = Image.new("RGB", (32, 32), (230, 230, 230))
    r = {name: oracle.reward(im, caption) for name, im in [
        ("good", good), ("colour", wrong_colour), ("shape", wrong_shape), ("place", wrong_place),
        ("blur", blurred), ("empty", empty)]}
    assert r["good"] > 0.85
    for name in ("colour", "shape", "place", "blur", "empty"):
        assert r["good"] > r[name] + 0.03, (name, r)
    assert r["empty"] < 0.2
    res = oracle.score(good, caption)
    assert res.colour_ok == res.shape_ok == res.size_ok == res.position_ok == 1.0
    bad = oracle.score(wrong_colour, caption)
    assert bad.colour_ok == 0.0 and bad.shape_ok == 1.0


def test_oracle_accuracies_on_perfect_renders_and_two_shape_layouts():
    rng = random.Random(5)
    oks = []
    for _ in range(60):
        scene = world.sample_scene(rng)
        res = oracle.score(world.render(scene), scene.caption)
        oks.append((res.colour_ok, res.shape_ok, res.size_ok, res.position_ok))
    assert np.mean(oks, axis=0).min() >= 0.95
    # in "A and B" the left half is judged against A: swapping the caption's order hurts
    text = "a small red square and a large blue circle"
    img = _scene(text)
    swapped = "a large blue circle and a small red square"
    assert oracle.reward(img, text) > oracle.reward(img, swapped) + 0.1


def test_describe_and_colour_fraction():
    img = _scene("a large green triangle at the top")
    assert oracle.describe(img, "a small red circle at the bottom") == "a large green triangle at the top"
    img2 = _scene("a large red square and a large blue circle")
    assert oracle.colour_fraction(img2, "red") > 0.1
    assert oracle.colour_fraction(img2, "yellow") == 0.0
    with pytest.raises(ValueError):
        oracle.colour_fraction(img2, "purple")


def test_expert_images_score_high():
    caps = world.held_out_prompts(8, seed=0, split="train")
    imgs = world.expert_images(caps, seed=1)
    assert min(oracle.reward(im, c) for im, c in zip(imgs, caps)) > 0.75

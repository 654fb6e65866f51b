"""The two toy worlds behind one interface (`diffusion_po.toy.worlds`), the compositional world's per-image
captions and scorer, the compositional base build, and the paired gains of the toy reports."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from diffusion_po.errors import UserError
from diffusion_po.toy import build, compositional, world
from diffusion_po.toy import compositional_oracle as co
from diffusion_po.toy.compositional import CompScene, PlacedThing, parse_caption
from diffusion_po.toy.worlds import get_world


@pytest.mark.parametrize("name", ["compositional", "simple"])
def test_accuracy_is_what_its_key_and_label_name(name):
    """The reports' accuracy gain is `accuracy`, labelled by `accuracy_key`'s row, and the online plot draws
    `summarize()[accuracy_key]`: all three are one quantity in each world."""
    toy = get_world(name)
    caption = toy.split_captions("test")[0]
    images = [toy.expert_images([caption], seed=1)[0], toy.expert_images([toy.split_captions("test")[5]], 2)[0]]
    results = toy.score_many(images, [caption, caption])
    assert toy.accuracy_key in dict(toy.report_parts)
    summary = toy.summarize(results)
    assert np.mean([toy.accuracy(r) for r in results]) == pytest.approx(summary[toy.accuracy_key])


def test_get_world_names_both_and_refuses_others():
    assert get_world().name == "compositional" and get_world("simple").name == "simple"
    with pytest.raises(UserError, match="unknown toy world 'tiny'.*compositional, simple"):
        get_world("tiny")


def test_simple_world_prompts_are_the_old_held_out_prompts():
    """The simple world's main job keeps its exact prompts (so its published numbers stay reproducible)."""
    simple = get_world("simple")
    for split, n, seed in (("test", 263, 1236), ("val", 152, 1234), ("train", 1000, 0)):
        assert simple.prompts(n, seed, split) == world.held_out_prompts(n, seed, split)


def test_compositional_prompts_stay_in_their_split_and_cycle():
    comp = get_world("compositional")
    pool = compositional.split_captions("val")
    got = comp.prompts(len(pool) + 5, seed=3, split="val")
    assert sorted(got[: len(pool)]) == sorted(pool)  # every caption once, then the next shuffled block
    assert all(compositional.caption_split(c) == "val" for c in got)


def _draw(caption: str, placed: list[tuple[str, str, float, float, float]]) -> np.ndarray:
    """A hand-made scene: objects (colour, shape, cx, cy, half) on a plain background."""
    objects = tuple(PlacedThing(c, s, x, y, h, world.COLOURS[c]) for c, s, x, y, h in placed)
    scene = CompScene(parse_caption(caption), objects, "white", world.TEXTURES[0], 0)
    return np.asarray(compositional.render(scene))


@pytest.mark.parametrize("caption", ["three red circles", "a large blue square left of a small green circle",
                                     "a yellow triangle and a red square, without blue",
                                     "a small red circle above a large yellow square, without green"])
def test_seen_caption_of_an_expert_image_is_its_caption(caption):
    image = compositional.render(compositional.scene_for_caption(caption, seed=5))
    assert co.seen_caption(image, caption) == caption


def test_seen_caption_says_what_is_there_instead():
    # asked "left of", drawn right of: the seen caption has the relation that holds
    img = _draw("a blue square left of a green circle", [("blue", "square", 24, 16, 5), ("green", "circle", 7, 16, 5)])
    assert co.seen_caption(img, "a blue square left of a green circle") == "a blue square right of a green circle"
    # sizes swapped
    img = _draw("a large red circle and a small blue square", [("red", "circle", 8, 8, 4), ("blue", "square", 22, 22, 7)])
    assert co.seen_caption(img, "a large red circle and a small blue square") == \
        "a small red circle and a large blue square"
    # two objects where four were asked, and the negated colour present: "without" goes
    img = _draw("four red circles, without blue", [("red", "circle", 8, 8, 4), ("blue", "circle", 22, 22, 4)])
    assert co.seen_caption(img, "four red circles, without blue") == "two red circles"
    # nothing seen: the caption itself
    blank = _draw("a red circle", [])
    assert co.seen_caption(blank, "a red circle") == "a red circle"


def test_compositional_result_round_trips_and_accuracy_is_the_share_of_parts_right():
    caption = "a blue square left of a green circle"
    img = _draw(caption, [("blue", "square", 24, 16, 5), ("green", "circle", 7, 16, 5)])
    result = co.score(img, caption)
    assert result.ok["relation"] is False and result.ok["binding"] is True
    assert result.share_ok == pytest.approx(sum(result.ok.values()) / len(result.ok))
    back = co.CompResult.from_dict(result.to_dict())
    assert (back.reward, back.parts, back.ok, back.share_ok) == (result.reward, result.parts, result.ok,
                                                                 result.share_ok)
    assert get_world().accuracy(result) == result.share_ok


def test_toy_compositional_scorer_is_the_oracle():
    from diffusion_po.eval.scorers import build_scorer

    scorer = build_scorer("toy_compositional")
    captions = ["two blue triangles", "a large red circle below a small green square, without yellow"]
    images = compositional.expert_images(captions, seed=1)
    images.append(compositional.render(compositional.scene_for_caption(captions[0], 2)))
    captions.append("four green squares")  # a wrong caption for that image
    got = scorer.score_all(images, captions)
    assert scorer.primary == "toyc_reward"
    for i, (im, cap) in enumerate(zip(images, captions)):
        want = co.score(im, cap)
        assert got["toyc_reward"][i] == pytest.approx(want.reward, abs=1e-6)
        assert got["toyc_share_ok"][i] == pytest.approx(want.share_ok, abs=1e-6)
        assert got["toyc_correct"][i] == float(want.correct)
    assert got["toyc_correct"][:2] == [1.0, 1.0] and got["toyc_correct"][2] == 0.0
    from diffusion_po.errors import DataError

    with pytest.raises(DataError, match="toy_compositional"):
        scorer.score_all(images[:1], ["a red circle on the left"])


def _small_compositional(**changes) -> build.BuildConfig:
    return dataclasses.replace(build.BuildConfig.small(seed=3), world="compositional", caption_split="train",
                               lr_schedule="constant", **changes)


def test_compositional_build_trains_on_train_captions_and_a_snapshot_is_the_shorter_build(tmp_path):
    """With the constant schedule the model after k steps does not depend on `steps`, so the shipped base
    (a snapshot of a longer build) is exactly `toy build` with steps=k."""
    from safetensors.torch import load_file

    _, captions = build.render_dataset(50, seed=3, which="compositional", split="train")
    assert all(compositional.caption_split(c) == "train" for c in captions)
    long = build.build_base(tmp_path / "long", _small_compositional(steps=4, snapshot_every=2))
    short = build.build_base(tmp_path / "short", _small_compositional(steps=2))
    a = load_file(long / "snapshots" / "step-2" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(short / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(long / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # two more steps changed it


def test_build_refuses_a_split_for_the_simple_world_and_an_unknown_schedule(tmp_path):
    with pytest.raises(ValueError, match="caption_split"):
        build.render_dataset(4, 0, "simple", "train")
    with pytest.raises(ValueError, match="unknown toy world"):
        build.render_dataset(4, 0, "other")
    with pytest.raises(ValueError, match="lr_schedule"):
        build.build_base(tmp_path / "x", dataclasses.replace(build.BuildConfig.small(), lr_schedule="linear"))


def test_paired_gains_are_means_of_differences_with_intervals():
    from diffusion_po.eval.stats import bootstrap_mean_ci
    from diffusion_po.toy.experiment import ToyRunConfig, paired_gains

    rng = random.Random(0)
    captions = compositional.split_captions("test")[:40]
    base = [co.score(compositional.render(compositional.scene_for_caption(captions[(i + 1) % 40], i)), c)
            for i, c in enumerate(captions)]  # mostly wrong images
    tuned = [co.score(compositional.render(compositional.scene_for_caption(c, i)), c) if rng.random() < 0.5 else b
             for i, (c, b) in enumerate(zip(captions, base))]
    run = ToyRunConfig(n_boot=500, eval_seed=4)
    gains = paired_gains(get_world(), base, tuned, run)
    diffs = [t.share_ok - b.share_ok for t, b in zip(tuned, base)]
    assert gains["accuracy_gain"]["value"] == pytest.approx(np.mean(diffs))
    assert gains["accuracy_gain"] == bootstrap_mean_ci(diffs, n_boot=500, seed=4).to_dict()
    assert gains["reward_gain"]["value"] == pytest.approx(np.mean([t.reward - b.reward for t, b in zip(tuned, base)]))
    assert gains["accuracy_gain"]["lo"] < gains["accuracy_gain"]["value"] < gains["accuracy_gain"]["hi"]


def test_test_items_are_each_caption_with_its_own_seeds_and_one_seed_is_the_old_split():
    from diffusion_po.toy.experiment import ToyRunConfig, eval_items, eval_seeds

    one = ToyRunConfig(n_test=7, test_seeds=1, n_val=5)
    captions, seeds = eval_items(one, "test")
    assert captions == get_world().prompts(7, one.eval_seed + 2, split="test")
    assert seeds == eval_seeds(7, one.eval_seed + 3)
    prompts, many_seeds = eval_items(dataclasses.replace(one, test_seeds=3), "test")
    assert prompts == [c for c in captions for _ in range(3)]
    assert len(set(many_seeds)) == 21 and many_seeds[:7] == seeds  # every image its own seed
    assert eval_items(dataclasses.replace(one, test_seeds=3), "val") == eval_items(one, "val")  # one image each


def test_the_win_rate_compares_each_captions_mean_over_its_seeds():
    """On each caption the tuned model wins one of its 3 images by much and loses two by little: its mean over
    the seeds is higher on both captions (a win rate of 1 per caption) while it wins 2 of the 6 images; with
    each caption's first image only, it wins A and loses B."""
    from diffusion_po.toy.experiment import (
        ToyRunConfig,
        caption_means,
        caption_win_rate,
        paired_gains,
        paired_win_rates,
    )

    @dataclasses.dataclass
    class Scored:
        reward: float
        share_ok: float

    class World:
        accuracy = staticmethod(lambda result: result.share_ok)

    prompts = ["A", "A", "A", "B", "B", "B"]
    base = [Scored(0.5, 0.5) for _ in prompts]
    tuned = [Scored(r, a) for r, a in ((0.9, 1.0), (0.45, 0.5), (0.45, 0.5), (0.45, 0.5), (0.8, 1.0), (0.45, 0.0))]
    captions, means = caption_means(prompts, [t.reward for t in tuned])
    assert captions == ["A", "B"] and means == pytest.approx([0.6, 1.7 / 3])
    run = ToyRunConfig(n_boot=200, eval_seed=3)
    per_caption, per_image = paired_win_rates(prompts, base, tuned, run)
    assert (per_caption.n, per_caption.wins, per_caption.losses, per_caption.win_rate) == (2, 2, 0, 1.0)
    assert (per_image.n, per_image.wins, per_image.losses) == (6, 2, 4)
    assert per_image.win_rate == pytest.approx(2 / 6)
    assert caption_win_rate(prompts, base, tuned, run) == per_caption
    first = caption_win_rate(prompts, base, tuned, run, first=1)  # each caption's first image only
    assert (first.n, first.wins, first.losses) == (2, 1, 1)
    gains = paired_gains(World(), base, tuned, run, prompts)
    assert gains["reward_gain"]["value"] == pytest.approx((0.1 + 0.2 / 3) / 2)
    assert gains["accuracy_gain"]["value"] == pytest.approx(((2 / 3 - 0.5) + (0.5 - 0.5)) / 2)
    assert gains["accuracy_gain"]["n"] == 2 and gains["reward_gain"]["lo"] == pytest.approx(0.2 / 3)

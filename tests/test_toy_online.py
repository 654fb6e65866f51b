"""`diffusion-po toy online`: the diversity measure, the reward's known bias, the run's trainer config and data,
and both online methods end to end at minimal size on a tiny compositional base."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_po.toy import compositional, online
from diffusion_po.toy.compositional_oracle import detect
from diffusion_po.toy.world import COLOURS

#: a minimal run: 2 rounds of 2 steps, a few prompts, 1 sampler step (training and evaluation)
MINIMAL = ["--rounds", "2", "--prompts", "8", "--val", "6", "--diversity-prompts", "2", "--diversity-samples", "3",
           "--sample-steps", "1", "--threads", "1", "--set", "method_options.steps_per_round=2",
           "--set", "train_batch_size=2", "--set", "method_options.sampler_steps=1", "--set", "lr_warmup_steps=0",
           "--set", "learning_rate=1e-3"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from diffusion_po.toy import build

    out = tmp_path_factory.mktemp("online_base") / "base"
    build.build_base(out, dataclasses.replace(build.BuildConfig.small(), world="compositional", caption_split="train",
                                              lr_schedule="constant"))
    return out


@pytest.fixture(scope="module")
def curated_run(tiny_base, tmp_path_factory) -> Path:
    """curated with real data (lambda 0.5) and a biased reward, end to end through the CLI."""
    from diffusion_po.cli import main

    out = tmp_path_factory.mktemp("online") / "curated"
    assert main(["toy", "online", "curated", "--model", str(tiny_base), "--out", str(out), "--real-fraction", "0.5",
                 "--bias", "red:0.3", *MINIMAL]) == 0
    return out


def test_entropy_bits_is_the_hand_computation():
    assert online.entropy_bits(["a", "a", "b", "c"]) == pytest.approx(-(0.5 * math.log2(0.5) + 2 * 0.25 * math.log2(0.25)))
    assert online.entropy_bits(["a", "a", "b", "c"]) == pytest.approx(1.5)
    assert online.entropy_bits(range(8)) == pytest.approx(3.0)
    assert online.entropy_bits(["red"] * 5) == 0.0 and online.entropy_bits([]) == 0.0
    # the 3 x 3 cells of a 32 px image: boundaries at 32/3 and 64/3
    assert online.position_cell(0.0, 31.9) == (0, 2)
    assert online.position_cell(32 / 3 - 1e-6, 32 / 3 + 1e-6) == (0, 1)
    assert online.position_cell(40.0, -1.0) == (2, 0)  # clipped into the grid


def test_diversity_of_hand_made_groups():
    """One caption's images all alike: 0 bits of colour and shape; a red circle and a blue square: 1 bit each."""
    same = compositional.expert_images(["a red circle"] * 3, seed=0)
    mixed = compositional.expert_images(["a red circle", "a blue square"], seed=1)
    div = online.diversity([same, mixed])
    seen_same = [o for im in same for o in detect(im)]
    seen_mixed = [o for im in mixed for o in detect(im)]
    assert [(o.colour, o.shape) for o in seen_mixed] == [("red", "circle"), ("blue", "square")]
    assert div["colour_entropy"] == pytest.approx((0.0 + 1.0) / 2)
    assert div["shape_entropy"] == pytest.approx((0.0 + 1.0) / 2)
    cells = [online.entropy_bits(online.position_cell(o.cx, o.cy) for o in seen) for seen in (seen_same, seen_mixed)]
    assert div["position_entropy"] == pytest.approx(sum(cells) / 2)
    assert div["entropy"] == pytest.approx((div["colour_entropy"] + div["shape_entropy"] + div["position_entropy"]) / 3)


def _hand_image() -> tuple[Image.Image, float]:
    """White background, a red 8x8 block and a blue 4x8 block: red is 64 of the 96 foreground pixels."""
    arr = np.full((32, 32, 3), 255, np.uint8)
    arr[4:12, 4:12] = COLOURS["red"]
    arr[20:24, 20:28] = COLOURS["blue"]
    return Image.fromarray(arr), 64 / 96


@pytest.mark.parametrize(("name", "caption", "metric"), [
    ("toy_compositional", "a red square", "toyc_reward"),
    ("toy", "a small red square in the center", "toy_reward"),
])
def test_bias_adds_weight_times_the_colour_share(name, caption, metric):
    from diffusion_po.eval.scorers import build_scorer
    from diffusion_po.toy.oracle import colour_fraction

    image, share = _hand_image()
    assert colour_fraction(image, "red", of_foreground=True) == pytest.approx(share, abs=1e-12)
    plain = build_scorer(name).score_all([image], [caption])
    biased_scorer = build_scorer(name, bias_colour="red", bias_weight=0.3)
    biased = biased_scorer.score_all([image], [caption])
    assert biased[metric][0] - plain[metric][0] == pytest.approx(0.3 * share, abs=1e-6)  # scores are fp32
    assert all(biased[m] == plain[m] for m in plain if m != metric)  # the other metrics stay the oracle's
    assert biased_scorer.version != build_scorer(name).version  # cached scores do not mix the two


def test_bias_options_are_checked():
    from diffusion_po.errors import ConfigError
    from diffusion_po.eval.scorers import build_scorer

    with pytest.raises(ConfigError, match="bias_colour 'purple'"):
        build_scorer("toy_compositional", bias_colour="purple", bias_weight=0.3)
    with pytest.raises(ConfigError, match="bias_weight"):
        build_scorer("toy_compositional", bias_weight=0.3)


def test_bad_input_is_a_one_line_error(capsys):
    from diffusion_po.cli import main

    for spec in ("purple:0.3", "red", "red:x", "red:inf"):
        assert main(["toy", "online", "curated", "--bias", spec]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--bias '{spec}'" in err and "COLOUR:WEIGHT" in err
    assert main(["toy", "online", "online_dpo", "--real-fraction", "0.5"]) == 2
    assert "--real-fraction" in capsys.readouterr().err
    assert main(["toy", "online", "curated", "--real-fraction", "1.5"]) == 2
    assert "--real-fraction" in capsys.readouterr().err
    assert main(["toy", "online", "curated", "--prompts", "0"]) == 2
    assert "--prompts must be positive" in capsys.readouterr().err


def test_online_verbs_have_help(capsys):
    from diffusion_po.cli import main

    for verb, flags in (("online", ("--rounds", "--prompts", "--real-fraction", "--bias", "--set", "--compare",
                                    "--threads", *online.ONLINE_METHODS)), ("online-plot", ("RUN", "--out"))):
        with pytest.raises(SystemExit) as exc:
            main(["toy", verb, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert all(flag in text for flag in flags), text


def test_trainer_config_of_a_run(tmp_path, tiny_base):
    """Rounds, one checkpoint per round, the world's oracle (with the bias) as reward, the data format; the
    user's --set (the reference of online DPO) wins."""
    from diffusion_po.config import load_yaml
    from diffusion_po.shipped import config_path
    from diffusion_po.toy.experiment import trainer_config

    cfg = online.OnlineRunConfig(method="online_dpo", rounds=3, bias="green:0.5",
                                 overrides=["method_options.reference=refresh", "method_options.steps_per_round=4"])
    data_file, info = online.write_data(cfg, tmp_path)
    assert data_file.name == "prompts.txt" and info["prompts"] == cfg.n_prompts
    from diffusion_po.toy.worlds import get_world

    assert data_file.read_text().splitlines() == get_world("compositional").prompts(cfg.n_prompts, 0, split="train")
    tc = trainer_config(online.toy_run(cfg), tiny_base, data_file, tmp_path / "train")
    o = tc.method_options
    assert tc.method == "online_dpo" and tc.data.format == "prompts" and o["reference"] == "refresh"
    assert o["rounds"] == 3 and o["steps_per_round"] == 4 and tc.max_train_steps == 12 and tc.checkpointing_steps == 4
    assert o["reward"]["name"] == "toy_compositional"
    assert o["reward"]["options"] == {"bias_colour": "green", "bias_weight": 0.5}
    shipped = load_yaml(config_path("toy_online_dpo"))
    assert o["beta_dpo"] == shipped["method_options"]["beta_dpo"]  # the shipped config is the start
    assert "refresh ref" in online.run_label({"method": "online_dpo", "train_config": {"method_options": o}})

    simple = online.toy_run(online.OnlineRunConfig(world="simple"))
    assert "method_options.reward.name=toy" in simple.overrides


def test_real_fraction_writes_expert_images(tmp_path, tiny_base):
    import pyarrow.parquet as pq

    from diffusion_po.toy.experiment import trainer_config
    from diffusion_po.toy.worlds import get_world

    cfg = online.OnlineRunConfig(real_fraction=0.25, n_prompts=5)
    data_file, info = online.write_data(cfg, tmp_path)
    rows = pq.read_table(data_file).to_pylist()
    toy_world = get_world("compositional")
    assert [r["caption"] for r in rows] == toy_world.prompts(5, 0, split="train") and info["real_images"] == 5
    for r in rows:  # lossless drawings that satisfy their captions
        assert toy_world.score(Image.open(io.BytesIO(r["image"])), r["caption"]).correct
    tc = trainer_config(online.toy_run(cfg), tiny_base, data_file, tmp_path / "train")
    assert tc.data.format == "images" and tc.method_options["real_data_fraction"] == 0.25
    assert tc.data.data_files == [str(data_file)]


def test_curated_end_to_end(curated_run):
    res = json.loads((curated_run / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [0, 1, 2] and [r["step"] for r in res["rounds"]] == [0, 2, 4]
    from diffusion_po.toy.worlds import get_world

    toy_world = get_world("compositional")
    for row in res["rounds"]:
        for key in ("reward", "share_ok", "correct", "colour_entropy", "shape_entropy", "position_entropy", "entropy"):
            assert np.isfinite(row[key]), key
        assert set(row["colour_share"]) == set(COLOURS)
        assert any(k in row for k, _ in toy_world.report_parts[2:])  # the oracle's parts, separately
    assert [r["round"] for r in res["train_rounds"]] == [1, 2]
    assert res["bias"] == {"colour": "red", "weight": 0.3} and res["real_fraction"] == 0.5
    assert (curated_run / "real_images.parquet").is_file() and (curated_run / "curves.png").is_file()
    assert not list((curated_run / "train").glob("checkpoint-*"))  # removed after the evaluation
    # the trainer mixed real rows in at lambda and trained on the biased reward
    rows = [json.loads(line) for line in (curated_run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([r["real_fraction"] for r in rows]) == pytest.approx(0.5)
    assert res["train_config"]["method_options"]["reward"]["options"] == {"bias_colour": "red", "bias_weight": 0.3}
    table = [line for line in (curated_run / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3 + 1 + 2  # the per-round table (header + rounds) and the training rewards'


def test_online_dpo_refresh_end_to_end_with_compare(curated_run, tiny_base, tmp_path):
    from diffusion_po.cli import main

    out = tmp_path / "dpo"
    assert main(["toy", "online", "online_dpo", "--model", str(tiny_base), "--out", str(out),
                 "--set", "method_options.reference=refresh", "--compare", str(curated_run), *MINIMAL]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["rounds"]) == 3 and res["train_config"]["method_options"]["reference"] == "refresh"
    assert res["label"] == "online_dpo (refresh ref)" and (out / "curves.png").is_file()
    assert main(["toy", "online-plot", str(curated_run), str(out), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").is_file()
    assert main(["toy", "online-plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2

"""The toy base model build (reduced size), the pairs parquet round trip through the real loader, and the
main job's trainer configuration."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_po.errors import ConfigError
from diffusion_po.toy import build, oracle, world
from diffusion_po.toy import pairs as toy_pairs


@pytest.fixture(scope="module")
def small_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy_base") / "base"
    build.build_base(out, build.BuildConfig.small(seed=7))
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.parent.name}/{k}"] = v
    return out


def test_build_is_a_loadable_pipeline_and_reproducible(small_base, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(small_base)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.latent_channels == 4
    assert type(pipe.tokenizer).__name__.startswith("CLIPTokenizer")
    info = json.loads((small_base / "toy_build.json").read_text())
    assert info["config"]["seed"] == 7 and info["scaling_factor"] > 0
    again = build.build_base(tmp_path / "again", build.BuildConfig.small(seed=7))
    a, b = _tensors(small_base), _tensors(again)
    assert a.keys() == b.keys() and len(a) > 50
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pairs_parquet_round_trip_through_the_loader(small_base, tmp_path):
    from diffusion_po.config import DataConfig
    from diffusion_po.data import build_train_data

    pipe = toy_pairs.load_pipeline(small_base)
    path = tmp_path / "pairs.parquet"
    summary = toy_pairs.write_pairs(pipe, path, n_prompts=6, seed=2, steps=2, batch_size=8, progress=False,
                                    world="simple")
    assert summary.rows == 6
    rows = toy_pairs.read_pairs(path)
    assert len(rows) == 6
    for r in rows:
        assert world.caption_split(r["caption"]) == "train"
        assert r["label_0"] + r["label_1"] == 1.0
        # labels follow the oracle on the stored (JPEG-decoded) images
        r0, r1 = oracle.reward(r["image_0"], r["caption"]), oracle.reward(r["image_1"], r["caption"])
        assert r0 == pytest.approx(r["reward_0"]) and r1 == pytest.approx(r["reward_1"])
        if r["label_0"] != 0.5:
            assert (r["label_0"] == 1.0) == (r0 > r1)
        world.parse_caption(r["caption_0"])
        world.parse_caption(r["caption_1"])
    # same seeds, same pairs
    again = tmp_path / "again.parquet"
    toy_pairs.write_pairs(pipe, again, n_prompts=6, seed=2, steps=2, batch_size=8, progress=False, world="simple")
    assert [r["jpg_0"] for r in toy_pairs.read_pairs(again)] == [r["jpg_0"] for r in rows]
    assert [(r["seed_0"], r["seed_1"]) for r in rows] == [(2 * 1_000_003 + 2 * i, 2 * 1_000_003 + 2 * i + 1)
                                                          for i in range(6)]


    for fmt in ("pickapic", "dcpo"):
        cfg = DataConfig(format=fmt, data_files=[str(path)], random_flip=False, drop_ties=True)
        data = build_train_data(cfg, 32, 2, 0, 1, 0)
        batch = next(iter(data.loader))
        assert batch["pixels_w"].shape == (2, 3, 32, 32)
        assert batch["pixels_w"].min() >= -1 and batch["pixels_w"].max() <= 1
        if fmt == "dcpo":
            assert len(batch["captions_w"]) == 2
    # the loader puts the oracle's winner first
    cfg = DataConfig(format="pickapic", data_files=[str(path)], random_flip=False, drop_ties=True)
    data = build_train_data(cfg, 32, 1, 0, 1, 0)
    batch = next(iter(data.loader))
    row = rows[batch["row_ids"][0]]
    winner = row["image_0"] if row["label_0"] == 1.0 else row["image_1"]
    got = ((batch["pixels_w"][0].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    assert np.abs(got - np.asarray(winner, dtype=np.float64)).max() <= 1.0


def test_label_noise_flips_about_the_asked_fraction(small_base, tmp_path):
    pipe = toy_pairs.load_pipeline(small_base)
    s = toy_pairs.write_pairs(pipe, tmp_path / "noisy.parquet", n_prompts=40, seed=0, label_noise=0.3, steps=1,
                              batch_size=80, progress=False)
    decided = s.rows - s.ties
    assert 0 < s.flipped < decided
    assert s.oracle_agreement == pytest.approx(1 - s.flipped / decided)


def test_toy_trainer_config_comes_from_the_shipped_yaml(tmp_path):
    """configs/toy_dpo.yaml is the one source of the toy defaults; a method's config goes over it (its data
    section key by key), then --set overrides."""
    import yaml

    from diffusion_po.config import METHOD_KEY_ALIASES
    from diffusion_po.shipped import config_path
    from diffusion_po.toy.experiment import ToyRunConfig, trainer_config

    shipped = yaml.safe_load(config_path("toy_dpo").read_text())
    cfg = trainer_config(ToyRunConfig(), tmp_path, tmp_path / "p.parquet", tmp_path / "train")
    for key, value in shipped.items():
        if key == "data":
            for k, v in value.items():
                assert getattr(cfg.data, k) == v, k
        elif key in METHOD_KEY_ALIASES:  # method settings live in method_options
            assert cfg.method_options[key] == value, key
        else:
            assert getattr(cfg, key) == value, key
    assert cfg.data.data_files == [str(tmp_path / "p.parquet")]
    assert cfg.pretrained_model_name_or_path == str(tmp_path) and cfg.output_dir == str(tmp_path / "train")

    run = ToyRunConfig(config=str(config_path("toy_dpo")), overrides=["learning_rate=3e-6"])
    cfg = trainer_config(run, tmp_path, tmp_path / "p.parquet", tmp_path / "train")
    assert cfg.learning_rate == 3e-6 and cfg.data.format == "pickapic" and cfg.data.random_flip is False

    # a method's config by name: its keys over toy_dpo's, the rest of the data section kept
    dcpo = trainer_config(ToyRunConfig(config="toy_dcpo"), tmp_path, tmp_path / "p.parquet", tmp_path / "t")
    assert dcpo.method == "dcpo" and dcpo.data.format == "dcpo"
    assert dcpo.data.random_flip is shipped["data"]["random_flip"] and dcpo.max_train_steps == shipped["max_train_steps"]


def test_toy_defaults_follow_the_shipped_config_file(tmp_path, monkeypatch):
    """Editing the shipped toy_dpo.yaml changes the toy runs: no second copy of the defaults in the code."""
    import yaml

    from diffusion_po import shipped
    from diffusion_po.toy import experiment

    assert not hasattr(experiment, "TOY_DPO_DEFAULTS")
    data = yaml.safe_load(shipped.config_path("toy_dpo").read_text())
    data["max_train_steps"] = data["max_train_steps"] + 7
    data["data"]["center_crop"] = not data["data"]["center_crop"]
    (tmp_path / "toy_dpo.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setattr(shipped, "CONFIGS_DIR", tmp_path)
    cfg = experiment.trainer_config(experiment.ToyRunConfig(), tmp_path, tmp_path / "p.parquet", tmp_path / "t")
    assert cfg.max_train_steps == data["max_train_steps"] and cfg.data.center_crop is data["data"]["center_crop"]


def test_method_configs_are_the_shipped_ones():
    from diffusion_po.shipped import config_path
    from diffusion_po.toy.methods import METHODS, method_config

    assert method_config("kto") == str(config_path("toy_kto"))
    assert method_config("robust_dpo") is None  # dpo's config with label_smoothing set
    assert {"dpo", "dcpo", "mapo", "kto", "dro", "npo", "self_npo"} <= set(METHODS)


def test_reward_gain_is_the_mean_paired_difference(tmp_path):
    """toy methods: the paired gain of a run is mean(tuned - base) over its test items."""
    from diffusion_po.toy import methods as mod

    pairs = [(0.80, 0.82), (0.90, 0.89), (0.70, 0.75), (0.85, 0.85)]
    lines = [json.dumps({"prompt": f"p{i}", "seed": i, "base": {"reward": b}, "tuned": {"reward": t}})
             for i, (b, t) in enumerate(pairs)]
    (tmp_path / "test_scores.jsonl").write_text("\n".join(lines) + "\n")
    gain = mod.reward_gain(tmp_path, n_boot=200)
    assert gain["value"] == pytest.approx((0.02 - 0.01 + 0.05 + 0.0) / 4)
    assert gain["lo"] <= gain["value"] <= gain["hi"]
    assert mod.reward_gain(tmp_path / "missing") is None


def test_scale_sweep_scores_plain_cfg_per_scale(small_base):
    """toy scales: one row per scale, same captions and seeds, rewards that depend on it."""
    from diffusion_po.toy import methods as mod

    rows = mod.scale_sweep([1.0, 8.0], model=str(small_base), n_val=4, steps=3)
    assert [r["scale"] for r in rows] == [1.0, 8.0]
    for r in rows:
        assert set(r) == {"scale", "reward", "colour", "shape", "clean"}
        assert 0.0 <= r["reward"] <= 1.0
    assert rows[0]["reward"] != rows[1]["reward"]


def test_guidance_shift_is_zero_for_the_base_and_measures_a_known_shift(small_base, tmp_path):
    """toy shift: d = 0 and k = 0 when the negative model is the base; a changed network
    (a constant offset on every output) gives d != 0 that is not parallel to CFG's direction."""
    from diffusers import UNet2DConditionModel

    from diffusion_po.toy import methods as mod

    same = mod.guidance_shift(str(small_base), model=str(small_base), n=4, timesteps=(500,))
    assert same[0]["k"] == 0.0 and same[0]["norm_d"] == 0.0
    unet = UNet2DConditionModel.from_pretrained(small_base, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)  # shifts every prediction by a constant: a change off CFG's direction
    unet.save_pretrained(tmp_path / "neg")
    moved = mod.guidance_shift(str(tmp_path / "neg"), model=str(small_base), n=4, timesteps=(500,))
    assert moved[0]["norm_d"] > 0
    assert abs(moved[0]["cos"]) < 1.0


def test_perp_neg_experiment_runs_end_to_end(tiny_model_factory, tmp_path):
    """The Perp-Neg experiment runs on any 32x32 pipeline folder (here the tiny SD model instead of the toy base)."""
    from diffusion_po.toy import perp_neg

    items = perp_neg.overlap_items(6)
    for caption, colour, which in items:
        spec = world.parse_caption(caption)
        assert spec.colours()[which] == colour and len(set(spec.colours())) == 2
    perfect = perp_neg.score_overlap(world.render(world.scene_for_caption(items[0][0], 0)), *items[0])
    assert perfect["keep"] == 1.0 and perfect["removed"] == 0.0  # a perfect render keeps all, removes nothing
    res = perp_neg.run_perp_neg(tmp_path / "pn", model=tiny_model_factory("sd"), n=4, steps=2, batch_size=4)
    assert set(res["summary"]) == {"cfg", "negative-prompt", "perp-neg", "perp-neg-w1.5", "composable"}
    assert (tmp_path / "pn" / "results.json").is_file() and (tmp_path / "pn" / "grid_perp-neg.png").is_file()
    assert res["paired"]["perp-neg vs negative-prompt (keep_score)"]["n"] == 4


# --------------------------------------------------------------------------- the `diffusion-po toy` verbs
METHOD_FLAGS = ("--out", "--model", "--config", "--set", "--pairs", "--val", "--test", "--threads",
                "--keep-checkpoints", "--pairs-file", "--experts", "--images", "--cache-dir")


@pytest.mark.parametrize(("verb", "flags"), [
    ("method", METHOD_FLAGS), ("table", ("RUN",)), ("scales", ("--scales", "--model", "--val", "--threads")),
    ("shift", ("CHECKPOINT", "--model")),
    ("perp-neg", ("--out", "--model", "--n", "--seed", "--sample-steps", "--guidance")),
])
def test_toy_experiment_verbs_have_help(verb, flags, capsys):
    from diffusion_po.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["toy", verb, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in flags), text
    if verb == "method":
        from diffusion_po.toy.methods import METHODS

        assert all(name in text for name in METHODS)


def test_toy_verbs_reject_bad_input_in_one_line(tmp_path, capsys):
    from diffusion_po.cli import main

    assert main(["toy", "method", "kto", "--pairs-file", str(tmp_path / "none.parquet")]) == 2
    assert main(["toy", "scales", "--scales", "1,x"]) == 2
    assert main(["toy", "shift", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "--pairs-file" in err and "--scales" in err and "missing does not exist" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["toy", "method", "ipo"])
    assert "invalid choice" in capsys.readouterr().err


def test_toy_table_lists_finished_runs(tmp_path, capsys):
    from diffusion_po.cli import main

    ci = {"value": 0.87, "lo": 0.86, "hi": 0.88}
    run = {"method": "kto", "comparison": "tuned vs base (CFG)", "chosen_step": 50, "timings_s": {"train": 12.0},
           "win_rate": {"win_rate": 0.6, "lo": 0.55, "hi": 0.65}, "base": {"reward": ci}, "tuned": {"reward": ci},
           "reward_gain": {"value": 0.01, "lo": 0.0, "hi": 0.02}}
    (tmp_path / "kto").mkdir()
    (tmp_path / "kto" / "results.json").write_text(json.dumps(run))
    assert main(["toy", "table", str(tmp_path / "kto"), str(tmp_path / "unfinished")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith("| kto | tuned vs base (CFG) | 0.600 [0.550, 0.650]")


def test_toy_scales_and_shift_verbs_run(small_base, capsys):
    from diffusion_po.cli import main

    assert main(["toy", "scales", "--model", str(small_base), "--val", "2", "--scales", "1,8"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "8"]
    assert main(["toy", "shift", str(small_base), "--model", str(small_base)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 5 and all(r.split("|")[2].strip() == "0.000" for r in rows)  # the base itself: k = 0


def test_toy_perp_neg_verb_runs(tiny_model_factory, tmp_path, capsys):
    from diffusion_po.cli import main

    out = tmp_path / "pn"
    assert main(["toy", "perp-neg", "--model", tiny_model_factory("sd"), "--n", "2", "--sample-steps", "1",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 2 and res["steps"] == 1 and json.loads(capsys.readouterr().out) == res
@pytest.mark.parametrize("method,extra,reads_beta", [("kto", [], False), ("sft", ["method=sft"], False),
                                                     ("robust_dpo", ["method=robust_dpo", "label_smoothing=0.1"], True),
                                                     ("npo", [], True)])
def test_toy_methods_take_the_dpo_defaults_method_settings_only_if_they_read_them(tmp_path, method, extra, reads_beta):
    import yaml

    from diffusion_po.toy.experiment import ToyRunConfig, trainer_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"toy_{method}.yaml"
    toy_dpo = yaml.safe_load(path.with_name("toy_dpo.yaml").read_text())
    own = yaml.safe_load(path.read_text()) if path.is_file() else {}
    beta = float(own.get("beta_dpo", toy_dpo["beta_dpo"])) if reads_beta else None
    run = ToyRunConfig(config=str(path) if path.is_file() else None, overrides=extra)
    cfg = trainer_config(run, tmp_path, tmp_path / "p.parquet", tmp_path / "train")
    assert cfg.method == method and cfg.method_options.get("beta_dpo") == beta
    for value in (toy_dpo["beta_dpo"] + 23, toy_dpo["beta_dpo"]):  # given by the user, even the default: an error
        for key in ("beta_dpo", "method_options.beta_dpo"):  # in either spelling
            with pytest.raises(ConfigError, match="'beta_dpo' is not read by method 'kto'"):
                trainer_config(ToyRunConfig(config=str(path.with_name("toy_kto.yaml")), overrides=[f"{key}={value}"]),
                               tmp_path, tmp_path / "p.parquet", tmp_path / "train")


def _text_encoder_loading_info(folder: Path) -> dict:
    from transformers import CLIPTextModel

    _, info = CLIPTextModel.from_pretrained(folder / "text_encoder", output_loading_info=True)
    return {k: sorted(v) for k, v in info.items() if k != "error_msgs"}


def test_shipped_toy_text_encoder_loads_every_weight():
    """The shipped base's text encoder: no missing, unexpected or mismatched weights (a missing one would be
    random), stored under `text_model.` as every SD checkpoint (what transformers 4 reads too)."""
    from safetensors import safe_open

    assert _text_encoder_loading_info(build.ASSET_DIR) == {"missing_keys": [], "unexpected_keys": [],
                                                          "mismatched_keys": []}
    with safe_open(str(build.ASSET_DIR / "text_encoder" / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)


def test_builder_writes_the_classic_text_encoder_layout(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16))
    model.save_pretrained(tmp_path / "text_encoder")
    build.classic_text_encoder_keys(tmp_path / "text_encoder" / "model.safetensors")
    assert _text_encoder_loading_info(tmp_path) == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    loaded = CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_pairs_of_k_samples_are_the_best_and_the_worst(small_base, tmp_path):
    """With samples_per_prompt K > 2 each pair is the best and the worst of the prompt's K samples (in sample
    order), each sample with its own seed."""
    pipe = toy_pairs.load_pipeline(small_base)
    k, n, seed = 3, 4, 5
    toy_pairs.write_pairs(pipe, tmp_path / "k3.parquet", n_prompts=n, seed=seed, steps=2, batch_size=8,
                          progress=False, world="simple", samples_per_prompt=k)
    rows = toy_pairs.read_pairs(tmp_path / "k3.parquet")
    prompts = [r["caption"] for r in rows]
    seeds = [[seed * 1_000_003 + k * i + j for j in range(k)] for i in range(n)]
    images = toy_pairs.sample(pipe, [p for p in prompts for _ in range(k)], [s for row in seeds for s in row], steps=2,
                              batch_size=8)
    for i, r in enumerate(rows):
        rewards = [oracle.reward(Image.open(io.BytesIO(toy_pairs.jpeg_bytes(images[i * k + j]))), r["caption"])
                   for j in range(k)]
        best, worst = rewards.index(max(rewards)), rewards.index(min(rewards))
        first, second = (0, 1) if best == worst else sorted((best, worst))
        assert (r["seed_0"], r["seed_1"]) == (seeds[i][first], seeds[i][second])
        assert (r["reward_0"], r["reward_1"]) == pytest.approx((rewards[first], rewards[second]))
    with pytest.raises(ValueError, match="at least 2"):
        toy_pairs.write_pairs(pipe, tmp_path / "k1.parquet", n_prompts=1, samples_per_prompt=1, world="simple")


def test_the_simple_world_runs_its_overlay_over_the_main_job_config(tmp_path):
    """configs/toy_dpo.yaml is the compositional main job's; `--world simple` puts configs/toy_simple.yaml over
    it (before a method's config), so the simple world keeps its own measured recipe."""
    import yaml

    from diffusion_po.shipped import config_path
    from diffusion_po.toy.experiment import ToyRunConfig, trainer_config

    main_job = yaml.safe_load(config_path("toy_dpo").read_text())
    overlay = yaml.safe_load(config_path("toy_simple").read_text())
    assert overlay and set(overlay) <= set(main_job)
    comp = trainer_config(ToyRunConfig(), tmp_path, tmp_path / "p.parquet", tmp_path / "t")
    simple = trainer_config(ToyRunConfig(world="simple"), tmp_path, tmp_path / "p.parquet", tmp_path / "t")
    assert comp.learning_rate == main_job["learning_rate"] and simple.learning_rate == overlay["learning_rate"]
    assert comp.method_options["beta_dpo"] == main_job["beta_dpo"]
    assert simple.method_options["beta_dpo"] == overlay["beta_dpo"]
    # a method's own config still goes over the overlay
    mapo = trainer_config(ToyRunConfig(world="simple", config="toy_mapo"), tmp_path, tmp_path / "p.parquet",
                          tmp_path / "t")
    assert mapo.learning_rate == yaml.safe_load(config_path("toy_mapo").read_text())["learning_rate"]
    assert ToyRunConfig().samples_per_pair() == 4 and ToyRunConfig(world="simple").samples_per_pair() == 2
    assert ToyRunConfig(pair_samples=3).samples_per_pair() == 3


@pytest.mark.parametrize("world_name", ["compositional", "simple"])
def test_every_toy_method_config_builds_in_both_worlds(tmp_path, world_name):
    """Each method's shipped toy config over the world's defaults is a valid TrainConfig: online_dpo's
    `method_options.beta_dpo` replaces the simple world's top-level `beta_dpo` (not "set twice")."""
    from diffusion_po.toy.experiment import ToyRunConfig, trainer_config
    from diffusion_po.toy.methods import METHODS, method_config

    for method in METHODS:
        cfg = trainer_config(ToyRunConfig(world=world_name, config=method_config(method)), tmp_path,
                             tmp_path / "p.parquet", tmp_path / "t")
        assert cfg.output_dir == str(tmp_path / "t"), method
    online = trainer_config(ToyRunConfig(world=world_name, config="toy_online_dpo"), tmp_path, tmp_path / "p.parquet",
                            tmp_path / "t")
    assert online.method_options["beta_dpo"] == 100.0

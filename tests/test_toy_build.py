"""The toy base model build (reduced size), the pairs parquet round trip through the real loader, and the
main job's trainer configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

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
    summary = toy_pairs.write_pairs(pipe, path, n_prompts=6, seed=2, steps=2, batch_size=8, progress=False)
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
    toy_pairs.write_pairs(pipe, again, n_prompts=6, seed=2, steps=2, batch_size=8, progress=False)
    assert [r["jpg_0"] for r in toy_pairs.read_pairs(again)] == [r["jpg_0"] for r in rows]

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


def test_toy_dpo_config_matches_the_shipped_yaml(tmp_path):
    import yaml

    from diffusion_po.toy.experiment import TOY_DPO_DEFAULTS, ToyRunConfig, trainer_config

    shipped = Path(__file__).resolve().parents[1] / "configs" / "toy_dpo.yaml"
    data = yaml.safe_load(shipped.read_text())
    for key, value in TOY_DPO_DEFAULTS.items():
        if key == "data":
            for k, v in value.items():
                assert data["data"][k] == v, k
        else:
            assert data[key] == value, key
    run = ToyRunConfig(config=str(shipped), overrides=["learning_rate=3e-6"])
    cfg = trainer_config(run, tmp_path, tmp_path / "p.parquet", tmp_path / "train")
    assert cfg.learning_rate == 3e-6 and cfg.data.format == "pickapic" and cfg.data.random_flip is False
    assert cfg.data.data_files == [str(tmp_path / "p.parquet")]


def _toy_methods_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "toy_methods.py"
    spec = importlib.util.spec_from_file_location("toy_methods", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reward_gain_is_the_mean_paired_difference(tmp_path):
    """scripts/toy_methods.py: the paired gain of a run is mean(tuned - base) over its test items."""
    mod = _toy_methods_script()
    pairs = [(0.80, 0.82), (0.90, 0.89), (0.70, 0.75), (0.85, 0.85)]
    lines = [json.dumps({"prompt": f"p{i}", "seed": i, "base": {"reward": b}, "tuned": {"reward": t}})
             for i, (b, t) in enumerate(pairs)]
    (tmp_path / "test_scores.jsonl").write_text("\n".join(lines) + "\n")
    gain = mod.reward_gain(tmp_path, n_boot=200)
    assert gain["value"] == pytest.approx((0.02 - 0.01 + 0.05 + 0.0) / 4)
    assert gain["lo"] <= gain["value"] <= gain["hi"]
    assert mod.reward_gain(tmp_path / "missing") is None


def test_scale_sweep_scores_plain_cfg_per_scale(small_base):
    """scripts/toy_methods.py scales: one row per scale, same captions and seeds, rewards that depend on it."""
    mod = _toy_methods_script()
    rows = mod.scale_sweep([1.0, 8.0], model=str(small_base), n_val=4, steps=3)
    assert [r["scale"] for r in rows] == [1.0, 8.0]
    for r in rows:
        assert set(r) == {"scale", "reward", "colour", "shape", "clean"}
        assert 0.0 <= r["reward"] <= 1.0
    assert rows[0]["reward"] != rows[1]["reward"]


def test_guidance_shift_is_zero_for_the_base_and_measures_a_known_shift(small_base, tmp_path):
    """scripts/toy_methods.py shift: d = 0 and k = 0 when the negative model is the base; a changed network
    (a constant offset on every output) gives d != 0 that is not parallel to CFG's direction."""
    from diffusers import UNet2DConditionModel

    mod = _toy_methods_script()
    same = mod.guidance_shift(str(small_base), model=str(small_base), n=4, timesteps=(500,))
    assert same[0]["k"] == 0.0 and same[0]["norm_d"] == 0.0
    unet = UNet2DConditionModel.from_pretrained(small_base, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)  # shifts every prediction by a constant: a change off CFG's direction
    unet.save_pretrained(tmp_path / "neg")
    moved = mod.guidance_shift(str(tmp_path / "neg"), model=str(small_base), n=4, timesteps=(500,))
    assert moved[0]["norm_d"] > 0
    assert abs(moved[0]["cos"]) < 1.0


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

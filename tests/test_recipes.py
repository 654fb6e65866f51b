"""The shipped recipes against the authors' runs (each value's source is a comment in the config), and the
config switches they rely on: total_batch_size, upcast_vae, sdxl_time_ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusion_po.config import TrainConfig, from_dict, load_train_config, resolve_total_batch
from diffusion_po.shipped import CONFIGS_DIR as CONFIG_DIR

RECIPES = sorted(p.name for p in Path(CONFIG_DIR).glob("*.yaml") if not p.name.startswith("toy_"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each Trainer here may pick its own mixed precision; accelerate keeps one per process unless reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def recipe(name: str) -> TrainConfig:
    return load_train_config(Path(CONFIG_DIR) / name)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_validates(name):
    cfg = recipe(name)
    assert resolve_total_batch(cfg, 1).gradient_accumulation_steps >= 1


def test_sd15_dpo_is_2048_pairs_and_lr_2048e_5_on_any_gpu_count():
    """Salesforce launchers/sd15.sh: 16 GPUs x 1 x 128 = 2048 pairs, lr 1e-8 x 2048 (scale_lr)."""
    cfg = recipe("sd15_dpo.yaml")
    for processes, accumulation in [(1, 2048), (8, 256), (16, 128)]:
        run = resolve_total_batch(cfg, processes)
        assert run.gradient_accumulation_steps == accumulation
        pairs = run.train_batch_size * run.gradient_accumulation_steps * processes
        assert pairs == 2048
        assert run.scale_lr and run.learning_rate * pairs == pytest.approx(2.048e-5)


def test_kto_recipes_do_not_accumulate_256x():
    """diffusion-kto commit ed36c54: gradient_accumulation_steps 256 -> 1 (4 GPUs x 2 images per update)."""
    cfg = recipe("sd15_kto.yaml")
    assert resolve_total_batch(cfg, 4).gradient_accumulation_steps == 1
    assert cfg.total_batch_size == 8 and cfg.train_batch_size == 2
    assert "ed36c54" in (Path(CONFIG_DIR) / "sd15_kto.yaml").read_text()
    xl = recipe("sdxl_kto_lora.yaml")
    assert xl.total_batch_size == 16 and resolve_total_batch(xl, 2).gradient_accumulation_steps == 1


@pytest.mark.parametrize("name", ["sd15_self_npo.yaml", "sdxl_self_npo.yaml"])
def test_self_npo_recipes_never_flip(name):
    """Self-NPO train.py / train_xl.py apply no flip to their training images."""
    assert recipe(name).data.random_flip is False


@pytest.mark.parametrize("name", [n for n in RECIPES if "sdxl" in n])
def test_sdxl_recipes_keep_the_fp16_fix_vae_in_fp32(name):
    """diffusers train_diffusion_dpo_sdxl.py keeps the VAE in fp32; the fp16-fix VAE's config does not ask for it."""
    cfg = recipe(name)
    assert cfg.pretrained_vae_model_name_or_path == "madebyollin/sdxl-vae-fp16-fix"
    assert cfg.upcast_vae is True


def _trainer(tmp_path, model: str, family=None, **keys):
    from diffusion_po.training.trainer import Trainer

    cfg = from_dict(TrainConfig, {
        "pretrained_model_name_or_path": model, "output_dir": str(tmp_path / "out"), "resolution": 32,
        "train_batch_size": 2, "report_to": "none", "compile": "none", "data": {"format": "pickapic"}, **keys,
    })
    return Trainer(cfg, family=family)


def test_trainer_applies_total_batch_size(tmp_path, tiny_model_factory):
    trainer = _trainer(tmp_path, tiny_model_factory("sd"), total_batch_size=6, use_lora=True)
    assert trainer.cfg.gradient_accumulation_steps == 3
    assert trainer.accelerator.gradient_accumulation_steps == 3


def test_upcast_vae_keeps_a_vae_without_force_upcast_in_fp32(tmp_path, tiny_model_factory):
    from diffusion_po.families import load_family

    model = tiny_model_factory("sdxl")
    dtypes = {}
    for upcast in (False, True):
        family = load_family(model)
        family.vae.register_to_config(force_upcast=False)  # as madebyollin/sdxl-vae-fp16-fix
        trainer = _trainer(tmp_path, model, family, mixed_precision="bf16", upcast_vae=upcast, use_lora=True)
        dtypes[upcast] = (trainer.family.vae.dtype, trainer.family.text_encoders[0].dtype)
    assert dtypes[False] == (torch.bfloat16, torch.bfloat16)
    assert dtypes[True] == (torch.float32, torch.bfloat16)


def test_sdxl_time_ids_image_or_fixed(tmp_path, tiny_model_factory):
    """`image`: each image's original size and crop; `fixed`: the Diffusion-DPO repository's
    [res, res, 0, 0, res, res] whatever the image."""
    model = tiny_model_factory("sdxl")
    sizes = torch.tensor([[48, 40], [64, 32]])
    crops = torch.tensor([[8, 0], [0, 16]])
    image = _trainer(tmp_path, model, use_lora=True)
    cond = image.context.encode_prompts(["a", "b"], {"original_sizes": sizes, "crop_top_lefts": crops})
    assert cond["time_ids"].tolist() == [[48, 40, 8, 0, 32, 32], [64, 32, 0, 16, 32, 32]]
    fixed = _trainer(tmp_path, model, use_lora=True, sdxl_time_ids="fixed")
    cond = fixed.context.encode_prompts(["a", "b"], {"original_sizes": sizes, "crop_top_lefts": crops})
    assert cond["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    with pytest.raises(Exception, match="sdxl_time_ids.*SDXL"):
        _trainer(tmp_path, tiny_model_factory("sd"), use_lora=True, sdxl_time_ids="fixed")

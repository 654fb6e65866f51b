"""Saved LoRAs load as trained (lora_alpha kept, stock diffusers and our loaders alike), into the right
family only, and LoRA / full runs are reproducible from `seed`."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusion_po.errors import ModelLoadError

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _family(path: str):
    from diffusion_po.families import load_family

    return load_family(path)


def _trained_lora(fam, rank: int = 4, alpha: float = 16.0):
    """The family's network with a LoRA as the trainer adds it (rank != alpha) and non-zero B (as after training)."""
    from peft import LoraConfig

    net = fam.network
    torch.manual_seed(0)
    net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def _inputs(fam, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    size = 32 // fam.vae_scale_factor
    x = torch.randn(2, fam.latent_channels, size, size, generator=g)
    cond = fam.encode_prompts(["a red square", "a blue circle"], resolution=32)
    return x, torch.tensor([500.0, 100.0]), cond


@torch.no_grad()
def _out(fam, network, inputs):
    x, t, cond = inputs
    return fam.predict(network, x, t, cond)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_saved_lora_loads_with_its_alpha_in_stock_diffusers(tmp_path, tiny_model_factory, family):
    from diffusion_po.families import load_pipeline

    path = tiny_model_factory(family)
    fam = _family(path)
    inputs = _inputs(fam)
    base = _out(fam, copy.deepcopy(fam.network), inputs)
    net = _trained_lora(fam)
    trained = _out(fam, net, inputs)
    assert (trained - base).abs().max() > 1e-3  # the LoRA changes the output
    fam.save_lora(tmp_path / "lora", net)

    stock = load_pipeline(path)
    stock.load_lora_weights(str(tmp_path / "lora"))
    loaded_net = stock.transformer if family == "sd3" else stock.unet
    torch.testing.assert_close(_out(fam, loaded_net, inputs), trained, atol=1e-5, rtol=1e-5)


def test_our_loaders_apply_lora_alpha(tmp_path, tiny_sd):
    """`sample --lora` (fused), `--npo-lora` (adapter) and eval's LoRA reproduce the trained network."""
    from diffusion_po.eval.generate import GenerateConfig, load_generation_pipeline
    from diffusion_po.families import load_pipeline
    from diffusion_po.sampling.negative import load_npo_lora, load_positive_lora, mixed_adapter_batch

    fam = _family(tiny_sd)
    inputs = _inputs(fam)
    net = _trained_lora(fam)
    trained = _out(fam, net, inputs)
    fam.save_lora(tmp_path / "lora", net)

    fused = load_pipeline(tiny_sd)
    load_positive_lora(fused, tmp_path / "lora")
    torch.testing.assert_close(_out(fam, fused.unet, inputs), trained, atol=1e-5, rtol=1e-5)

    npo = load_pipeline(tiny_sd)
    load_npo_lora(npo, tmp_path / "lora", adapter_name="npo")
    with mixed_adapter_batch(npo.unet, ["npo", "npo"]):
        torch.testing.assert_close(_out(fam, npo.unet, inputs), trained, atol=1e-5, rtol=1e-5)

    evaluated = load_generation_pipeline(GenerateConfig(model=tiny_sd, prompts="x", lora=str(tmp_path / "lora")), "cpu")
    torch.testing.assert_close(_out(fam, evaluated.unet, inputs), trained, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("saved", "target"), [("sd", "sd3"), ("sd3", "sd"), ("sd", "sdxl")])
def test_lora_of_another_family_is_refused(tmp_path, tiny_model_factory, saved, target):
    from diffusion_po.families import load_pipeline
    from diffusion_po.sampling.negative import load_npo_lora, load_positive_lora

    fam = _family(tiny_model_factory(saved))
    fam.save_lora(tmp_path / "lora", _trained_lora(fam))
    pipe = load_pipeline(tiny_model_factory(target))
    for load in (load_positive_lora, load_npo_lora):
        with pytest.raises(ModelLoadError, match=f"saved for the {saved} family, but the model is {target}"):
            load(pipe, tmp_path / "lora")


def test_lora_without_family_name_is_checked_by_its_keys(tmp_path, tiny_model_factory):
    """A LoRA written by stock diffusers (no family in its header): unet.* keys do not fit an SD3 transformer."""
    from diffusion_po.families import load_pipeline
    from diffusion_po.families.base import check_lora_family
    from tests.test_sampling import _save_lora

    folder = _save_lora(load_pipeline(tiny_model_factory("sd")), tmp_path / "stock", seed=0)
    check_lora_family(load_pipeline(tiny_model_factory("sdxl")), folder)  # unet keys: left to diffusers
    with pytest.raises(ModelLoadError, match="saved for the sd/sdxl family, but the model is sd3"):
        check_lora_family(load_pipeline(tiny_model_factory("sd3")), folder)


# ------------------------------------------------------------------------------------------ seeds
def _run(tmp_path, model: str, name: str, **keys) -> dict[str, torch.Tensor]:
    """Trainable weights after construction and one optimizer step on a fixed batch."""
    from accelerate.state import AcceleratorState

    from diffusion_po.config import TrainConfig, from_dict
    from diffusion_po.training.trainer import Trainer
    from tests.test_fast import _batch

    AcceleratorState._reset_state()
    torch.manual_seed(abs(hash(name)) % 1000)  # a different global generator state each run
    cfg = from_dict(TrainConfig, {
        "pretrained_model_name_or_path": model, "output_dir": str(tmp_path / name), "resolution": 32,
        "train_batch_size": 2, "learning_rate": 1e-3, "report_to": "none", "seed": 5,
        "data": {"format": "pickapic"}, **keys,
    })
    trainer = Trainer(cfg)
    net = trainer.unwrapped
    initial = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    loss, _ = trainer.method.compute_loss(trainer.context, _batch())
    trainer.accelerator.backward(loss)
    trainer.optimizer.step()
    after = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    AcceleratorState._reset_state()
    return {**{f"init/{k}": v for k, v in initial.items()}, **{f"step/{k}": v for k, v in after.items()}}


@pytest.mark.parametrize("use_lora", [True, False])
def test_same_seed_same_weights(tmp_path, tiny_sd, use_lora):
    a = _run(tmp_path, tiny_sd, "a", use_lora=use_lora, rank=4, lora_alpha=8)
    b = _run(tmp_path, tiny_sd, "b", use_lora=use_lora, rank=4, lora_alpha=8)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_eval_sampler_path_keeps_the_lora_with_a_network(tmp_path, tiny_sd):
    """`eval generate --guidance ... --network DIR --lora L`: the network is swapped in first, the LoRA on top."""
    from diffusion_po.eval.generate import GenerateConfig, load_sampler_pipeline

    fam = _family(tiny_sd)
    inputs = _inputs(fam)
    net = _trained_lora(fam)
    trained = _out(fam, net, inputs)
    fam.save_lora(tmp_path / "lora", net)
    cfg = GenerateConfig(model=tiny_sd, prompts="x", lora=str(tmp_path / "lora"), network=tiny_sd, guidance="cfg")
    pipe, _ = load_sampler_pipeline(cfg, "cpu")
    torch.testing.assert_close(_out(fam, pipe.unet, inputs), trained, atol=1e-5, rtol=1e-5)


def test_npo_merge_refuses_a_lora_of_another_family(tmp_path, tiny_model_factory, capsys):
    from diffusion_po.cli import main

    fam = _family(tiny_model_factory("sd"))
    fam.save_lora(tmp_path / "npo", _trained_lora(fam))
    assert main(["npo", "merge", "--base", tiny_model_factory("sd3"), "--npo", str(tmp_path / "npo"),
                 "-o", str(tmp_path / "out")]) == 2
    assert "saved for the sd family, but the model is sd3" in capsys.readouterr().err

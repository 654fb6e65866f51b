"""FLUX.1 (dev, schnell) and SD3.5 (with T5) on tiny models: training steps, LoRA round trips through stock
diffusers, sampling equal to the stock pipelines, the guidance methods, and the FLUX-dev true-CFG error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffusion_po.cli import main
from diffusion_po.config import load_train_config
from diffusion_po.errors import UserError
from diffusion_po.families import load_family
from tests.helpers import write_pickapic
from tests.test_train import make_config, read_metrics

DIT_FAMILIES = ["flux", "flux-schnell", "sd35"]
#: with Z-Image (issue 11 item 8: a family with a decoder-LLM text encoder, in one file)
ALL_FAMILIES = DIT_FAMILIES + ["zimage"]
STOCK_CLASS = {"flux": "FluxPipeline", "sd35": "StableDiffusion3Pipeline", "zimage": "ZImagePipeline"}


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory) -> Path:
    return write_pickapic(tmp_path_factory.mktemp("data") / "train.parquet", n=8)


def test_tiny_models_have_the_published_architecture(tiny_model_factory):
    """The parts that make FLUX.1 and SD3.5 what they are, as loaded from the saved folders."""
    from transformers import T5EncoderModel, T5TokenizerFast

    dev, schnell, sd35 = (load_family(tiny_model_factory(f)) for f in DIT_FAMILIES)
    assert (dev.name, schnell.name, sd35.name) == ("flux", "flux", "sd3")
    assert dev.pipe.transformer.config.guidance_embeds and dev.guidance_distilled
    assert not schnell.pipe.transformer.config.guidance_embeds and not schnell.guidance_distilled
    assert dev.pipe.scheduler.config.use_dynamic_shifting and not schnell.pipe.scheduler.config.use_dynamic_shifting
    assert dev.latent_channels == 16 and dev.vae.config.shift_factor == pytest.approx(0.1159)
    assert sd35.pipe.transformer.config.dual_attention_layers == [0] or \
        tuple(sd35.pipe.transformer.config.dual_attention_layers) == (0,)
    assert sd35.pipe.transformer.config.qk_norm == "rms_norm"
    for pipe, tok, enc in ((dev.pipe, "tokenizer_2", "text_encoder_2"), (sd35.pipe, "tokenizer_3", "text_encoder_3")):
        assert isinstance(getattr(pipe, tok), T5TokenizerFast) and isinstance(getattr(pipe, enc), T5EncoderModel)
        ids = getattr(pipe, tok)("a red circle").input_ids
        assert ids[-1] == getattr(pipe, tok).eos_token_id and getattr(pipe, tok).unk_token_id not in ids


def test_tiny_zimage_has_a_decoder_llm_text_encoder(tiny_model_factory):
    """Z-Image style: Qwen3 (a decoder LLM) with a real byte-level BPE Qwen2 tokenizer and a chat template."""
    from transformers import Qwen2Tokenizer, Qwen3Model

    fam = load_family(tiny_model_factory("zimage"))
    assert fam.name == "zimage" and isinstance(fam.pipe.text_encoder, Qwen3Model)
    tok = fam.pipe.tokenizer
    assert isinstance(tok, Qwen2Tokenizer)
    text = tok.apply_chat_template([{"role": "user", "content": "a red circle"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|im_start|>user") and "\u0120red" in tok.convert_ids_to_tokens(tok(text).input_ids)
    cond = fam.encode_prompts(["a red circle", "a cat"])
    assert cond["prompt_embeds"].shape[:2] == cond["prompt_mask"].shape == (2, 512)
    lengths = cond["prompt_mask"].sum(1)
    assert lengths[0] > lengths[1] > 0  # one row per prompt, its own length (the padding is masked)


@pytest.mark.parametrize("family", ["flux", "sd35", "zimage"])
@pytest.mark.parametrize("lora", [True, False])
def test_one_dpo_step(tmp_path, tiny_model_factory, pickapic, family, lora):
    """One LoRA and one full Diffusion-DPO step: at step 1 the policy is the reference, so the loss is log 2
    (exactly with LoRA: the reference is the same network with the adapter switched off)."""
    cfg = make_config(tmp_path, tiny_model_factory(family), pickapic, use_lora=lora, max_train_steps=1, beta_dpo=50.0)
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "out"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1]
    if lora:
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert (out / "pytorch_lora_weights.safetensors").is_file()
    else:
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert (out / "transformer" / "config.json").is_file()


def _network_inputs(family, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f = family.vae_scale_factor
    x = torch.randn(2, family.latent_channels, 32 // f, 32 // f, generator=g)
    t = torch.tensor([250.0, 800.0])
    cond = family.encode_prompts(["a red circle", "a blue square"])
    return x, t, cond


@pytest.mark.parametrize("family", ["flux", "sd35", "zimage"])
def test_saved_lora_loads_in_the_stock_pipeline(tmp_path, tiny_model_factory, pickapic, family):
    """The trained LoRA, loaded with stock `FluxPipeline`/`StableDiffusion3Pipeline.load_lora_weights`,
    gives the trained network's outputs."""
    from diffusers import DiffusionPipeline

    from diffusion_po.training.trainer import Trainer

    model = tiny_model_factory(family)
    cfg = make_config(tmp_path, model, pickapic, use_lora=True, max_train_steps=2, learning_rate=1e-2)
    trainer = Trainer(load_train_config(cfg))
    trainer.run()
    x, t, cond = _network_inputs(trainer.family)
    with torch.no_grad():
        trained = trainer.family.predict(trainer.unwrapped, x, t, cond)
    pipe = DiffusionPipeline.from_pretrained(model)
    assert type(pipe).__name__ == STOCK_CLASS[family]
    stock = load_family(model)
    with torch.no_grad():
        before = stock.predict(pipe.transformer, x, t, cond)
    pipe.load_lora_weights(str(tmp_path / "out"))
    with torch.no_grad():
        after = stock.predict(pipe.transformer, x, t, cond)
    assert (before - trained).abs().max() > 1e-4  # training changed the network
    torch.testing.assert_close(after, trained, rtol=1e-4, atol=1e-5)


def test_flux_training_step_is_the_diffusers_example(tiny_model_factory):
    """x_t, target and the forward are those of diffusers' train_dreambooth_lora_flux.py: packed latents,
    timestep / 1000, guidance 3.5 for dev, zero txt_ids, (row, col) img_ids; schnell gets no guidance."""
    from diffusers import FluxPipeline

    for name in ("flux", "flux-schnell"):
        fam = load_family(tiny_model_factory(name))
        x0, t, cond = _network_inputs(fam)
        noise = torch.randn_like(x0)
        x_t = fam.noisy_latents(x0, noise, t)
        sigma = (t / 1000).view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * noise)
        torch.testing.assert_close(fam.training_target(x0, noise, t), noise - x0)
        b, c, h, w = x_t.shape
        packed = FluxPipeline._pack_latents(x_t, b, c, h, w)
        guidance = torch.tensor([3.5]).expand(b) if name == "flux" else None
        assert ("guidance" in cond) == (name == "flux")
        with torch.no_grad():
            expected = fam.network(
                hidden_states=packed, timestep=t / 1000, guidance=guidance,
                pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["prompt_embeds"],
                txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
                img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
                return_dict=False,
            )[0]
            got = fam.predict(fam.network, x_t, t, cond)
        assert got.shape == x_t.shape
        torch.testing.assert_close(got, FluxPipeline._unpack_latents(expected, 32, 32, fam.vae_scale_factor),
                                   rtol=0, atol=0)
        ts = fam.sample_timesteps(4096, torch.Generator().manual_seed(0))
        grid = set(fam.noise_scheduler.timesteps.tolist())
        assert set(ts.tolist()) <= grid and 300 < ts.mean() < 700  # uniform density on the scheduler's grid


def test_one_sequence_length_for_training_and_sampling(tiny_model_factory):
    """One T5 length for training and sampling, configurable: FluxPipeline's 512 tokens by default; SD3.5
    (T5 present) StableDiffusion3Pipeline's 256 after CLIP's 77."""
    from diffusion_po.families import family_for_pipeline

    for name, default, clip in (("flux", 512, 0), ("sd35", 256, 77)):
        fam = load_family(tiny_model_factory(name))
        assert fam.max_sequence_length == default
        assert fam.encode_prompts(["a cat"])["prompt_embeds"].shape[1] == clip + default
        assert fam.unconditional(2)["prompt_embeds"].shape[1] == clip + default
        short = family_for_pipeline(fam.pipe, max_sequence_length=64)
        assert short.encode_prompts(["a cat"])["prompt_embeds"].shape[1] == clip + 64
        assert short.unconditional(1)["prompt_embeds"].shape[1] == clip + 64
        if name == "sd35":  # the T5 part is not padding: SD3.5 feeds its T5 encoder's output
            assert fam.encode_prompts(["a cat"])["prompt_embeds"][:, clip:].abs().sum() > 0


def test_flux_dev_check_guidance_says_what_to_set(tiny_model_factory):
    dev = load_family(tiny_model_factory("flux"))
    schnell = load_family(tiny_model_factory("flux-schnell"))
    with pytest.raises(UserError, match="true_cfg=True"):
        dev.check_guidance(2, true_cfg=False)
    dev.check_guidance(1, true_cfg=False)  # no CFG: the embedded guidance alone, as FluxPipeline's default
    dev.check_guidance(2, true_cfg=True)
    schnell.check_guidance(2, true_cfg=False)


@pytest.mark.parametrize("name", ["flux_dpo_lora.yaml", "sd35_dpo_lora.yaml"])
def test_shipped_dit_configs_validate(name):
    cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert cfg.method == "dpo" and cfg.use_lora


# ---------------------------------------------------------------------------------------------- sampling
STEPS = 3


@pytest.fixture(scope="module")
def dit_pipes(tiny_model_factory):
    from diffusion_po.families import load_pipeline

    return {name: load_pipeline(tiny_model_factory(name)) for name in ALL_FAMILIES}


def _stock(pipe, name: str, prompt: str, negative: str | None, scale: float, seed: int, **kw):
    """The stock pipeline's own CFG: FLUX's true CFG (negative "" when none is given, as our uncond), SD3's CFG,
    Z-Image's `pos + w (pos - neg)` (w = scale - 1)."""
    g = torch.Generator().manual_seed(seed)
    if name.startswith("flux"):
        return pipe(prompt, negative_prompt=negative or "", true_cfg_scale=scale, generator=g, **kw).images
    if name == "zimage":
        return pipe(prompt, negative_prompt=negative, guidance_scale=scale - 1, generator=g, **kw).images
    return pipe(prompt, negative_prompt=negative, guidance_scale=scale, generator=g, **kw).images


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_cfg_sampling_equals_the_stock_pipeline(dit_pipes, name):
    """CFG (true CFG on FLUX) with and without a negative prompt == the stock pipeline on the same seed."""
    from diffusion_po.guidance import CFG
    from diffusion_po.sampling import GuidedSampler

    pipe = dit_pipes[name]
    kw = {"num_inference_steps": STEPS, "height": 32, "width": 32}
    sampler = GuidedSampler(pipe, CFG(4.0), true_cfg=True)
    for neg in (None, "blurry"):
        ours = sampler("a red circle", negative_prompt=neg, seeds=[3], output_type="np", **kw)
        stock = _stock(pipe, name, "a red circle", neg, 4.0, 3, output_type="np", **kw)
        diff = float(abs(ours - stock).max())
        print(f"{name} cfg negative={neg!r}: max abs diff vs stock {diff:.3g}")
        assert diff <= 1e-5
    if name.startswith("flux"):  # no CFG: the stock default (embedded guidance alone on dev)
        ours = GuidedSampler(pipe)("a red circle", seeds=[5], output_type="np", **kw)
        stock = pipe("a red circle", generator=torch.Generator().manual_seed(5), output_type="np", **kw).images
        print(f"{name} no cfg: max abs diff vs stock {float(abs(ours - stock).max()):.3g}")
        assert float(abs(ours - stock).max()) <= 1e-5


def test_flux_dev_plain_cfg_without_true_cfg_says_what_to_set(dit_pipes):
    from diffusion_po.guidance import CFG, PerpNeg
    from diffusion_po.sampling import GuidedSampler

    kw = {"num_inference_steps": 1, "height": 32, "width": 32, "output_type": "latent"}
    for guidance in (CFG(4.0), PerpNeg(4.0)):
        with pytest.raises(UserError, match="true_cfg=True"):
            GuidedSampler(dit_pipes["flux"], guidance)("a cat", negative_prompt="dog", **kw)
    GuidedSampler(dit_pipes["flux-schnell"], CFG(4.0))("a cat", **kw)  # schnell: CFG is true CFG anyway


def test_flux_sampling_cli_true_cfg(tmp_path, tiny_model_factory, capsys):
    """`diffusion-po sample` on FLUX-dev: a clear one-line error without --true-cfg, images with it."""
    model = tiny_model_factory("flux")
    base = ["sample", "--model", model, "--prompt", "a red circle", "--steps", "1", "--resolution", "32",
            "--guidance-scale", "3", "--no-progress", "-o"]
    assert main(base + [str(tmp_path / "a")]) != 0
    assert "--true-cfg" in capsys.readouterr().err
    assert main(base + [str(tmp_path / "b"), "--true-cfg", "--embedded-guidance", "2.5"]) == 0
    assert len(list((tmp_path / "b").glob("*.png"))) == 1


@pytest.mark.parametrize("name", ["flux", "sd35", "zimage"])
def test_perp_neg_and_npo_guidance_run(dit_pipes, name):
    """Perp-Neg with weighted negatives and NPO (a negative network) run on both families; NPO whose negative
    model is the positive model is plain CFG."""
    import copy

    from diffusion_po.guidance import CFG, NPO, PerpNeg
    from diffusion_po.sampling import GuidedSampler, NegativeModel

    pipe = dit_pipes[name]
    kw = {"seeds": [1, 2], "num_inference_steps": STEPS, "height": 32, "width": 32, "output_type": "latent"}
    perp = GuidedSampler(pipe, PerpNeg(4.0), true_cfg=True)(["a cat", "a dog"], negative_prompt=[("blurry", 1.5)], **kw)
    plain = GuidedSampler(pipe, CFG(4.0), true_cfg=True)(["a cat", "a dog"], **kw)
    assert perp.shape == plain.shape and torch.isfinite(perp).all()
    assert not torch.allclose(perp, plain, atol=1e-4)
    same = NegativeModel(network=copy.deepcopy(pipe.transformer).eval())
    npo = GuidedSampler(pipe, NPO(4.0), negative_model=same, true_cfg=True)(["a cat", "a dog"], **kw)
    torch.testing.assert_close(npo, plain, atol=1e-4, rtol=1e-4)
    other = copy.deepcopy(pipe.transformer).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    npo_other = GuidedSampler(pipe, NPO(4.0), negative_model=NegativeModel(network=other), true_cfg=True)(
        ["a cat", "a dog"], **kw)
    assert torch.isfinite(npo_other).all() and not torch.allclose(npo_other, plain, atol=1e-4)


def _same(a, b) -> bool:
    """Exact equality of tensors and (nested) lists of tensors."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_training_conditioning_is_what_the_sampler_feeds_the_network(dit_pipes, name):
    """The network inputs the trainer's conditioning produces for a prompt (and for the unconditional branch)
    are exactly those GuidedSampler feeds the transformer (captured with a forward pre-hook)."""
    from diffusion_po.families import cat_cond, family_for_pipeline
    from diffusion_po.guidance import CFG
    from diffusion_po.sampling import GuidedSampler

    pipe = dit_pipes[name]
    fam = family_for_pipeline(pipe)
    seen: list[tuple] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args, {k: v for k, v in kwargs.items() if v is not None})),
        with_kwargs=True)
    try:
        latents = GuidedSampler(pipe, CFG(4.0), true_cfg=True)(
            "a red circle", seeds=[0], num_inference_steps=1, height=32, width=32, output_type="latent")
        sampled_args, sampled = seen.pop()
        t = pipe.scheduler.timesteps[0]  # the step the sampler ran
        # the trainer's conditioning (TrainContext.encode_prompts -> family.encode_prompts), branch order of CFG
        cond = cat_cond([fam.unconditional(1, resolution=32), fam.encode_prompts(["a red circle"], resolution=32)])
        fam.predict(pipe.transformer, torch.zeros(2, *latents.shape[1:]), t, cond)
        trained_args, trained = seen.pop()
    finally:
        hook.remove()
    # everything but the noisy latents (args[0] / hidden_states): text, pooled, guidance, ids, timestep
    assert _same(sampled_args[1:], trained_args[1:]) and sampled.keys() == trained.keys()
    for key in sorted(set(sampled) - {"hidden_states"}):
        assert _same(sampled[key], trained[key]), key
    if name != "zimage":
        keys = {"encoder_hidden_states", "pooled_projections", "timestep"} | ({"guidance"} if name == "flux" else set())
        assert keys <= set(sampled)
    else:
        assert len(sampled_args) == 3 and len(sampled_args[2]) == 2  # frames, timestep, one caption per row


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_training_from_the_data_cache_matches_the_files(tmp_path, tiny_model_factory, family):
    """The encoded-data cache stores the new families' conditioning (FLUX's guidance, Z-Image's prompt mask)
    so that training from it gives the losses of training from the files."""
    from tests.test_cache import _assert_same_run, _config, _metrics

    data = write_pickapic(tmp_path / "train.parquet", n=6)
    model = tiny_model_factory(family)
    files = _config(tmp_path, model, data, "files", max_train_steps=2)
    assert main(["train", str(files)]) == 0
    assert main(["data", "cache", str(files), "--dtype", "fp32"]) == 0
    cached = _config(tmp_path, model, data, "cached", data={"format": "cache"}, max_train_steps=2)
    assert main(["train", str(cached)]) == 0
    a, b = _metrics(tmp_path / "files"), _metrics(tmp_path / "cached")
    _assert_same_run(a, b)
    assert abs(a[-1]["loss"] - a[0]["loss"]) > 1e-6

"""Perp-Neg and NPO as diffusers guiders: a stock modular SDXL pipeline with our guider gives the images of
`GuidedSampler` with the same guidance and seed."""

from __future__ import annotations

import pytest
import torch

from diffusion_po.guidance import CFG, NPO, PerpNeg
from diffusion_po.sampling import GuidedSampler, load_negative_network, load_npo_lora
from diffusion_po.sampling.guiders import NPOGuidance, PerpNegGuidance

STEPS = 3
PROMPT, NEGATIVE = "a red circle and a blue square", "red"
TOL = 1e-4  # separate vs. batched forwards and float order only


@pytest.fixture(scope="module")
def sdxl(tiny_model_factory):
    from diffusers import StableDiffusionXLPipeline

    torch.set_num_threads(1)
    path = tiny_model_factory("sdxl")
    return path, StableDiffusionXLPipeline.from_pretrained(path)


def _modular(path, unet=None):
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    pipe = StableDiffusionXLAutoBlocks().init_pipeline(path)
    pipe.load_components(torch_dtype=torch.float32)
    if unet is not None:
        pipe.update_components(unet=unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_modular(pipe, guider, seed, negative_prompt=NEGATIVE):
    pipe.update_components(guider=guider)
    return pipe(prompt=PROMPT, negative_prompt=negative_prompt, num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(seed), output="images", output_type="pt")


def _run_ours(stock, guidance, seed, negative=None, negative_prompt=NEGATIVE):
    return GuidedSampler(stock, guidance, negative, batch_branches=False)(
        [PROMPT], negative_prompt=negative_prompt, seeds=[seed], num_inference_steps=STEPS, output_type="pt")


@pytest.mark.parametrize("weight", [1.0, 1.5])
def test_perp_neg_guider_in_a_stock_modular_pipeline_matches_our_sampler(sdxl, weight):
    path, stock = sdxl
    modular = _modular(path)
    for seed in (0, 1):
        theirs = _run_modular(modular, PerpNegGuidance(guidance_scale=7.5, negative_weight=weight), seed)
        ours = _run_ours(stock, PerpNeg(7.5), seed, negative_prompt=[(NEGATIVE, weight)])
        diff = (theirs - ours).abs().max().item()
        print(f"perp-neg w={weight} seed {seed}: max |modular - GuidedSampler| = {diff:.2e}")
        assert diff < TOL
    # and the guider is not plain CFG with the negative prompt: the images differ from that
    from diffusers.guiders import ClassifierFreeGuidance

    cfg = _run_modular(modular, ClassifierFreeGuidance(guidance_scale=7.5), 0)
    assert (cfg - _run_modular(modular, PerpNegGuidance(guidance_scale=7.5, negative_weight=weight), 0)).abs().max() > 1e-2


def test_perp_neg_guider_with_a_given_empty_prompt(sdxl):
    """Models that encode "" for real: the encoded empty prompt is given to the guider."""
    path, stock = sdxl
    modular = _modular(path)
    guider = PerpNegGuidance(guidance_scale=5.0, negative_weight=1.0)
    embeds, _, pooled, _ = stock.encode_prompt("", do_classifier_free_guidance=False)
    guider.set_empty_prompt_inputs(prompt_embeds=embeds, text_embeds=pooled)
    theirs = _run_modular(modular, guider, 0)
    stock.register_to_config(force_zeros_for_empty_prompt=False)  # our sampler then encodes "" too
    try:
        ours = _run_ours(stock, PerpNeg(5.0), 0, negative_prompt=[(NEGATIVE, 1.0)])
    finally:
        stock.register_to_config(force_zeros_for_empty_prompt=True)
    diff = (theirs - ours).abs().max().item()
    print(f"perp-neg, encoded empty prompt: max diff {diff:.2e}")
    assert diff < TOL


def _save_lora(stock, folder, seed):
    import copy

    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(stock.unet)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False), adapter_name="default")
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.mul_(0.1)
    state = get_peft_model_state_dict(unet, adapter_name="default")
    type(stock).save_lora_weights(str(folder), unet_lora_layers=convert_state_dict_to_diffusers(state))
    return folder


def test_npo_guider_with_an_npo_lora_matches_our_sampler(sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.guiders import ClassifierFreeGuidance

    path, _ = sdxl
    stock = StableDiffusionXLPipeline.from_pretrained(path)  # its own copy: the adapter stays on it
    negative = load_npo_lora(stock, _save_lora(stock, tmp_path / "npo", seed=3))
    modular = _modular(path, unet=stock.unet)  # theta^+ with the inactive NPO adapter, shared
    theirs = _run_modular(modular, NPOGuidance(guidance_scale=7.5, negative_model=negative), 0, negative_prompt=None)
    ours = _run_ours(stock, NPO(7.5), 0, negative, negative_prompt=None)
    diff = (theirs - ours).abs().max().item()
    print(f"npo (LoRA adapter): max |modular - GuidedSampler| = {diff:.2e}")
    assert diff < TOL
    plain = _run_modular(modular, ClassifierFreeGuidance(guidance_scale=7.5), 0, negative_prompt=None)
    assert (plain - theirs).abs().max() > 1e-3  # the adapter did act on the unconditional branch
    # after sampling the adapter is inactive again: plain forwards are theta^+
    assert (plain - _run_ours(stock, CFG(7.5), 0, negative_prompt=None)).abs().max() < TOL


def test_npo_guider_with_a_separate_negative_network(sdxl, tmp_path):
    from diffusion_po.tiny import save_tiny_pipeline

    path, stock = sdxl
    other = save_tiny_pipeline("sdxl", tmp_path / "negative", seed=7)
    negative = load_negative_network(stock, other)
    modular = _modular(path)
    theirs = _run_modular(modular, NPOGuidance(guidance_scale=5.0, negative_model=negative), 1, negative_prompt=None)
    ours = _run_ours(stock, NPO(5.0), 1, negative, negative_prompt=None)
    diff = (theirs - ours).abs().max().item()
    print(f"npo (separate network): max diff {diff:.2e}")
    assert diff < TOL


def test_guider_config_and_errors():
    guider = PerpNegGuidance(guidance_scale=4.0, negative_weight=1.5)
    copy = guider.new(guidance_scale=6.0)
    assert (copy.guidance_scale, copy.negative_weight) == (6.0, 1.5)
    assert "empty_prompt_inputs" not in guider.config
    with pytest.raises(ValueError, match="negative_weight"):
        PerpNegGuidance(negative_weight=-1.0)
    with pytest.raises(ValueError, match="negative_model"):
        NPOGuidance(guidance_scale=5.0)
    assert PerpNegGuidance(guidance_scale=1.0).num_conditions == 1  # scale 1: the prompt alone, as CFG


def test_perp_neg_guider_from_block_state_inputs():
    """The block-state entry point (used by other modular pipelines): cond, negative and a zero empty prompt."""
    from diffusers.modular_pipelines.modular_pipeline import BlockState

    cond, neg = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    state = BlockState(prompt_embeds=cond, negative_prompt_embeds=neg, timestep=torch.tensor(5))
    fields = {"encoder_hidden_states": ("prompt_embeds", "negative_prompt_embeds"), "timestep": "timestep"}
    batches = PerpNegGuidance(guidance_scale=5.0).prepare_inputs_from_block_state(state, fields)
    by_name = {b.__guidance_identifier__: b for b in batches}
    assert set(by_name) == {"pred_cond", "pred_neg", "pred_uncond"}
    assert torch.equal(by_name["pred_cond"].encoder_hidden_states, cond)
    assert torch.equal(by_name["pred_neg"].encoder_hidden_states, neg)
    assert torch.equal(by_name["pred_uncond"].encoder_hidden_states, torch.zeros_like(cond))
    assert torch.equal(by_name["pred_uncond"].timestep, torch.tensor(5))

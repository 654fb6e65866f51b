"""The guided sampler against stock diffusers pipelines, batching, mixed-adapter batches and NPO."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from diffusion_po.families import family_for_pipeline
from diffusion_po.guidance import CFG, NPO, Branch, Composable, PerpNeg
from diffusion_po.sampling import (
    GuidedSampler,
    NegativeModel,
    PromptSpec,
    generate,
    load_sampling_pipeline,
    mixed_adapter_batch,
)
from diffusion_po.sampling.negative import adapter_on_rows, deactivate_adapter

STEPS = 3
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def pipes(tiny_model_factory):
    from diffusion_po.families import load_pipeline

    torch.set_num_threads(1)
    return {fam: load_pipeline(tiny_model_factory(fam)) for fam in ("sd", "sdxl", "sd3")}


def _network(pipe):
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def _with_random_lora(pipe, name="npo", seed=0, zero=False):
    """A copy of `pipe` whose network carries an inactive LoRA adapter `name` (random B unless zero)."""
    from peft import LoraConfig

    pipe = copy.deepcopy(pipe)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=True if zero else False)
    net = _network(pipe)
    net.add_adapter(cfg, adapter_name=name)
    if not zero:  # peft's random init is large; keep the delta moderate
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.data.mul_(0.1)
    net.eval()
    deactivate_adapter(net, name)
    return pipe


def _set_active(net, names):
    from peft.tuners.lora import LoraLayer

    for m in net.modules():
        if isinstance(m, LoraLayer):
            m.set_adapter(names, inference_mode=True)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_cfg_matches_stock_pipeline(pipes, family):
    pipe = pipes[family]
    for neg in (None, "blurry"):
        ours = GuidedSampler(pipe, CFG(6.0))("a red circle", negative_prompt=neg, seeds=[3], num_inference_steps=STEPS, output_type="np")
        stock = pipe(
            "a red circle", negative_prompt=neg, generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS,
            guidance_scale=6.0, output_type="np",
        ).images
        np.testing.assert_allclose(ours, stock, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_sd_matches_stock_with_other_schedulers_and_rescale(pipes, scheduler):
    """Euler-type schedulers need scale_model_input (the NPO reference pipeline skips it)."""
    import diffusers

    pipe = copy.copy(pipes["sd"])
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    ours = GuidedSampler(pipe, CFG(5.0, rescale=0.7))(["a cat", "a dog"], seeds=[1, 2], num_inference_steps=STEPS, output_type="np")
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    stock = pipe(["a cat", "a dog"], generator=gens, num_inference_steps=STEPS, guidance_scale=5.0,
                 guidance_rescale=0.7, output_type="np").images
    np.testing.assert_allclose(ours, stock, atol=1e-5)


def test_batched_branches_equal_unbatched(pipes):
    pipe = pipes["sd"]
    guidance = PerpNeg(7.5)
    kwargs = {"negative_prompt": [("red", 1.5), ("blue", 0.5)], "positive_prompts": [("a shape", 0.3)],
              "seeds": [0, 1], "num_inference_steps": STEPS, "output_type": "latent"}
    batched = GuidedSampler(pipe, guidance)(["a red circle", "a blue square"], **kwargs)
    single = GuidedSampler(pipe, guidance, batch_branches=False)(["a red circle", "a blue square"], **kwargs)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_image_depends_only_on_seed_not_on_batch(pipes):
    pipe = pipes["sdxl"]
    prompts = ["a red circle", "a blue square", "a green star"]
    together = generate(pipe, prompts, seeds=[5, 6, 7], guidance="cfg", steps=STEPS, batch_size=3, output_type="latent")
    alone = generate(pipe, prompts, seeds=[5, 6, 7], guidance="cfg", steps=STEPS, batch_size=1, output_type="latent")
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    again = generate(pipe, prompts, seeds=[5, 6, 7], guidance="cfg", steps=STEPS, batch_size=3, output_type="latent")
    for a, b in zip(together, again):
        assert torch.equal(a, b)


def test_perp_neg_with_zero_weight_negative_equals_cfg(pipes):
    pipe = pipes["sd"]
    cfg_out = GuidedSampler(pipe, CFG(7.5))("a cat", seeds=[4], num_inference_steps=STEPS, output_type="latent")
    pn = GuidedSampler(pipe, PerpNeg(7.5))("a cat", negative_prompt=[("dog", 0.0)], seeds=[4], num_inference_steps=STEPS, output_type="latent")
    comp = GuidedSampler(pipe, Composable(7.5))("a cat", negative_prompt=[("dog", 0.0)], seeds=[4], num_inference_steps=STEPS, output_type="latent")
    torch.testing.assert_close(pn, cfg_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(comp, cfg_out, atol=1e-4, rtol=1e-4)
    strong = GuidedSampler(pipe, PerpNeg(7.5))("a cat", negative_prompt=[("dog", 3.0)], seeds=[4], num_inference_steps=STEPS, output_type="latent")
    assert not torch.allclose(strong, cfg_out, atol=1e-3)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_npo_equals_cfg_when_negative_model_is_the_positive_one(pipes, family):
    pipe = pipes[family]
    kw = {"seeds": [2, 3], "num_inference_steps": STEPS, "output_type": "latent"}
    plain = GuidedSampler(pipe, CFG(6.0))(["a cat", "a dog"], **kw)
    same = NegativeModel(network=copy.deepcopy(_network(pipe)).eval())
    npo = GuidedSampler(pipe, NPO(6.0), negative_model=same)(["a cat", "a dog"], **kw)
    torch.testing.assert_close(npo, plain, atol=1e-4, rtol=1e-4)
    # an NPO LoRA that is zero (peft's default init) is the positive model too, through mixed-adapter batches
    zero = _with_random_lora(pipe, zero=True)
    npo_lora = GuidedSampler(zero, NPO(6.0), negative_model=NegativeModel(adapter="npo"))(["a cat", "a dog"], **kw)
    torch.testing.assert_close(npo_lora, plain, atol=1e-4, rtol=1e-4)


def test_npo_guidance_requires_a_negative_model(pipes):
    with pytest.raises(ValueError, match="needs a negative model"):
        GuidedSampler(pipes["sd"], NPO(7.5))


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_mixed_adapter_batch_equals_two_separate_forwards(pipes, family):
    pipe = _with_random_lora(pipes[family], seed=1)
    net, fam = _network(pipe), family_for_pipeline(pipe)
    cond = fam.encode_prompts(["a cat", "a dog", "a cow"], resolution=(32, 32))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor(500.0)
    with torch.no_grad():
        base = fam.predict(net, x, t, cond)  # the adapter is loaded but inactive
        _set_active(net, ["npo"])
        lora = fam.predict(net, x, t, cond)
        _set_active(net, [])
        with mixed_adapter_batch(net, ["__base__", "npo", "__base__"]):  # peft's adapter_names
            mixed = fam.predict(net, x, t, cond)
        with adapter_on_rows(net, "npo", 1, 3):  # our contiguous-rows hooks
            rows = fam.predict(net, x, t, cond)
    assert not torch.allclose(base, lora, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(mixed[[0, 2]], base[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], lora[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[0], base[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[1:], lora[1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no adapter named"):
        with mixed_adapter_batch(net, ["typo"] * 3):
            pass
    _set_active(net, ["npo"])
    with pytest.raises(ValueError, match="is active"):
        with adapter_on_rows(net, "npo", 0, 1):
            pass


@pytest.mark.parametrize("mixed", ["rows", "peft"])
@pytest.mark.parametrize("guidance", [NPO(6.0), PerpNeg(6.0)])
def test_npo_lora_one_forward_equals_merged_network(pipes, guidance, mixed):
    """NPO as a LoRA in one mixed-adapter forward == NPO as a separate merged (fused) network."""
    pipe = _with_random_lora(pipes["sd"], seed=2)
    merged = copy.deepcopy(pipe.unet)
    merged.fuse_lora(adapter_names=["npo"])
    merged.unload_lora()
    merged.eval()
    neg = [("blurry", 1.0)] if guidance.name == "perp-neg" else "blurry"
    kw = {"negative_prompt": neg, "seeds": [0, 1], "num_inference_steps": STEPS, "output_type": "latent"}
    one = GuidedSampler(pipe, guidance, NegativeModel(adapter="npo", mixed=mixed))(["a cat", "a dog"], **kw)
    two = GuidedSampler(pipe, guidance, NegativeModel(network=merged))(["a cat", "a dog"], **kw)
    torch.testing.assert_close(one, two, atol=1e-4, rtol=1e-4)
    unbatched = GuidedSampler(pipe, guidance, NegativeModel(adapter="npo", mixed=mixed), batch_branches=False)
    torch.testing.assert_close(unbatched(["a cat", "a dog"], **kw), two, atol=1e-4, rtol=1e-4)
    plain_guidance = CFG(guidance.scale) if guidance.name == "npo" else guidance
    plain = GuidedSampler(pipe, plain_guidance)(["a cat", "a dog"], **kw)
    assert not torch.allclose(one, plain, atol=1e-3)


def test_negative_model_kinds_route_branches(pipes):
    pipe = _with_random_lora(pipes["sd"], seed=3)
    specs = [PromptSpec("a cat", 0, [("dog", 1.0)])]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(400)
    preds = {}
    for kinds in (("uncond", "neg"), ("uncond",)):
        s = GuidedSampler(pipe, PerpNeg(7.5), NegativeModel(adapter="npo", kinds=kinds))
        state = s.prepare(specs, STEPS)
        with torch.no_grad():
            preds[kinds] = s.predict_branches(state, x, t)
    neg0, unc, pos = Branch("neg", 0), Branch("uncond"), Branch("pos", 0)
    torch.testing.assert_close(preds[("uncond",)][unc], preds[("uncond", "neg")][unc])
    torch.testing.assert_close(preds[("uncond",)][pos], preds[("uncond", "neg")][pos])
    assert not torch.allclose(preds[("uncond",)][neg0], preds[("uncond", "neg")][neg0], atol=1e-4)
    # NPO guidance whose only base branch is a negative prompt cannot leave the negative model unused
    s = GuidedSampler(pipe, NPO(7.5), NegativeModel(adapter="npo", kinds=("uncond",)))
    with pytest.raises(ValueError, match="computes none of the branches"):
        s.prepare(specs, STEPS)


def test_generate_keeps_order_with_mixed_structures(pipes):
    pipe = pipes["sd"]
    specs = [PromptSpec("a cat", 0), PromptSpec("a dog", 1, [("red", 1.0)]), PromptSpec("a cow", 2)]
    out = generate(pipe, specs, guidance="composable", scale=5.0, steps=2, batch_size=2, output_type="latent")
    for i, spec in enumerate(specs):
        alone = generate(pipe, [spec], guidance="composable", scale=5.0, steps=2, output_type="latent")[0]
        torch.testing.assert_close(out[i], alone, atol=1e-4, rtol=1e-4)
    images = generate(pipe, ["a cat", "a dog"], seeds=9, steps=2)
    assert [im.size for im in images] == [(32, 32), (32, 32)]


def _save_lora(pipe, folder, seed):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    lora_pipe = _with_random_lora(pipe, name="default", seed=seed)
    net = _network(lora_pipe)
    state = get_peft_model_state_dict(net, adapter_name="default")
    if getattr(pipe, "transformer", None) is not None:
        type(pipe).save_lora_weights(str(folder), transformer_lora_layers=state)
    else:
        type(pipe).save_lora_weights(str(folder), unet_lora_layers=convert_state_dict_to_diffusers(state))
    return folder


def test_loading_positive_and_npo_loras(tiny_model_factory, pipes, tmp_path):
    path = tiny_model_factory("sd")
    pos_dir = _save_lora(pipes["sd"], tmp_path / "pos", seed=4)
    npo_dir = _save_lora(pipes["sd"], tmp_path / "npo", seed=5)
    kw = {"seeds": [0], "num_inference_steps": STEPS, "output_type": "np"}
    # positive LoRA: same images as stock diffusers with the LoRA loaded
    pipe, neg = load_sampling_pipeline(path, lora=str(pos_dir), device="cpu")
    assert neg is None
    ours = GuidedSampler(pipe, CFG(7.5))("a cat", **kw)
    from diffusion_po.families import load_pipeline

    stock_pipe = load_pipeline(path)
    stock_pipe.load_lora_weights(str(pos_dir))
    stock = stock_pipe("a cat", generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_allclose(ours, stock, atol=1e-4)
    # NPO LoRA on top: mixed-adapter form == merged-network form (theta^- = theta^+ + Delta_NPO)
    pipe, neg = load_sampling_pipeline(path, lora=str(pos_dir), npo_lora=str(npo_dir), device="cpu")
    assert neg.adapter == "npo"
    # the NPO adapter stays loaded but inactive: the stock pipeline still computes theta^+
    after = pipe("a cat", generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_allclose(after, stock, atol=1e-4)
    one = GuidedSampler(pipe, NPO(7.5), neg)("a cat", **kw)
    base_pipe = load_pipeline(path)
    _, merged = load_sampling_pipeline(path, lora=str(pos_dir), npo_lora=str(npo_dir), npo_base=path,
                                       npo_merge_weight=0.0, device="cpu")
    assert merged.network is not None
    two = GuidedSampler(pipe, NPO(7.5), merged)("a cat", **kw)
    np.testing.assert_allclose(one, two, atol=1e-4)
    # merge weight 1 removes the positive delta from theta^-: theta^- = theta_base + Delta_NPO
    _, alpha1 = load_sampling_pipeline(path, lora=str(pos_dir), npo_lora=str(npo_dir), npo_base=path,
                                       npo_merge_weight=1.0, device="cpu")
    base_pipe.unet.load_lora_adapter(str(npo_dir), prefix="unet", adapter_name="npo", weight_name="pytorch_lora_weights.safetensors")
    base_pipe.unet.fuse_lora(adapter_names=["npo"])
    base_pipe.unet.unload_lora()
    for (k, v), (k2, v2) in zip(alpha1.network.state_dict().items(), base_pipe.unet.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, v2, atol=1e-5, rtol=1e-5)


def test_step_cost_measures_every_method_and_cleans_up(pipes):
    from diffusion_po.sampling.bench import METHODS, compare, step_cost
    from diffusion_po.sampling.negative import adapter_names_of

    pipe = pipes["sd"]
    for method in METHODS:
        # 3 timed steps on a 2-step schedule: the state is re-prepared when the timesteps run out
        assert step_cost(pipe, method, batch=1, steps=3, warmup=0, num_inference_steps=2) > 0
    assert not adapter_names_of(pipe.unet)  # the temporary benchmark LoRA is removed
    res = compare(pipe, ("perp-neg",), batch=1, rounds=1, steps=1, warmup=0, num_inference_steps=2)
    assert res["cfg"]["x_cfg"] == 1.0 and res["perp-neg"]["ms"] > 0
    with pytest.raises(ValueError, match="unknown method"):
        step_cost(pipe, "nope")

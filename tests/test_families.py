"""One Family for training and sampling: for every family, the conditioning the trainer builds for a
prompt is exactly what the guided sampler feeds the network for that prompt (captured at the network's
forward), the unconditional branch included; SD3's T5 length is one setting for both; a pipeline class
no family knows is a clear error listing the supported families."""

from __future__ import annotations

import inspect

import pytest
import torch

from diffusion_po.config import load_train_config
from diffusion_po.errors import ConfigError, ModelLoadError
from diffusion_po.families import family_class_for, family_for_pipeline, family_names, network_of
from diffusion_po.guidance import CFG
from diffusion_po.sampling import GuidedSampler, generate

torch.set_num_threads(1)

FAMILIES = ("sd", "sdxl", "sd3", "sd35", "flux", "flux-schnell", "zimage")
PROMPT = "a red circle and a blue square"
#: forward inputs that are the state and the time, not the conditioning
NOT_CONDITIONING = {"sample", "hidden_states", "timestep", "return_dict", "x", "t"}  # x, t: Z-Image's names


def make_trainer(tmp_path, model: str, *extra: str):
    from diffusion_po.training.trainer import Trainer

    cfg = load_train_config(None, [
        f"pretrained_model_name_or_path={model}", f"output_dir={tmp_path / 'run'}", "resolution=32",
        "report_to=none", "method=dpo", "train_batch_size=1", *extra,
    ])
    return Trainer(cfg)


class ForwardSpy:
    """Records the conditioning inputs of every forward of a network (a forward pre-hook), by argument name."""

    def __init__(self, network: torch.nn.Module):
        self.signature = inspect.signature(network.forward)
        self.calls: list[dict[str, torch.Tensor]] = []
        self.handle = network.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        bound = self.signature.bind(*args, **kwargs).arguments
        inputs: dict[str, torch.Tensor] = {}
        for name, value in bound.items():
            if name in NOT_CONDITIONING or value is None:
                continue
            if isinstance(value, dict):
                items = value.items()
            elif isinstance(value, (list, tuple)):  # Z-Image's per-row caption list
                items = [(str(i), v) for i, v in enumerate(value)]
            else:
                items = [("", value)]
            for key, v in items:
                if isinstance(v, torch.Tensor):
                    inputs[f"{name}.{key}" if key else name] = v.detach().clone()
        self.calls.append(inputs)

    def remove(self) -> None:
        self.handle.remove()


def assert_same_inputs(trained: dict[str, torch.Tensor], sampled: dict[str, torch.Tensor], what: str) -> None:
    assert trained, "no conditioning captured"
    assert set(trained) == set(sampled), f"{what}: the trainer feeds {sorted(trained)}, the sampler {sorted(sampled)}"
    for key in trained:
        assert trained[key].dtype == sampled[key].dtype, f"{what}: {key} dtype"
        assert torch.equal(trained[key], sampled[key]), f"{what}: {key} differs"


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_conditioning_is_what_the_sampler_feeds_the_network(tmp_path, tiny_model_factory, family):
    trainer = make_trainer(tmp_path, tiny_model_factory(family))
    ctx, fam = trainer.context, trainer.family
    network = fam.network
    # the sampler's latent size (32 px): FLUX's img_ids depend on it
    f = fam.vae_scale_factor
    x = torch.randn(1, fam.latent_channels, 32 // f, 32 // f, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0]) if fam.prediction_type == "flow" else torch.tensor([500])

    spy = ForwardSpy(network)
    try:
        with torch.no_grad():
            ctx.policy_predict(x, t, ctx.encode_prompts([PROMPT]))
            # the unconditional embedding the methods use (DRO's buffer CFG, Self-NPO's teacher)
            ctx.policy_predict(x, t, fam.unconditional(1, resolution=ctx.config.resolution))
        trained_cond, trained_uncond = spy.calls
        spy.calls.clear()
        network.eval()
        # one forward per branch (batch_branches=False), in the guidance's branch order; FLUX's default scale
        # is 1 (no CFG), so it gets 4 as true CFG
        scale = fam.default_guidance_scale if fam.default_guidance_scale > 1 else 4.0
        sampler = GuidedSampler(fam, CFG(scale), batch_branches=False, true_cfg=True)
        state = sampler.prepare(sampler.specs(PROMPT, seeds=0), num_inference_steps=2, height=32, width=32)
        sampler.step(state, state.timesteps[0])
    finally:
        spy.remove()
    sampled = {br.kind: call for br, call in zip(state.branches, spy.calls)}
    assert set(sampled) == {"pos", "uncond"}
    assert_same_inputs(trained_cond, sampled["pos"], f"{family} prompt")
    assert_same_inputs(trained_uncond, sampled["uncond"], f"{family} unconditional")
    text = "cap_feats.0" if family == "zimage" else "encoder_hidden_states"
    assert not torch.equal(trained_cond[text], trained_uncond[text])
    if family == "sdxl":  # the stock SDXL default negative: zeros (force_zeros_for_empty_prompt)
        assert fam.pipe.config.force_zeros_for_empty_prompt
        assert not trained_uncond["encoder_hidden_states"].any()
        assert torch.equal(trained_uncond["added_cond_kwargs.time_ids"], torch.tensor([[32.0, 32, 0, 0, 32, 32]]))
    if family == "flux":  # the guidance embedding of dev checkpoints, the same value in training and sampling
        assert torch.equal(trained_cond["guidance"], torch.tensor([3.5]))
    if family in ("sd3", "sd35"):  # CLIP-L/G tokens (77) followed by the T5 tokens: 256, the stock pipeline's default
        stock_default = inspect.signature(type(fam.pipe).__call__).parameters["max_sequence_length"].default
        assert fam.max_sequence_length == stock_default == 256
        assert trained_cond["encoder_hidden_states"].shape[1] == 77 + 256


def test_sd3_max_sequence_length_is_one_setting_for_training_and_sampling(tmp_path, tiny_model_factory):
    trainer = make_trainer(tmp_path, tiny_model_factory("sd3"), "max_sequence_length=64")
    fam = trainer.family
    assert fam.max_sequence_length == 64
    cond = trainer.context.encode_prompts([PROMPT])
    assert cond["prompt_embeds"].shape[1] == 77 + 64
    sampler = GuidedSampler(fam)
    state = sampler.prepare(sampler.specs(PROMPT), num_inference_steps=2, height=32, width=32)
    assert state.cond["prompt_embeds"].shape[1] == 77 + 64  # cond and uncond rows alike
    spy = ForwardSpy(fam.network)  # generate() keeps the family it is given (and its T5 length)
    try:
        generate(fam, [PROMPT], steps=1, height=32, width=32, output_type="latent")
    finally:
        spy.remove()
    assert spy.calls and all(c["encoder_hidden_states"].shape[1] == 77 + 64 for c in spy.calls)


def test_max_sequence_length_without_a_t5_family_is_an_error(tmp_path, tiny_model_factory):
    with pytest.raises(ConfigError, match="max_sequence_length applies to families with a T5"):
        make_trainer(tmp_path, tiny_model_factory("sd"), "max_sequence_length=64")


def test_unknown_pipeline_class_lists_the_supported_families(tiny_model_factory):
    class KandinskyPipeline:  # a pipeline class no family knows
        pass

    for call in (family_for_pipeline, family_class_for, network_of, GuidedSampler):
        with pytest.raises(ModelLoadError) as err:
            call(KandinskyPipeline())
        msg = str(err.value)
        assert "KandinskyPipeline is not supported" in msg
        for name in family_names():
            assert f"{name} (" in msg
        assert "StableDiffusionXLPipeline" in msg


def test_subclassed_pipelines_resolve_by_their_base_class(tiny_model_factory):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from diffusion_po.families import load_pipeline

    for base, name in ((StableDiffusionXLPipeline, "sdxl"), (StableDiffusion3Pipeline, "sd3")):
        sub = type(f"My{base.__name__}", (base,), {})
        assert family_class_for(sub.__new__(sub)).name == name
    pipe = load_pipeline(tiny_model_factory("sd"))
    fam = family_for_pipeline(pipe)
    assert family_for_pipeline(fam) is fam and network_of(fam) is network_of(pipe) is pipe.unet


def test_dro_buffer_guidance_uses_the_family_unconditional_embedding(tmp_path, tiny_model_factory):
    """DRO's buffer CFG takes the family's unconditional embedding (SDXL: zeros, as the sampler), with
    each image's own time ids."""
    trainer = make_trainer(tmp_path, tiny_model_factory("sdxl"), "method=dro", "data.format=images",
                           "method_options.sampler_steps=2", "method_options.buffer_guidance_scale=3.0")
    ctx, fam, method = trainer.context, trainer.family, trainer.method
    seen, predict = [], fam.predict

    def spy(network, x_t, t, cond, **extra):
        seen.append({k: v.clone() for k, v in cond.items()})
        return predict(network, x_t, t, cond, **extra)

    fam.predict = spy
    sizes = torch.tensor([[40, 32], [64, 48]])
    batch = {"pixels": torch.zeros(2, 3, 32, 32), "captions": ["a red square", "a dog"], "size": 2,
             "original_sizes": sizes, "crop_top_lefts": torch.tensor([[0, 0], [4, 2]])}
    with torch.no_grad():
        method.refresh(ctx)
        method.fill(ctx, batch)
    assert len(seen) == 2  # one CFG forward per solver step
    cond = seen[0]
    assert not cond["prompt_embeds"][2:].any() and not cond["text_embeds"][2:].any()
    assert cond["prompt_embeds"][:2].any()
    assert torch.equal(cond["time_ids"][2:], cond["time_ids"][:2])
    assert cond["time_ids"][:, :2].tolist() == sizes.float().tolist() * 2


def test_family_options_from_the_config_reach_the_family(tmp_path, tiny_model_factory):
    """`family_options:` sets FLUX's embedded guidance and timestep weighting (training and the sampler's prompts)."""
    trainer = make_trainer(tmp_path, tiny_model_factory("flux"), "family_options.guidance_scale=2",
                           "family_options.weighting=logit_normal")
    fam = trainer.family
    assert fam.guidance_scale == 2.0 and fam.weighting == "logit_normal"
    assert torch.equal(trainer.context.encode_prompts([PROMPT])["guidance"], torch.tensor([2.0]))
    sampler = GuidedSampler(fam)
    state = sampler.prepare(sampler.specs(PROMPT), num_inference_steps=1, height=32, width=32)
    assert torch.equal(state.cond["guidance"], torch.tensor([2.0]))


def test_max_sequence_length_under_family_options(tmp_path, tiny_model_factory):
    trainer = make_trainer(tmp_path, tiny_model_factory("sd3"), "family_options.max_sequence_length=64",
                           "family_options.weighting=none")
    assert trainer.family.max_sequence_length == 64 and trainer.family.weighting == "none"
    with pytest.raises(ConfigError, match="'max_sequence_length' is set twice, 32 at the top level and 64"):
        load_train_config(None, ["pretrained_model_name_or_path=x", "max_sequence_length=32",
                                 "family_options.max_sequence_length=64"])


@pytest.mark.parametrize(("family", "option", "message"), [
    ("sd3", "family_options.guidanc_scale=2",
     r"family_options: 'guidanc_scale' is not an option of the 'sd3' family \(StableDiffusion3Pipeline\); "
     r"its options: max_sequence_length, weighting"),
    ("flux", "family_options.guidanc_scale=2", r"'flux' family \(FluxPipeline\); did you mean 'guidance_scale'\?"),
    ("sd", "family_options.weighting=none", r"'weighting' is not an option of the 'sd' family"),
    ("sd3", "family_options.weighting=logit-normal",
     r"family 'sd3': key 'family_options.weighting' is 'logit-normal'; choose one of 'logit_normal', 'none'"),
    ("flux", "family_options.guidance_scale=high",
     r"family 'flux': key 'family_options.guidance_scale' must be a number, got 'high'"),
])
def test_a_bad_family_option_names_the_key_and_the_family(tmp_path, tiny_model_factory, family, option, message):
    with pytest.raises(ConfigError, match=message):
        make_trainer(tmp_path, tiny_model_factory(family), option)


def test_the_cache_fingerprint_holds_the_prompt_options(tiny_model_factory):
    """FLUX-dev's cached prompt conditioning holds the embedded guidance: another value is another cache."""
    from diffusion_po.data.cache import fingerprint
    from diffusion_po.families import load_family

    path = tiny_model_factory("flux")
    fps = {g: fingerprint(load_family(path, options={"guidance_scale": g})) for g in (3.5, 2.0)}
    assert fps[3.5] != fps[2.0]
    assert fingerprint(load_family(path)) == fps[3.5]

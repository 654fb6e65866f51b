"""`diffusion-po export lora --format kohya`: kohya keys with per-module alpha that diffusers' own loader
(`load_lora_weights`) reads back to the same network outputs as the diffusers-format LoRA (tiny SD1.5, SDXL,
FLUX.1), alpha != rank; FLUX.1 single blocks' fused layout checked against diffusers' kohya converter."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from diffusion_po import cli
from diffusion_po.errors import UserError
from diffusion_po.families import family_class_for
from diffusion_po.families.kohya import FLUX1_SINGLE_DIMS, export_lora, to_kohya

DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: the tiny FLUX's double-block linears (its single blocks are narrower than diffusers' kohya loader reads)
FLUX_DOUBLE = [f"transformer_blocks.0.{name}" for name in (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.2")]


def network_output(family: str, net: torch.nn.Module) -> torch.Tensor:
    """One forward of the network on fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    c = net.config
    with torch.no_grad():
        if family == "flux":
            kwargs = {"guidance": torch.tensor([3.5])} if c.guidance_embeds else {}
            return net(hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
                       encoder_hidden_states=torch.randn(1, 5, c.joint_attention_dim, generator=g),
                       pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                       timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3),
                       **kwargs).sample
        kwargs = {}
        if family == "sdxl":
            text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, text, generator=g),
                                           "time_ids": torch.randn(1, 6, generator=g)}
        return net(torch.randn(1, c.in_channels, 8, 8, generator=g), torch.tensor([10]),
                   torch.randn(1, 7, c.cross_attention_dim, generator=g), **kwargs).sample


def trained_lora(tiny_model_factory, family: str, folder, targets, alpha_pattern=None):
    """A tiny pipeline with a random rank-4, alpha-8 LoRA saved as the family's `save_lora` and diffusers'
    training examples save it (weights + adapter metadata); returns (pipe, output with the LoRA, output without)."""
    pipe = DiffusionPipeline.from_pretrained(tiny_model_factory(family))
    fam = family_class_for(pipe)
    net = getattr(pipe, fam.network_name)
    base = network_output(family, net)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets,
                        alpha_pattern=alpha_pattern or {})
    net.add_adapter(config)
    with_lora = network_output(family, net)
    from diffusers.utils import convert_state_dict_to_diffusers

    state = get_peft_model_state_dict(net)  # peft keys for transformers, diffusers keys for UNets, as save_lora
    state = convert_state_dict_to_diffusers(state) if fam.network_name == "unet" else state
    prefix = fam.lora_layers_argument.removesuffix("_layers")
    type(pipe).save_lora_weights(str(folder), **{fam.lora_layers_argument: state},
                                 **{f"{prefix}_adapter_metadata": config.to_dict()}, safe_serialization=True)
    net.delete_adapters("default")
    assert torch.allclose(network_output(family, net), base)
    return pipe, with_lora, base


def loaded_output(pipe, family: str, folder, weight_name: str) -> torch.Tensor:
    pipe.load_lora_weights(str(folder), weight_name=weight_name)
    out = network_output(family, getattr(pipe, family_class_for(pipe).network_name))
    pipe.unload_lora_weights()
    return out


@pytest.mark.parametrize("family,targets", [("sd", DEFAULT_TARGETS), ("sdxl", DEFAULT_TARGETS), ("flux", FLUX_DOUBLE)],
                         ids=["sd", "sdxl", "flux"])
def test_kohya_export_loads_back_to_the_same_outputs(tiny_model_factory, tmp_path, family, targets):
    pipe, with_lora, base = trained_lora(tiny_model_factory, family, tmp_path, targets)
    kohya = tmp_path / "kohya.safetensors"
    argv = ["export", "lora", str(tmp_path), "--format", "kohya", "--out", str(kohya)]
    assert cli.main(argv + (["--family", "flux"] if family == "flux" else [])) == 0

    tensors = load_file(str(kohya))
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith("lora_unet_") for k in tensors)
    for key in downs:  # every module has its alpha, and alpha / rank is the adapter's scale 8 / 4
        alpha = tensors[key.replace(".lora_down.weight", ".alpha")].item()
        assert alpha / tensors[key].shape[0] == pytest.approx(2.0)
    if family == "flux":
        assert any(k.endswith("img_attn_qkv.lora_down.weight") for k in tensors)

    from_diffusers = loaded_output(pipe, family, tmp_path, "pytorch_lora_weights.safetensors")
    from_kohya = loaded_output(pipe, family, tmp_path, kohya.name)
    assert (with_lora - base).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(from_diffusers, with_lora, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_kohya, from_diffusers, rtol=1e-5, atol=1e-5)


def test_kohya_export_keeps_per_module_alpha(tiny_model_factory, tmp_path):
    """alpha_pattern (another alpha on to_k): the kohya file still gives the trained network's output."""
    pipe, with_lora, _ = trained_lora(tiny_model_factory, "sd", tmp_path, DEFAULT_TARGETS, alpha_pattern={"to_k": 2})
    export_lora(tmp_path, tmp_path / "kohya.safetensors", "kohya")
    torch.testing.assert_close(loaded_output(pipe, "sd", tmp_path, "kohya.safetensors"), with_lora,
                               rtol=1e-5, atol=1e-5)


def test_tiny_flux_single_blocks_are_refused(tiny_model_factory, tmp_path):
    trained_lora(tiny_model_factory, "flux", tmp_path, DEFAULT_TARGETS)
    with pytest.raises(UserError, match="3072-wide single blocks"):
        export_lora(tmp_path, tmp_path / "kohya.safetensors", "kohya", family="flux")


def test_transformer_lora_needs_the_family(tiny_model_factory, tmp_path):
    trained_lora(tiny_model_factory, "flux", tmp_path, FLUX_DOUBLE)
    with pytest.raises(UserError, match="--family"):
        export_lora(tmp_path, tmp_path / "kohya.safetensors", "kohya")


def test_flux1_single_block_layout_matches_diffusers_converter():
    """At FLUX.1's widths, q/k/v of a single block stack into `linear1` (no LoRA on the MLP input) and
    diffusers' kohya converter recovers each module's scaled update exactly."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(0)
    width, rank = FLUX1_SINGLE_DIMS[0], 2
    names = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_out"]
    state, updates = {}, {}
    for name in names:
        fan_in = width + FLUX1_SINGLE_DIMS[3] if name == "proj_out" else width
        down, up = torch.randn(rank, fan_in, generator=g), torch.randn(width, rank, generator=g)
        state[f"transformer.single_transformer_blocks.0.{name}.lora.down.weight"] = down
        state[f"transformer.single_transformer_blocks.0.{name}.lora.up.weight"] = up
        updates[name] = up @ down * (8 / rank)  # lora_alpha 8
    header = {"lora_adapter_metadata": '{"transformer.lora_alpha": 8, "transformer.r": 2}'}
    kohya = to_kohya(state, header, family="flux")
    assert set(kohya) == {f"lora_unet_single_blocks_0_{m}.{p}" for m in ("linear1", "linear2")
                          for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    for name in names:
        key = f"transformer.single_transformer_blocks.0.{name}"
        torch.testing.assert_close(back[f"{key}.lora_B.weight"] @ back[f"{key}.lora_A.weight"], updates[name])
    mlp = "transformer.single_transformer_blocks.0.proj_mlp"
    assert not (back[f"{mlp}.lora_B.weight"] @ back[f"{mlp}.lora_A.weight"]).any()

"""Random-initialised pipelines at real size (SD1.5, SDXL, SD3-medium) or tiny size, built in memory.

No weights are needed: a benchmark measures arithmetic and memory, which depend on the architecture
only. The full-size configs are the published architectures (the UNets as in the reference measurement
`anchor_bench.py`); T5 is left out of SD3 (its embeddings are cached in training, and the pipeline runs
without it), so SD3's text conditioning is the two CLIP encoders padded with zeros, as diffusers does.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from diffusion_po.families import network_of

MODELS = ("sd15", "sdxl", "sd3")
SIZES = ("tiny", "full")
FAMILY_OF = {"sd15": "sd", "sdxl": "sdxl", "sd3": "sd3"}
#: training/sampling resolution of each model at each size
RESOLUTION = {("sd15", "full"): 512, ("sdxl", "full"): 1024, ("sd3", "full"): 1024,
              ("sd15", "tiny"): 32, ("sdxl", "tiny"): 32, ("sd3", "tiny"): 32}


def _tokenizer() -> Any:
    from transformers import CLIPTokenizer

    from diffusion_po.tiny import save_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        save_clip_tokenizer(tmp)
        return CLIPTokenizer.from_pretrained(tmp)


def _clip(hidden: int, layers: int, heads: int, intermediate: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                         hidden_act=act, projection_dim=projection or hidden, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def sd_vae(latent_channels: int = 4, **extra: Any):
    """The SD/SDXL/SD3 autoencoder architecture (83M parameters)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, **extra)


def sd15_unet(sample_size: int = 64):
    """SD1.5's UNet (860M parameters), as in the reference measurement."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)


def sdxl_unet(sample_size: int = 128):
    """SDXL's UNet (2.6B parameters), as in the reference measurement."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, use_linear_projection=True)


def sd3_transformer(sample_size: int = 128):
    """SD3-medium's MMDiT (2B parameters)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, pos_embed_max_size=192)


def build_pipeline(model: str, size: str = "full", network_device: str | torch.device = "cpu", seed: int = 0) -> Any:
    """A random-initialised diffusers pipeline of `model` ('sd15', 'sdxl', 'sd3') at `size`.

    Everything is initialised on `network_device` (fast on a GPU); then the VAE and text encoders go to
    the CPU (move them where they are needed: training from a cache needs neither).
    """
    if model not in MODELS:
        raise ValueError(f"unknown model '{model}'; choose one of {', '.join(MODELS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size '{size}'; choose one of {', '.join(SIZES)}")
    torch.manual_seed(seed)
    if size == "tiny":
        from diffusion_po.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(FAMILY_OF[model], seed=seed)
        network_of(pipe).to(network_device)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    with torch.device(network_device):
        pipe = _build_full(model)
    pipe.vae.to("cpu")
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        enc = getattr(pipe, name, None)
        if enc is not None:
            enc.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_full(model: str) -> Any:
    tok = _tokenizer()
    net = {"sd15": sd15_unet, "sdxl": sdxl_unet, "sd3": sd3_transformer}[model]()
    if model == "sd15":
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(
            unet=net, vae=sd_vae(sample_size=512), text_encoder=_clip(768, 12, 12, 3072, "quick_gelu"),
            tokenizer=tok, scheduler=sched, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    elif model == "sdxl":
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(
            unet=net, vae=sd_vae(sample_size=1024, force_upcast=True, scaling_factor=0.13025),
            text_encoder=_clip(768, 12, 12, 3072, "quick_gelu"),
            text_encoder_2=_clip(1280, 32, 20, 5120, "gelu", projection=1280),
            tokenizer=tok, tokenizer_2=tok, scheduler=sched, force_zeros_for_empty_prompt=True)
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(
            transformer=net,
            vae=sd_vae(latent_channels=16, sample_size=1024, shift_factor=0.0609, scaling_factor=1.5305,
                       use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=_clip(768, 12, 12, 3072, "quick_gelu", projection=768),
            text_encoder_2=_clip(1280, 32, 20, 5120, "gelu", projection=1280),
            text_encoder_3=None, tokenizer=tok, tokenizer_2=tok, tokenizer_3=None,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return pipe


__all__ = ["FAMILY_OF", "MODELS", "RESOLUTION", "SIZES", "build_pipeline", "sd15_unet", "sd3_transformer",
           "sd_vae", "sdxl_unet"]

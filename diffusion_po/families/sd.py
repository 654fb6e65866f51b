"""Stable Diffusion 1.x / 2.x (and SDXL, which adds a second text encoder and micro-conditioning).

Noise, target and x0 follow the scheduler's `prediction_type` (epsilon, v_prediction or sample);
nothing forces epsilon.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from diffusion_po.families.base import Conditioning, Family, register_family


class _DDPMFamily(Family):
    """Shared by the UNet families: discrete DDPM training timesteps."""

    def __init__(self, pipe: Any):
        super().__init__(pipe)
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def _alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.noise_scheduler.alphas_cumprod.to(like.device)[t.to(like.device).long()].float()
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)

    def noisy_latents(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._alpha_sigma(t, x0)
        return a * x0.float() + s * noise.float()

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise.float()
        if self.prediction_type == "v_prediction":
            a, s = self._alpha_sigma(t, x0)
            return a * noise.float() - s * x0.float()
        if self.prediction_type == "sample":
            return x0.float()
        raise ValueError(f"unsupported prediction_type '{self.prediction_type}'")

    def x0_from_prediction(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._alpha_sigma(t, x_t)
        pred = prediction.float()
        if self.prediction_type == "epsilon":
            return (x_t.float() - s * pred) / a
        if self.prediction_type == "v_prediction":
            return a * x_t.float() - s * pred
        return pred

    def predict(self, network: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        extra = {}
        if "text_embeds" in cond:
            extra["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        dtype = next(network.parameters()).dtype if not torch.is_autocast_enabled() else x_t.dtype
        return network(x_t.to(dtype), t.to(x_t.device), cond["prompt_embeds"].to(dtype), **extra).sample


@register_family
class StableDiffusionFamily(_DDPMFamily):
    """SD 1.x / 2.x: one CLIP text encoder, last hidden state (or `clip_skip`)."""

    name: ClassVar[str] = "sd"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)

    @torch.no_grad()
    def encode_prompts(self, prompts, original_sizes=None, crop_top_lefts=None, resolution=None) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.text_encoders[0].device, 1, False)
        return {"prompt_embeds": embeds.float()}


@register_family
class StableDiffusionXLFamily(_DDPMFamily):
    """SDXL: penultimate hidden states of both encoders (768+1280), pooled output of the second,
    and `add_time_ids` = (original h, w) + (crop top, left) + (target h, w) from the real image."""

    name: ClassVar[str] = "sdxl"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",)
    row_keys: ClassVar[tuple[str, ...]] = ("time_ids",)
    sdxl_time_ids: str = "image"
    """`image`: each image's original size and crop; `fixed`: [res, res, 0, 0, res, res] for every image
    (what the Diffusion-DPO repository trained its DPO-SDXL with). Set from the config's `sdxl_time_ids`."""

    @torch.no_grad()
    def encode_prompts(self, prompts, original_sizes=None, crop_top_lefts=None, resolution=None) -> Conditioning:
        device = self.text_encoders[0].device
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        cond = {"prompt_embeds": embeds.float(), "text_embeds": pooled.float()}
        return self.row_conditioning(cond, original_sizes, crop_top_lefts, resolution)

    def row_conditioning(self, cond, original_sizes=None, crop_top_lefts=None, resolution=None) -> Conditioning:
        """`time_ids` = (original h, w) + (crop top, left) + (target h, w), per image (or fixed, see
        `sdxl_time_ids`)."""
        device = cond["prompt_embeds"].device
        n = cond["prompt_embeds"].shape[0]
        res = resolution or self.default_resolution
        if self.sdxl_time_ids == "fixed":
            original_sizes = crop_top_lefts = None
        if original_sizes is None:
            original_sizes = torch.tensor([[res, res]] * n)
        if crop_top_lefts is None:
            crop_top_lefts = torch.zeros(n, 2, dtype=torch.long)
        target = torch.tensor([[res, res]] * n)
        time_ids = torch.cat([original_sizes.long().cpu(), crop_top_lefts.long().cpu(), target], dim=1)
        return {**cond, "time_ids": time_ids.float().to(device)}

    @property
    def default_resolution(self) -> int:
        return int(self.network.config.sample_size) * self.vae_scale_factor

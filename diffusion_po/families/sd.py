"""Stable Diffusion 1.x / 2.x (and SDXL, which adds a second text encoder and micro-conditioning).

Noise, target and x0 follow the scheduler's `prediction_type` (epsilon, v_prediction or sample);
nothing forces epsilon.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar

import torch

from diffusion_po.families.base import Conditioning, Family, register_family


class _DDPMFamily(Family):
    """Shared by the UNet families: discrete DDPM training timesteps."""

    def __init__(self, pipe: Any, **options: Any):
        super().__init__(pipe, **options)
        self._alphas_cumprod: dict[torch.device, torch.Tensor] = {}

    @cached_property
    def noise_scheduler(self) -> Any:
        """The DDPM training schedule of the pipeline's scheduler config (built on first use)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=generator.device)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t), sqrt(1 - abar_t) (alphas_cumprod cached on each device it is used on)."""
        device = like.device if like is not None else t.device
        abar_all = self._alphas_cumprod.get(device)
        if abar_all is None:
            abar_all = self._alphas_cumprod[device] = self.noise_scheduler.alphas_cumprod.to(device)
        abar = abar_all[t.detach().to(device).long()].float()
        return self._shaped(abar.sqrt(), (1 - abar).sqrt(), like)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise.float()
        if self.prediction_type == "v_prediction":
            a, s = self.alpha_sigma(t, x0)
            return a * noise.float() - s * x0.float()
        if self.prediction_type == "sample":
            return x0.float()
        raise ValueError(f"unsupported prediction_type '{self.prediction_type}'")

    def x0_from_prediction(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x_t)
        pred = prediction.float()
        if self.prediction_type == "epsilon":
            return (x_t.float() - s * pred) / a
        if self.prediction_type == "v_prediction":
            return a * x_t.float() - s * pred
        return pred

    def predict(self, network: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                **extra: Any) -> torch.Tensor:
        dtype, device = self._forward_dtype(network, x_t), x_t.device
        kwargs: dict[str, Any] = {}
        if "text_embeds" in cond:  # SDXL micro-conditioning
            kwargs["added_cond_kwargs"] = {k: cond[k].to(device, dtype) for k in ("text_embeds", "time_ids")}
        if extra.get("timestep_cond") is not None:  # LCM-style guidance embedding (sampling)
            kwargs["timestep_cond"] = extra["timestep_cond"]
        return network(x_t.to(dtype), t.to(device), cond["prompt_embeds"].to(device, dtype), **kwargs).sample

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, pooled) through the pipeline's own `encode_prompt` (no CFG, one per prompt)."""
        out = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.text_encoders[0].device, num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return out[0], (out[2] if len(out) > 2 else None)


@register_family
class StableDiffusionFamily(_DDPMFamily):
    """SD 1.x / 2.x: one CLIP text encoder, last hidden state (or `clip_skip`)."""

    name: ClassVar[str] = "sd"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)

    @torch.no_grad()
    def encode_prompts(self, prompts, original_sizes=None, crop_top_lefts=None, resolution=None) -> Conditioning:
        embeds, _ = self._encode(prompts)
        return {"prompt_embeds": embeds.float()}

    def default_size(self) -> tuple[int, int]:
        size = int(self.network.config.sample_size) * self.vae_scale_factor
        return size, size


@register_family
class StableDiffusionXLFamily(_DDPMFamily):
    """SDXL: penultimate hidden states of both encoders (768+1280), pooled output of the second,
    and `add_time_ids` = (original h, w) + (crop top, left) + (target h, w) from the real image."""

    name: ClassVar[str] = "sdxl"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",)
    row_keys: ClassVar[tuple[str, ...]] = ("time_ids",)
    default_guidance_scale: ClassVar[float] = 5.0
    sdxl_time_ids: str = "image"
    """`image`: each image's original size and crop; `fixed`: [res, res, 0, 0, res, res] for every image
    (what the Diffusion-DPO repository trained its DPO-SDXL with). Set from the config's `sdxl_time_ids`."""

    @torch.no_grad()
    def encode_prompts(self, prompts, original_sizes=None, crop_top_lefts=None, resolution=None) -> Conditioning:
        embeds, pooled = self._encode(prompts)
        cond = {"prompt_embeds": embeds.float(), "text_embeds": pooled.float()}
        return self.row_conditioning(cond, original_sizes, crop_top_lefts, resolution)

    def unconditional(self, n: int, resolution: int | tuple[int, int] | None = None) -> Conditioning:
        """"" encoded, or all-zero embeddings (with the same time ids) when the pipeline has
        `force_zeros_for_empty_prompt` (SDXL base), as the stock pipeline's default negative."""
        cond = self.encode_prompts([""] * n, resolution=resolution)
        if getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            cond["prompt_embeds"] = torch.zeros_like(cond["prompt_embeds"])
            cond["text_embeds"] = torch.zeros_like(cond["text_embeds"])
        return cond

    def row_conditioning(self, cond, original_sizes=None, crop_top_lefts=None, resolution=None) -> Conditioning:
        """`time_ids` = (original h, w) + (crop top, left) + (target h, w), per image (`resolution`: int or (h, w)),
        or fixed (see `sdxl_time_ids`)."""
        device = cond["prompt_embeds"].device
        n = cond["prompt_embeds"].shape[0]
        res = resolution or self.default_resolution
        h, w = (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))
        if self.sdxl_time_ids == "fixed":
            original_sizes = crop_top_lefts = None
        if original_sizes is None:
            original_sizes = torch.tensor([[h, w]] * n)
        if crop_top_lefts is None:
            crop_top_lefts = torch.zeros(n, 2, dtype=torch.long)
        target = torch.tensor([[h, w]] * n)
        time_ids = torch.cat([original_sizes.long().cpu(), crop_top_lefts.long().cpu(), target], dim=1)
        return {**cond, "time_ids": time_ids.float().to(device)}

    @property
    def default_resolution(self) -> int:
        return int(self.network.config.sample_size) * self.vae_scale_factor

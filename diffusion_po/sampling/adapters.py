"""What the guided denoising loop needs from a stock diffusers pipeline, per pipeline family.

Everything goes through the pipeline's own parts, as its `__call__` uses them: `encode_prompt`,
`prepare_latents`, the scheduler (`retrieve_timesteps`, `scale_model_input`, `step`), SDXL's
`_get_add_time_ids`, the VAE and `image_processor.postprocess`. The unconditional branch is built as
the stock pipeline builds its default negative: "" for SD/SD3, zeros for SDXL when the pipeline has
`force_zeros_for_empty_prompt`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from diffusion_po.errors import ModelLoadError

Cond = dict[str, torch.Tensor]


def cat_cond(conds: list[Cond]) -> Cond:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def slice_cond(cond: Cond, start: int, stop: int) -> Cond:
    return {k: v[start:stop] for k, v in cond.items()}


class PipelineAdapter:
    """Base: shared latents, scheduler and decode logic. Subclasses: SD, SDXL, SD3."""

    family: str = ""
    network_name: str = "unet"
    default_steps: int = 50
    default_scale: float = 7.5

    def __init__(self, pipe: Any):
        self.pipe = pipe

    # ------------------------------------------------------------------ parts
    @property
    def network(self) -> torch.nn.Module:
        return getattr(self.pipe, self.network_name)

    @property
    def device(self) -> torch.device:
        dev = getattr(self.pipe, "_execution_device", None)
        return dev if dev is not None else next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def default_size(self) -> tuple[int, int]:
        size = getattr(self.pipe, "default_sample_size", None) or self.network.config.sample_size
        return int(size) * self.vae_scale_factor, int(size) * self.vae_scale_factor

    # ------------------------------------------------------------------ prompts
    def encode(self, prompts: list[str], height: int, width: int) -> Cond:
        raise NotImplementedError

    def empty(self, n: int, height: int, width: int) -> Cond:
        """The stock pipeline's default negative (what its CFG uses when no negative prompt is given)."""
        return self.encode([""] * n, height, width)

    # ------------------------------------------------------------------ network
    def forward(self, network: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond, **extra: Any) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ scheduler and latents
    def timesteps(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        timesteps, _ = retrieve_timesteps(self.pipe.scheduler, steps, self.device)
        if hasattr(self.pipe.scheduler, "set_begin_index"):
            self.pipe.scheduler.set_begin_index(0)
        return timesteps

    def prepare_latents(
        self, n: int, height: int, width: int, generators: list[torch.Generator] | None, latents: torch.Tensor | None
    ) -> torch.Tensor:
        channels = int(self.network.config.in_channels)
        return self.pipe.prepare_latents(n, channels, height, width, self.dtype, self.device, generators, latents)

    def step_kwargs(self, generators: list[torch.Generator] | None, eta: float) -> dict[str, Any]:
        params = inspect.signature(self.pipe.scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generators
        return kwargs

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sched = self.pipe.scheduler
        return sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x

    # ------------------------------------------------------------------ decode
    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean_t = torch.tensor(mean).view(1, c, 1, 1).to(latents)
            std_t = torch.tensor(std).view(1, c, 1, 1).to(latents)
            return latents * std_t / cfg.scaling_factor + mean_t
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return latents / cfg.scaling_factor + shift

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> Any:
        if output_type == "latent":
            return latents
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(dtype=torch.float32)
        raw = self.unscale_latents(latents).to(device=vae.device, dtype=vae.dtype)
        image = vae.decode(raw, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        return self.pipe.image_processor.postprocess(image, output_type=output_type)


class SDAdapter(PipelineAdapter):
    family = "sd"

    def encode(self, prompts: list[str], height: int, width: int) -> Cond:
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return {"prompt_embeds": embeds}

    def default_size(self) -> tuple[int, int]:
        size = int(self.network.config.sample_size) * self.vae_scale_factor
        return size, size

    def forward(self, network, x, t, cond, **extra):
        dtype = self.dtype
        return network(
            x.to(dtype),
            t,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            timestep_cond=extra.get("timestep_cond"),
            return_dict=False,
        )[0]


class SDXLAdapter(SDAdapter):
    family = "sdxl"
    default_scale = 5.0

    def default_size(self) -> tuple[int, int]:
        return PipelineAdapter.default_size(self)

    def _time_ids(self, n: int, height: int, width: int, proj_dim: int) -> torch.Tensor:
        ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), torch.float32, proj_dim)
        return ids.to(self.device).repeat(n, 1)

    def _proj_dim(self, pooled: torch.Tensor) -> int:
        enc2 = getattr(self.pipe, "text_encoder_2", None)
        return int(enc2.config.projection_dim) if enc2 is not None else int(pooled.shape[-1])

    def encode(self, prompts: list[str], height: int, width: int) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {
            "prompt_embeds": embeds,
            "text_embeds": pooled,
            "time_ids": self._time_ids(len(prompts), height, width, self._proj_dim(pooled)),
        }

    def empty(self, n: int, height: int, width: int) -> Cond:
        cond = self.encode([""] * n, height, width)
        if getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            cond["prompt_embeds"] = torch.zeros_like(cond["prompt_embeds"])
            cond["text_embeds"] = torch.zeros_like(cond["text_embeds"])
        return cond

    def forward(self, network, x, t, cond, **extra):
        dtype = self.dtype
        return network(
            x.to(dtype),
            t,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            timestep_cond=extra.get("timestep_cond"),
            added_cond_kwargs={"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)},
            return_dict=False,
        )[0]


class SD3Adapter(PipelineAdapter):
    family = "sd3"
    network_name = "transformer"
    default_steps = 28
    default_scale = 7.0

    def encode(self, prompts: list[str], height: int, width: int) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    def forward(self, network, x, t, cond, **extra):
        dtype = self.dtype
        return network(
            hidden_states=x.to(dtype),
            timestep=t.expand(x.shape[0]),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            return_dict=False,
        )[0]

    def timesteps(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        sched = self.pipe.scheduler
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", None):
            patch = int(self.network.config.patch_size)
            seq = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
            kwargs["mu"] = calculate_shift(
                seq,
                sched.config.get("base_image_seq_len", 256),
                sched.config.get("max_image_seq_len", 4096),
                sched.config.get("base_shift", 0.5),
                sched.config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(sched, steps, self.device, **kwargs)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)
        return timesteps


_BY_CLASS: dict[str, type[PipelineAdapter]] = {
    "StableDiffusionPipeline": SDAdapter,
    "StableDiffusionXLPipeline": SDXLAdapter,
    "StableDiffusion3Pipeline": SD3Adapter,
}


def adapter_for(pipe: Any) -> PipelineAdapter:
    """The adapter for a diffusers pipeline (or a `diffusion_po.families.Family`, whose `.pipe` is used)."""
    if hasattr(pipe, "pipe") and hasattr(pipe, "encode_prompts"):  # a Family
        pipe = pipe.pipe
    name = type(pipe).__name__
    if name in _BY_CLASS:
        return _BY_CLASS[name](pipe)
    # subclasses and look-alikes (community pipelines built on the same parts)
    for cls_name, adapter in _BY_CLASS.items():
        if any(base.__name__ == cls_name for base in type(pipe).__mro__):
            return adapter(pipe)
    if hasattr(pipe, "transformer") and hasattr(pipe, "text_encoder_3"):
        return SD3Adapter(pipe)
    if hasattr(pipe, "unet") and getattr(pipe, "text_encoder_2", None) is not None:
        return SDXLAdapter(pipe)
    if hasattr(pipe, "unet") and hasattr(pipe, "encode_prompt"):
        return SDAdapter(pipe)
    raise ModelLoadError(
        f"pipeline class {name} is not supported by the guided sampler; supported: {', '.join(_BY_CLASS)}"
    )

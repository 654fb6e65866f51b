"""FLUX.1 (`FluxPipeline`): CLIP-L pooled + T5 prompt embeddings, a 16-channel VAE with shift and scaling
factors, 2x2-packed latents, flow matching (x_t = (1 - s) x0 + s eps, target eps - x0, t = 1000 s).

Training follows diffusers' `examples/dreambooth/train_dreambooth_lora_flux.py`: timesteps are drawn from the
checkpoint scheduler's own training grid (`noise_scheduler.timesteps[(u * 1000).long()]`) with u from
`--weighting_scheme` (default "none": uniform; "logit_normal" as SD3), the guidance embedding of
guidance-distilled "dev" checkpoints is fed a constant (`--guidance_scale`, default 3.5) and "schnell"
checkpoints get none; `timestep / 1000` goes to the transformer; `txt_ids` are zeros and `img_ids` the
(row, column) of each packed patch. The resolution-dependent shift (`mu` from the packed sequence length,
`calculate_shift`) is applied where FluxPipeline applies it: to the sampling schedule of checkpoints whose
scheduler has `use_dynamic_shifting` (dev); the training grid is the scheduler's unshifted one, as in the
diffusers example.

Classifier-free guidance on FLUX.1 is "true CFG" (diffusers' `true_cfg_scale` with `negative_prompt`): every
guidance branch is a full transformer forward on its own prompt. A guidance-distilled dev checkpoint needs
it asked for explicitly (`GuidedSampler(..., true_cfg=True)`), because its `guidance_scale` means the
embedded guidance, not CFG.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from diffusion_po.errors import UserError
from diffusion_po.families.base import Conditioning, register_family
from diffusion_po.families.flow import StableDiffusion3Family, Weighting


@register_family
class FluxFamily(StableDiffusion3Family):
    """FLUX.1 dev (guidance embedding) and schnell (none). Shares the flow-matching schedule with SD3."""

    name: ClassVar[str] = "flux"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("FluxPipeline",)
    repeated_blocks: ClassVar[tuple[str, ...]] = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    default_steps: ClassVar[int] = 28  # FluxPipeline's num_inference_steps
    default_guidance_scale: ClassVar[float] = 1.0  # FluxPipeline's true_cfg_scale: no CFG unless asked
    uses_true_cfg: ClassVar[bool] = True
    #: FluxPipeline's `max_sequence_length` (T5 tokens), for training and sampling alike
    default_max_sequence_length: ClassVar[int | None] = 512
    #: dev checkpoints' `encode_prompts` holds the embedded guidance
    prompt_options: ClassVar[tuple[str, ...]] = ("max_sequence_length", "guidance_scale")

    def __init__(self, pipe: Any, weighting: Weighting = "none", guidance_scale: float = 3.5, **options: Any):
        super().__init__(pipe, weighting=weighting, **options)
        #: the embedded guidance of dev checkpoints, for training and sampling (FluxPipeline's guidance_scale)
        self.guidance_scale = float(guidance_scale)

    @property
    def guidance_distilled(self) -> bool:
        """A dev-style checkpoint: the transformer embeds a guidance value."""
        return bool(getattr(self.pipe.transformer.config, "guidance_embeds", False))

    # ----------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts, original_sizes=None, crop_top_lefts=None, resolution=None) -> Conditioning:
        """T5 sequence (`prompt_embeds`), CLIP-L pooled (`pooled_projections`) and, for dev checkpoints, the
        embedded `guidance` per row."""
        prompts = list(prompts)
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.text_encoders[0].device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        cond = {"prompt_embeds": embeds.float(), "pooled_projections": pooled.float()}
        if self.guidance_distilled:
            cond["guidance"] = torch.full((len(prompts),), self.guidance_scale, device=embeds.device)
        return cond

    # ----------------------------------------------------------------- network
    def predict(self, network: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                **extra: Any) -> torch.Tensor:
        """Pack x_t (B, C, h, w) into 2x2 patches, run the transformer as FluxPipeline does, unpack."""
        from diffusers import FluxPipeline

        dtype, device = self._forward_dtype(network, x_t), x_t.device
        b, c, h, w = x_t.shape
        packed = FluxPipeline._pack_latents(x_t.to(dtype), b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        embeds = cond["prompt_embeds"].to(device, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        timestep = t.to(device).float().expand(b).to(dtype) / 1000
        guidance = cond.get("guidance")
        out = network(
            hidden_states=packed,
            timestep=timestep,
            guidance=guidance.to(device, torch.float32) if guidance is not None else None,
            pooled_projections=cond["pooled_projections"].to(device, dtype),
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor,
                                            self.vae_scale_factor)

    # ----------------------------------------------------------------- sampling
    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * 2  # the VAE factor times the 2x2 packing

    def _timestep_kwargs(self, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """The shift `mu` of the packed sequence length, as FluxPipeline computes it (schedulers with
        `use_dynamic_shifting` use it; the others ignore it)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        seq_len = (int(latent_shape[-2]) // 2) * (int(latent_shape[-1]) // 2)
        return {"mu": calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                      cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))}

    def sampling_timesteps(self, num_steps: int, latent_shape: tuple[int, ...],
                           device: torch.device | None = None) -> torch.Tensor:
        """FluxPipeline's schedule: sigmas linspace(1, 1/N, N) (unless `use_flow_sigmas`), shifted by `mu`."""
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        sched = self.pipe.scheduler
        sigmas = None if sched.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        timesteps, _ = retrieve_timesteps(sched, num_steps, device or self.device, sigmas=sigmas,
                                          **self._timestep_kwargs(latent_shape))
        sched.set_begin_index(0)
        return timesteps

    def prepare_latents(self, n: int, height: int, width: int, generators: list[torch.Generator] | None,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        """Unpacked (n, 16, h, w) noise, drawn exactly as FluxPipeline draws it (then packs it)."""
        if latents is not None:
            return latents.to(device=self.device, dtype=self.dtype)
        channels = int(self.network.config.in_channels) // 4
        packed, _ = self.pipe.prepare_latents(n, channels, height, width, self.dtype, self.device, generators, None)
        return self.pipe._unpack_latents(packed, height, width, self.vae_scale_factor)

    def check_guidance(self, n_branches: int, true_cfg: bool) -> None:
        """A dev checkpoint runs several guidance branches only when true CFG is asked for explicitly."""
        if n_branches > 1 and self.guidance_distilled and not true_cfg:
            raise UserError(
                "this FLUX.1 checkpoint is guidance-distilled (dev): its guidance is the embedded "
                f"guidance_scale ({self.guidance_scale}), not CFG. To run CFG, negative prompts, Perp-Neg or NPO "
                "as true-CFG branches (diffusers' true_cfg_scale: a full forward per branch), set true_cfg=True "
                "(GuidedSampler(..., true_cfg=True) / `diffusion-po sample --true-cfg`); otherwise use guidance "
                "scale 1"
            )

"""The DiT family with flow matching: Stable Diffusion 3 (`SD3Transformer2DModel`,
`FlowMatchEulerDiscreteScheduler`). x_t = (1 - s) x0 + s eps, target velocity eps - x0, t = 1000 s."""

from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar, Literal

import torch

from diffusion_po.families.base import Conditioning, Family, register_family

Weighting = Literal["logit_normal", "none"]
"""Training timestep density (diffusers' `--weighting_scheme`): logit-normal (SD3) or uniform."""


@register_family
class StableDiffusion3Family(Family):
    name: ClassVar[str] = "sd3"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    network_name: ClassVar[str] = "transformer"
    lora_layers_argument: ClassVar[str] = "transformer_lora_layers"
    prediction_type: ClassVar[str] = "flow"
    repeated_blocks: ClassVar[tuple[str, ...]] = ("JointTransformerBlock",)
    convolutional: ClassVar[bool] = False
    default_steps: ClassVar[int] = 28
    default_guidance_scale: ClassVar[float] = 7.0
    #: the stock pipeline's `max_sequence_length` (T5 tokens), for training and sampling alike
    default_max_sequence_length: ClassVar[int | None] = 256

    def __init__(self, pipe: Any, weighting: Weighting = "logit_normal", **options: Any):
        super().__init__(pipe, **options)
        self.weighting = weighting

    @cached_property
    def noise_scheduler(self) -> Any:
        """The flow-matching training schedule of the pipeline's scheduler config (built on first use)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Timesteps of the scheduler's (shifted) training grid; logit-normal density as in SD3 training."""
        if self.weighting == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator, device=generator.device))
        else:
            u = torch.rand(n, generator=generator, device=generator.device)
        idx = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self._timestep_grid(u.device)[idx].float()

    def _timestep_grid(self, device: torch.device) -> torch.Tensor:
        """The scheduler's training timesteps, cached on `device` (no copy per step)."""
        cached = getattr(self, "_grid_cache", None)
        if cached is None or cached.device != device:
            cached = self._grid_cache = self.noise_scheduler.timesteps.to(device)
        return cached

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """1 - t/T, t/T."""
        s = t.detach().to(like.device if like is not None else t.device).float() / self.num_train_timesteps
        return self._shaped(1 - s, s, like)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise.float() - x0.float()

    def x0_from_prediction(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t.float() - self.alpha_sigma(t, x_t)[1] * prediction.float()

    @torch.no_grad()
    def encode_prompts(self, prompts, original_sizes=None, crop_top_lefts=None, resolution=None) -> Conditioning:
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.text_encoders[0].device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds.float(), "pooled_projections": pooled.float()}

    def predict(self, network: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                **extra: Any) -> torch.Tensor:
        dtype, device = self._forward_dtype(network, x_t), x_t.device
        t = t.to(device)
        return network(
            hidden_states=x_t.to(dtype),
            timestep=t.expand(x_t.shape[0]) if t.dim() == 0 else t,
            encoder_hidden_states=cond["prompt_embeds"].to(device, dtype),
            pooled_projections=cond["pooled_projections"].to(device, dtype),
            return_dict=False,
        )[0]

    def _timestep_kwargs(self, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """The resolution-dependent shift `mu` of schedulers with `use_dynamic_shifting` (as the stock pipeline)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        cfg = self.pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", None):
            return {}
        patch = int(self.network.config.patch_size)
        seq = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
        return {"mu": calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                      cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))}

    def lora_state_dict(self, network=None) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(network if network is not None else self.network)

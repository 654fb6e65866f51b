"""The DiT family with flow matching: Stable Diffusion 3 (`SD3Transformer2DModel`,
`FlowMatchEulerDiscreteScheduler`). x_t = (1 - s) x0 + s eps, target velocity eps - x0, t = 1000 s."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from diffusion_po.families.base import Conditioning, Family, register_family


@register_family
class StableDiffusion3Family(Family):
    name: ClassVar[str] = "sd3"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    network_name: ClassVar[str] = "transformer"
    lora_layers_argument: ClassVar[str] = "transformer_lora_layers"
    prediction_type: ClassVar[str] = "flow"
    repeated_blocks: ClassVar[tuple[str, ...]] = ("JointTransformerBlock",)
    convolutional: ClassVar[bool] = False

    def __init__(self, pipe: Any, weighting: str = "logit_normal"):
        super().__init__(pipe)
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.weighting = weighting

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Timesteps of the scheduler's (shifted) training grid; logit-normal density as in SD3 training."""
        if self.weighting == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator))
        else:
            u = torch.rand(n, generator=generator)
        idx = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.noise_scheduler.timesteps[idx].float()

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t.to(like.device).float() / self.num_train_timesteps).view((-1,) + (1,) * (like.dim() - 1))

    def noisy_latents(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self._sigma(t, x0)
        return (1 - s) * x0.float() + s * noise.float()

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise.float() - x0.float()

    def x0_from_prediction(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t.float() - self._sigma(t, x_t) * prediction.float()

    @torch.no_grad()
    def encode_prompts(self, prompts, original_sizes=None, crop_top_lefts=None, resolution=None) -> Conditioning:
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.text_encoders[0].device,
            do_classifier_free_guidance=False, max_sequence_length=77,
        )
        return {"prompt_embeds": embeds.float(), "pooled_projections": pooled.float()}

    def predict(self, network: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype = next(network.parameters()).dtype if not torch.is_autocast_enabled() else x_t.dtype
        return network(
            hidden_states=x_t.to(dtype),
            timestep=t.to(x_t.device),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            return_dict=False,
        )[0]

    def save_lora(self, folder, network=None) -> None:
        from peft.utils import get_peft_model_state_dict

        network = network if network is not None else self.network
        self._write_lora(folder, network, get_peft_model_state_dict(network))

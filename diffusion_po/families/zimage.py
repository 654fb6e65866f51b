"""Z-Image (`ZImagePipeline`): a decoder LLM (Qwen3) as text encoder, a single-stream DiT, the FLUX VAE,
flow matching. One file is the whole family: prompts, schedule, forward, sampling parts.

- Prompts: the pipeline's `encode_prompt` (chat template, penultimate hidden states, padding dropped per
  prompt). The variable-length embeddings are stored padded to `max_sequence_length` with a `prompt_mask`,
  so a `Conditioning` stays a dict of batch-first tensors; `predict` hands the transformer the unpadded list.
- Schedule and target: flow matching as SD3/FLUX (x_t = (1 - s) x0 + s eps, target eps - x0, logit-normal
  timestep density as diffusers' flow-matching training examples). The transformer's own convention (time
  (1000 - t) / 1000, output = -velocity, latents with a frame axis) is converted inside `predict`, exactly as
  `ZImagePipeline.__call__` does.
- CFG: ZImagePipeline writes `pos + w (pos - neg)`; diffusion-po's `CFG(s)` is `neg + s (pos - neg)`, so the
  stock `guidance_scale=w` is `CFG(w + 1)` (default 6 = stock 5).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from diffusion_po.families.base import Conditioning, register_family
from diffusion_po.families.flow import StableDiffusion3Family


@register_family
class ZImageFamily(StableDiffusion3Family):
    name: ClassVar[str] = "zimage"
    pipeline_class_names: ClassVar[tuple[str, ...]] = ("ZImagePipeline",)
    repeated_blocks: ClassVar[tuple[str, ...]] = ("ZImageTransformerBlock",)
    default_steps: ClassVar[int] = 50  # ZImagePipeline's num_inference_steps
    default_guidance_scale: ClassVar[float] = 6.0  # ZImagePipeline's guidance_scale 5 in the CFG(s) convention
    #: ZImagePipeline's `max_sequence_length` (LLM tokens), for training and sampling alike
    default_max_sequence_length: ClassVar[int | None] = 512

    # ----------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts, original_sizes=None, crop_top_lefts=None, resolution=None) -> Conditioning:
        """`prompt_embeds` (B, max_sequence_length, D) zero-padded and `prompt_mask` (B, L) bool."""
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.text_encoders[0].device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        dim = embeds[0].shape[-1]
        padded = torch.zeros(len(embeds), self.max_sequence_length, dim, device=embeds[0].device)
        mask = torch.zeros(len(embeds), self.max_sequence_length, dtype=torch.bool, device=embeds[0].device)
        for i, e in enumerate(embeds):
            padded[i, : e.shape[0]] = e.float()
            mask[i, : e.shape[0]] = True
        return {"prompt_embeds": padded, "prompt_mask": mask}

    # ----------------------------------------------------------------- network
    def predict(self, network: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                **extra: Any) -> torch.Tensor:
        """Velocity (eps - x0) at (x_t, t), through the transformer's list interface as ZImagePipeline calls it."""
        dtype, device = self._forward_dtype(network, x_t), x_t.device
        b = x_t.shape[0]
        t = t.to(device).float()
        t = t.expand(b) if t.dim() == 0 else t
        mask = cond["prompt_mask"].to(device).bool()
        embeds = cond["prompt_embeds"].to(device, dtype)
        captions = [embeds[i][mask[i]] for i in range(b)]
        frames = list(x_t.to(dtype).unsqueeze(2).unbind(0))
        out = network(frames, (1000 - t) / 1000, captions, return_dict=False)[0]
        return -torch.stack([o.float() for o in out], dim=0).squeeze(2)

    # ----------------------------------------------------------------- sampling
    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * int(self.network.config.all_patch_size[0])

    def default_size(self) -> tuple[int, int]:
        return 1024, 1024  # ZImagePipeline's default height and width

    def sampling_timesteps(self, num_steps: int, latent_shape: tuple[int, ...],
                           device: torch.device | None = None) -> torch.Tensor:
        """ZImagePipeline's schedule: its default sigmas and the shift `mu` of the patch sequence length."""
        from diffusers.pipelines.z_image.pipeline_z_image import (
            calculate_shift,
            get_default_z_image_sigmas,
            retrieve_timesteps,
        )

        sched = self.pipe.scheduler
        cfg = sched.config
        seq_len = (int(latent_shape[-2]) // 2) * (int(latent_shape[-1]) // 2)
        mu = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(sched, num_steps, device or self.device,
                                          sigmas=get_default_z_image_sigmas(num_steps), mu=mu)
        sched.set_begin_index(0)
        return timesteps

    def prepare_latents(self, n: int, height: int, width: int, generators: list[torch.Generator] | None,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        """Drawn in fp32 as ZImagePipeline draws them (the loop keeps fp32 latents)."""
        channels = int(self.network.config.in_channels)
        return self.pipe.prepare_latents(n, channels, height, width, torch.float32, self.device, generators, latents)

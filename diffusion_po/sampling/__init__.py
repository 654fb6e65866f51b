"""Sampling with CFG, negative prompts, Perp-Neg and NPO guidance over stock diffusers pipelines.

Stable API (see docs/sampling.md):
- `generate(pipe_or_family, prompts, seeds, guidance=..., ...) -> list[PIL.Image]`
- `GuidedSampler(pipe, guidance, negative_model)(prompt, negative_prompt, seeds=...)`
- `load_sampling_pipeline(model, lora=, npo_lora=, negative_model=, ...) -> (pipe, NegativeModel | None)`
- `NegativeModel`, `load_npo_lora`, `load_negative_network`, `mixed_adapter_batch`, `set_scheduler`
"""

from diffusion_po.sampling.api import SCHEDULERS, generate, load_sampling_pipeline, set_scheduler
from diffusion_po.sampling.negative import (
    NegativeModel,
    load_negative_network,
    load_npo_lora,
    load_positive_lora,
    merge_negative_network,
    mixed_adapter_batch,
)
from diffusion_po.sampling.sampler import GuidedSampler, PromptSpec, SamplingState

__all__ = [
    "SCHEDULERS", "GuidedSampler", "NegativeModel", "PromptSpec", "SamplingState",
    "generate", "load_negative_network", "load_npo_lora", "load_positive_lora", "load_sampling_pipeline",
    "merge_negative_network", "mixed_adapter_batch", "set_scheduler",
]

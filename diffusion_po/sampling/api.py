"""The stable Python API of the sampling layer.

    from diffusion_po.sampling import generate, load_sampling_pipeline
    pipe, negative = load_sampling_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", npo_lora="out/npo")
    images = generate(pipe, ["a cat"] * 4, seeds=[0, 1, 2, 3], guidance="npo", scale=7.5,
                      negative_model=negative, steps=25)

`generate` groups the requests into batches (items in a batch share the numbers of negatives and extra
positives), keeps the input order, and gives each image its own generator seeded by its seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffusion_po.errors import ModelLoadError, UserError
from diffusion_po.families import Family, family_class_for, family_for_pipeline, network_of
from diffusion_po.guidance import Guidance, make_guidance
from diffusion_po.sampling.negative import (
    NegativeModel,
    load_negative_network,
    load_npo_lora,
    load_positive_lora,
    merge_negative_network,
    swap_network,
)
from diffusion_po.sampling.sampler import GuidedSampler, PromptSpec, WeightedPrompts, weighted

#: short scheduler names -> (diffusers class, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", {}),
}


def set_scheduler(pipe: Any, name: str | None) -> str:
    """Replace `pipe.scheduler` by a short name (see SCHEDULERS) or any diffusers scheduler class name,
    built `from_config` of the current one. Returns the class name in use."""
    import diffusers

    if name:
        cls_name, extra = SCHEDULERS.get(name.lower(), (name, {}))
        cls = getattr(diffusers, cls_name, None)
        if cls is None or not cls_name.endswith("Scheduler"):
            raise UserError(
                f"unknown scheduler '{name}'; use one of {', '.join(SCHEDULERS)} or a diffusers class name "
                "such as EulerDiscreteScheduler"
            )
        if type(cls).__name__ == "DummyObject":  # diffusers' placeholder when a dependency is missing
            missing = " ".join(b for b in getattr(cls, "_backends", []) if b != "torch")
            raise UserError(f"scheduler '{name}' ({cls_name}) needs {missing or 'a missing package'}: "
                            f"pip install {missing}")
        new = cls.from_config(pipe.scheduler.config, **extra)
        flow_scheduler = cls_name.startswith("FlowMatch") or bool(new.config.get("use_flow_sigmas"))
        flow_model = getattr(family_class_for(pipe), "prediction_type", None) == "flow"
        if flow_scheduler != flow_model:
            kind = "flow-matching" if flow_model else "noise-prediction (DDPM-type)"
            names = [k for k, (c, _) in SCHEDULERS.items() if c.startswith("FlowMatch") == flow_model]
            raise UserError(f"scheduler '{name}' ({cls_name}) does not fit {type(pipe).__name__}, a {kind} model; "
                            f"use one of {', '.join(names)}")
        pipe.scheduler = new
    return type(pipe.scheduler).__name__


def check_sampling_settings(steps: int | None = None, guidance_rescale: float = 0.0, limit: int | None = None) -> None:
    """One-line errors for settings that would otherwise be replaced silently or give broken images."""
    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps}: give at least 1 denoising step (leave it out for the model's default)")
    if not 0.0 <= guidance_rescale <= 1.0:  # also refuses nan
        raise UserError(f"--guidance-rescale {guidance_rescale}: phi must lie in [0, 1] (0 = off, 0.7 in Lin et al.)")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give at least 1 prompt (leave it out for all prompts)")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_sampling_pipeline(
    model: str,
    lora: str | None = None,
    lora_scale: float = 1.0,
    npo_lora: str | None = None,
    negative_model: str | None = None,
    npo_base: str | None = None,
    npo_merge_weight: float = 0.0,
    negative_kinds: tuple[str, ...] = ("uncond", "neg"),
    scheduler: str | None = None,
    device: str | None = "auto",
    dtype: str | torch.dtype = "fp32",
    vae: str | None = None,
    network: str | None = None,
) -> tuple[Any, NegativeModel | None]:
    """Load a pipeline for sampling and its optional NPO negative model.

    model: diffusers pipeline folder or hub id. lora: a positive LoRA, fused into the weights.
    npo_lora: an NPO LoRA (theta^- = theta^+ + Delta_NPO; one forward via mixed-adapter batches).
    negative_model: a separate negative network (pipeline folder with unet/ or transformer/, or a model
    folder). npo_merge_weight alpha with npo_base: theta^- = theta^+ + Delta_NPO - alpha (theta^+ - theta_base)
    (the reference's `--merge_weight`; a separate merged network). network: a trained unet/transformer (a
    full fine-tune's output folder) replacing the model's, before the LoRA.
    """
    from diffusion_po.families import load_pipeline

    if npo_lora and negative_model:
        raise UserError("give either --npo-lora or --negative-model, not both")
    if npo_merge_weight and not npo_base:
        raise UserError("--npo-merge-weight needs --npo-base (the base model theta_base the NPO weights were trained on)")
    if npo_merge_weight and not (npo_lora or negative_model):
        raise UserError("--npo-merge-weight needs NPO weights (--npo-lora or --negative-model)")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    pipe = load_pipeline(model, vae_path=vae)
    pipe.set_progress_bar_config(disable=True)
    if network:
        swap_network(pipe, network)
    if lora:
        load_positive_lora(pipe, lora, lora_scale)
    set_scheduler(pipe, scheduler)
    negative: NegativeModel | None = None
    if npo_base:
        negative = _merged_negative(pipe, npo_base, npo_lora, negative_model, npo_merge_weight, negative_kinds)
    elif npo_lora:
        negative = load_npo_lora(pipe, npo_lora, kinds=negative_kinds)
    elif negative_model:
        negative = load_negative_network(pipe, negative_model, kinds=negative_kinds)
    dev = _device(device)
    pipe.to(dev, torch_dtype)
    if negative is not None and negative.network is not None:
        negative.network.to(dev, torch_dtype)
    return pipe, negative


def _merged_negative(pipe, npo_base, npo_lora, negative_model, alpha, kinds) -> NegativeModel:
    """theta^- = theta_NPO + (1 - alpha)(theta^+ - theta_base), theta_NPO = base (+ fused NPO LoRA) or a full NPO network."""
    import copy

    from diffusion_po.families import load_pipeline

    base_pipe = load_pipeline(npo_base)
    name = family_class_for(pipe).network_name
    base = network_of(base_pipe)
    if npo_lora:
        npo_pipe = base_pipe
        npo_net = copy.deepcopy(base)
        npo_pipe.register_modules(**{name: npo_net})
        load_npo_lora(npo_pipe, npo_lora, adapter_name="npo")
        npo_net.fuse_lora(adapter_names=["npo"])
        npo_net.unload_lora()
    else:
        npo_net = load_negative_network(pipe, negative_model).network
    positive = network_of(pipe)
    if {k: tuple(v.shape) for k, v in base.state_dict().items()} != {k: tuple(v.shape) for k, v in positive.state_dict().items()}:
        raise ModelLoadError(f"--npo-base '{npo_base}' has a different {name} architecture from the model")
    merged = merge_negative_network(positive, npo_net, base, alpha).eval().requires_grad_(False)
    desc = {"npo_base": npo_base, "npo_merge_weight": alpha, "npo_lora": npo_lora, "negative_model": negative_model}
    return NegativeModel(network=merged, kinds=kinds, description={k: v for k, v in desc.items() if v is not None})


def set_embedded_guidance(family: Family, value: float | None, model: str) -> Family:
    """`family` with FLUX.1-dev's embedded guidance set to `value` (`--embedded-guidance`; None: unchanged);
    an error for a checkpoint without a guidance embedding."""
    if value is not None:
        if not getattr(family, "guidance_distilled", False):
            raise UserError(f"--embedded-guidance applies to guidance-distilled FLUX.1-dev checkpoints, not {model}")
        family.guidance_scale = float(value)
    return family


def _as_family(pipe_or_family: Any) -> Family:
    if isinstance(pipe_or_family, (str, Path)):
        pipe_or_family, _ = load_sampling_pipeline(str(pipe_or_family))
    return family_for_pipeline(pipe_or_family)  # a Family passes through with its options


def generate(
    pipe_or_family: Any,
    prompts: Sequence[str | PromptSpec],
    seeds: Sequence[int] | int = 0,
    guidance: Guidance | str | None = None,
    scale: float | None = None,
    rescale: float = 0.0,
    negative_prompt: WeightedPrompts | str | None = None,
    positive_prompts: WeightedPrompts | None = None,
    negative_model: NegativeModel | None = None,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    scheduler: str | None = None,
    eta: float = 0.0,
    output_type: str = "pil",
    progress: bool = False,
    on_batch: Callable[[list[int], list[Any]], None] | None = None,
    true_cfg: bool = False,
) -> list[Any]:
    """Generate one image per prompt, in input order. The stable entry point for other modules.

    pipe_or_family: a diffusers pipeline, a `Family`, or a model folder / hub id.
    prompts: strings or `PromptSpec`s (a spec carries its own seed, negatives and extra positives).
    seeds: one per prompt, or a base seed (prompt i gets base + i); ignored for `PromptSpec`s.
    guidance: a `Guidance` or a name ('cfg', 'composable', 'perp-neg', 'npo') with `scale`/`rescale`.
    negative_prompt / positive_prompts: "text" or [("text", weight), ...], for every string prompt.
    negative_model: an NPO `NegativeModel` (see `load_sampling_pipeline`).
    scheduler: a short name or diffusers class name; replaces `pipe.scheduler`.
    on_batch(indices, images): called after each batch (to save as you go).
    true_cfg: CFG branches on a guidance-distilled FLUX.1-dev as true CFG (see `GuidedSampler`).
    Returns PIL images (output_type 'pil'), or arrays/tensors/latents for 'np'/'pt'/'latent'.
    """
    family = _as_family(pipe_or_family)
    set_scheduler(family.pipe, scheduler)
    if guidance is None or isinstance(guidance, str):
        default_scale = family.default_guidance_scale
        guidance = make_guidance(guidance or "cfg", scale if scale is not None else default_scale, rescale)
    sampler = GuidedSampler(family, guidance, negative_model, true_cfg=true_cfg)
    specs = GuidedSampler.specs(list(prompts), weighted(negative_prompt), weighted(positive_prompts), seeds)
    # group by structure, keep order within groups
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault(s.structure, []).append(i)
    batches = [idx[k : k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]
    results: list[Any] = [None] * len(specs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(specs), desc="sampling", unit="img")
    for idx in batches:
        out = sampler.sample_batch([specs[i] for i in idx], steps, height, width, None, eta, output_type)
        items = list(out) if not isinstance(out, list) else out
        for i, img in zip(idx, items):
            results[i] = img
        if on_batch is not None:
            on_batch(idx, items)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return results

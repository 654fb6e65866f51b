"""`eval generate`: images for one model over a prompt set, resumable, paired by seed.

Image ``k`` of prompt ``i`` uses seed ``base_seed + i * n + k`` with its own CPU ``torch.Generator``,
so the same (prompt, k) gets the same initial noise for every model, on any device and in any batch.
Images go to ``<out>/images/<i:05d>_<k:02d>.png``; every finished image is appended to
``<out>/manifest.jsonl`` right after it is written, so an interrupted run continues where it stopped
and never redoes a finished image. ``<out>/run.json`` records the settings; resuming with different
settings is refused.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffusion_po.errors import UserError
from diffusion_po.eval.manifest import MANIFEST, RUN_INFO, append_jsonl, read_jsonl
from diffusion_po.eval.prompts import PromptSet, load_prompt_set
from diffusion_po.sampling.io import seed_for  # one seed rule for `sample` and `eval`


@dataclass
class GenerateConfig:
    """Settings of one generation run (everything that changes the images)."""

    model: str
    prompts: str
    lora: str | None = None
    lora_scale: float = 1.0
    network: str | None = None  # a fine-tuned unet/transformer folder replacing the pipeline's
    n: int = 1
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    scheduler: str | None = None
    # guided sampling through diffusion_po.sampling ('cfg', 'perp-neg', 'npo', 'composable'); None = the
    # stock pipeline call. npo_lora: an NPO LoRA for the negative branch (implies the sampler).
    guidance: str | None = None
    guidance_rescale: float = 0.0
    npo_lora: str | None = None
    # FLUX.1-dev (both imply the sampler, as `diffusion-po sample --true-cfg / --embedded-guidance`): CFG branches
    # as true CFG (diffusers' true_cfg_scale), and the embedded guidance (FluxPipeline's guidance_scale)
    true_cfg: bool = False
    embedded_guidance: float | None = None
    dtype: str = "auto"
    image_format: str = "png"
    start: int = 0
    limit: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The fields that must match for a run to be resumed (start/limit may grow)."""
        d = asdict(self)
        d.pop("start")
        d.pop("limit")
        for key in ("true_cfg", "embedded_guidance"):  # unset: as a run.json written before these settings
            if not d[key]:
                d.pop(key)
        return d


def image_name(prompt_index: int, k: int, fmt: str = "png") -> str:
    return f"images/{prompt_index:05d}_{k:02d}.{fmt}"


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def uses_sampler(cfg: GenerateConfig) -> bool:
    """Whether this run goes through diffusion_po.sampling (guidance other than the stock call)."""
    return bool(cfg.guidance or cfg.npo_lora or cfg.true_cfg or cfg.embedded_guidance is not None)


def load_sampler_pipeline(cfg: GenerateConfig, device: str) -> tuple[Any, Any]:
    """Pipeline + NPO negative model through diffusion_po.sampling (for ``--guidance``/``--npo-lora``)."""
    from diffusion_po.sampling.api import load_sampling_pipeline

    dtype = cfg.dtype if cfg.dtype != "auto" else ("fp16" if device.startswith("cuda") else "fp32")
    pipe, negative = load_sampling_pipeline(
        cfg.model, lora=cfg.lora, lora_scale=cfg.lora_scale, npo_lora=cfg.npo_lora, scheduler=cfg.scheduler,
        device=device, dtype=dtype, network=cfg.network,  # the network first: the LoRAs go on top of it
    )
    return pipe, negative


def load_generation_pipeline(cfg: GenerateConfig, device: str) -> Any:
    """The stock diffusers pipeline of ``cfg.model`` with the optional network swap, LoRA and scheduler."""
    import torch

    from diffusion_po.families import load_pipeline

    dtype = _torch_dtype(cfg.dtype, device)
    pipe = load_pipeline(cfg.model)  # cast below: `dtype`/`torch_dtype` kwargs differ across diffusers versions
    if cfg.network:
        from diffusion_po.sampling.negative import swap_network

        swap_network(pipe, cfg.network)
    if cfg.lora:  # fused at lora_scale (an adapter named "eval" would clash with Module.eval)
        from diffusion_po.sampling.negative import load_positive_lora

        load_positive_lora(pipe, cfg.lora, cfg.lora_scale)
    if cfg.scheduler:  # the names of `diffusion-po sample --scheduler` (short names or diffusers classes)
        from diffusion_po.sampling.api import set_scheduler

        set_scheduler(pipe, cfg.scheduler)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_resume(out: Path, cfg: GenerateConfig) -> None:
    info_path = out / RUN_INFO
    if not info_path.is_file():
        return
    try:
        previous = json.loads(info_path.read_text())["config"]
    except (ValueError, KeyError) as exc:
        raise UserError(f"{info_path} is unreadable; remove it or use another --out") from exc
    now = cfg.identity()
    diff = sorted(k for k in set(previous) | set(now) if k not in ("start", "limit") and previous.get(k) != now.get(k))
    if diff:
        details = ", ".join(f"{k}: {previous.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise UserError(
            f"{out} holds a run with other settings ({details}); use another --out to generate a new run"
        )


def pending_jobs(prompt_set: PromptSet, cfg: GenerateConfig, done: set[tuple[int, int]]) -> list[tuple[Any, int]]:
    """(prompt item, k) pairs still to generate."""
    return [(item, k) for item in prompt_set for k in range(cfg.n) if (item.index, k) not in done]


def generate_images(
    cfg: GenerateConfig,
    out: str | Path,
    *,
    device: str | None = None,
    batch_size: int = 4,
    pipe: Any = None,
    progress: bool = True,
) -> Path:
    """Generate (or finish generating) the run ``cfg`` in ``out``. Returns ``out``."""
    import torch
    from tqdm.auto import tqdm

    if cfg.n < 1:
        raise UserError("--n must be at least 1")
    if cfg.image_format not in ("png", "jpg"):
        raise UserError("--format must be png or jpg")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    _check_resume(out, cfg)
    full_set = load_prompt_set(cfg.prompts)
    prompt_set = full_set.subset(cfg.start, cfg.limit)
    if not len(prompt_set):
        raise UserError(f"no prompts selected from '{cfg.prompts}' (start {cfg.start}, limit {cfg.limit})")

    manifest = out / MANIFEST
    done = {
        (int(r["prompt_index"]), int(r["k"]))
        for r in read_jsonl(manifest)
        if "prompt_index" in r and (out / r["image"]).is_file()
    }
    jobs = pending_jobs(prompt_set, cfg, done)
    total = len(prompt_set) * cfg.n
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = {"config": cfg.identity(), "prompt_set": full_set.name, "n_prompts": len(full_set), "device": device}
    (out / RUN_INFO).write_text(json.dumps(info, indent=1))
    if not jobs:
        return out
    negative = None
    sampler = uses_sampler(cfg)
    if pipe is None:
        if sampler:
            pipe, negative = load_sampler_pipeline(cfg, device)
        else:
            pipe = load_generation_pipeline(cfg, device)
    call_kwargs: dict[str, Any] = {}
    if cfg.steps is not None:
        call_kwargs["num_inference_steps"] = cfg.steps
    if cfg.guidance_scale is not None:
        call_kwargs["guidance_scale"] = cfg.guidance_scale
    if cfg.height is not None:
        call_kwargs["height"] = cfg.height
    if cfg.width is not None:
        call_kwargs["width"] = cfg.width
    call_kwargs.update(cfg.extra)
    if sampler:
        from diffusion_po.families import family_for_pipeline
        from diffusion_po.sampling.api import generate, set_embedded_guidance

        family = set_embedded_guidance(family_for_pipeline(pipe), cfg.embedded_guidance, cfg.model)

    bar = tqdm(total=total, initial=total - len(jobs), desc=f"generate {Path(cfg.model).name}", unit="img",
               disable=not progress)
    try:
        for start in range(0, len(jobs), max(1, batch_size)):
            batch = jobs[start : start + batch_size]
            seeds = [seed_for(cfg.seed, item.index, cfg.n, k) for item, k in batch]
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            prompts = [item.text for item, _ in batch]
            kwargs = dict(call_kwargs)
            if cfg.negative_prompt is not None:
                kwargs["negative_prompt"] = [cfg.negative_prompt] * len(batch)
            t0 = time.perf_counter()
            if sampler:
                images = generate(
                    family, prompts, seeds=seeds, guidance=cfg.guidance or "cfg", scale=cfg.guidance_scale,
                    rescale=cfg.guidance_rescale, negative_prompt=cfg.negative_prompt, negative_model=negative,
                    steps=cfg.steps, height=cfg.height, width=cfg.width, batch_size=len(batch), true_cfg=cfg.true_cfg,
                )
            else:
                with torch.inference_mode():
                    images = pipe(prompt=prompts, generator=generators, **kwargs).images
            seconds = (time.perf_counter() - t0) / len(batch)
            rows = []
            for (item, k), seed, image in zip(batch, seeds, images):
                rel = image_name(item.index, k, cfg.image_format)
                target = out / rel
                tmp = target.with_name(target.stem + ".tmp" + target.suffix)
                if cfg.image_format == "jpg":
                    image.convert("RGB").save(tmp, format="JPEG", quality=95)
                else:
                    image.save(tmp, format="PNG")
                os.replace(tmp, target)
                rows.append({
                    "image": rel,
                    "prompt": item.text,
                    "prompt_index": item.index,
                    "prompt_id": item.id,
                    "category": item.category,
                    "k": k,
                    "seed": seed,
                    "model": cfg.model,
                    "lora": cfg.lora,
                    "network": cfg.network,
                    "steps": cfg.steps,
                    "guidance_scale": cfg.guidance_scale,
                    "guidance": cfg.guidance or "cfg",
                    "true_cfg": cfg.true_cfg,
                    "embedded_guidance": cfg.embedded_guidance,
                    "engine": "diffusion_po.sampling" if sampler else "pipeline",
                    "height": image.height,
                    "width": image.width,
                    "scheduler": type(pipe.scheduler).__name__,
                    "seconds": round(seconds, 4),
                })
            append_jsonl(manifest, rows)
            bar.update(len(batch))
    finally:
        bar.close()
    return out

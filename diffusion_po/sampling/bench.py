"""Cost of one guided denoising step, for the benchmark suite.

    from diffusion_po.sampling.bench import step_cost, build_sd15_size_pipeline
    pipe = build_sd15_size_pipeline(resolution=512).to("cuda", torch.bfloat16)
    for m in ("cfg", "perp-neg", "npo-lora"):
        print(m, step_cost(pipe, m, batch=8))

A step is everything the sampler does per timestep: `scale_model_input`, the batched forward(s) of all
branches, the guidance combination and the scheduler step. Text encoding, latents and decoding are
excluded (paid once per image, not per step).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

from diffusion_po.families import family_for_pipeline
from diffusion_po.guidance import CFG, NPO, Composable, PerpNeg
from diffusion_po.sampling.negative import NegativeModel, adapter_names_of, deactivate_adapter
from diffusion_po.sampling.sampler import GuidedSampler, PromptSpec

#: method -> (guidance class, negatives per image, negative-model form)
METHODS: dict[str, tuple[type, int, str | None]] = {
    "cond": (CFG, 0, None),  # scale 1: the conditional branch only
    "cfg": (CFG, 0, None),
    "negative-prompt": (CFG, 1, None),
    "composable": (Composable, 1, None),
    "perp-neg": (PerpNeg, 1, None),
    "npo-lora": (NPO, 0, "adapter"),
    "npo-lora-peft": (NPO, 0, "adapter-peft"),
    "npo-network": (NPO, 0, "network"),
    "perp-neg-npo-lora": (PerpNeg, 1, "adapter"),
}

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the diffusers DPO/NPO LoRA scripts' targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _add_bench_lora(network: torch.nn.Module, name: str, rank: int) -> None:
    from peft import LoraConfig

    network.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS), adapter_name=name
    )
    network.eval()
    deactivate_adapter(network, name)


@torch.no_grad()
def step_cost(
    pipe: Any,
    method: str = "cfg",
    batch: int = 1,
    steps: int = 5,
    warmup: int = 2,
    scale: float = 7.5,
    lora_rank: int = 8,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    negative_model: NegativeModel | None = None,
    clock: str = "wall",
) -> float:
    """Median wall time in ms of one denoising step for `batch` images with `method` (see METHODS).

    For the NPO methods without `negative_model`, a rank-`lora_rank` LoRA named "bench_npo" is added to
    the network for the measurement and removed after ("npo-lora"), or the network is copied
    ("npo-network").
    clock: "wall" (perf_counter, CUDA-synchronised: use on GPUs) or "cpu" (this process's CPU time:
    use on a shared CPU with `torch.set_num_threads(1)`, where other processes' load would swamp wall time).
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    timer = time.perf_counter if clock == "wall" else time.process_time
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    cls, n_neg, form = METHODS[method]
    fam = family_for_pipeline(pipe)
    guidance = cls(1.0 if method == "cond" else scale)
    added_lora = False
    if form is not None and negative_model is None:
        if form.startswith("adapter"):
            if "bench_npo" not in adapter_names_of(fam.network):
                _add_bench_lora(fam.network, "bench_npo", lora_rank)
                added_lora = True
            negative_model = NegativeModel(adapter="bench_npo", mixed="peft" if form == "adapter-peft" else "rows")
        else:
            negative_model = NegativeModel(network=copy.deepcopy(fam.network).eval())
    try:
        sampler = GuidedSampler(pipe, guidance, negative_model if form else None)
        specs = [PromptSpec("a red circle and a blue square", i, [("red", 1.0)] * n_neg) for i in range(batch)]
        device = fam.device
        times: list[float] = []
        state = None
        pos = 0
        for i in range(warmup + steps):
            if state is None or pos >= len(state.timesteps):
                state = sampler.prepare(specs, num_inference_steps, height, width)
                pos = 0
            t = state.timesteps[pos]
            _sync(device)
            t0 = timer()
            state.latents = sampler.step(state, t)
            _sync(device)
            if i >= warmup:
                times.append((timer() - t0) * 1000.0)
            pos += 1
        return statistics.median(times)
    finally:
        if added_lora:
            fam.network.delete_adapters("bench_npo")


def build_sd15_size_pipeline(resolution: int = 512, seed: int = 0, text_layers: int = 1) -> Any:
    """A random-initialised StableDiffusionPipeline whose UNet has SD1.5's architecture (860M params,
    768-d cross-attention); the text encoder (768-d, `text_layers` layers) and VAE (4 levels, so latents
    are resolution/8) are small, since a denoising step only runs the UNet."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusion_po.tiny import _clip_text_config, save_clip_tokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        save_clip_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=resolution,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=CLIPTextModel(_clip_text_config(768, layers=text_layers)),
        tokenizer=tokenizer, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(
    pipe: Any,
    methods: tuple[str, ...] = ("cfg", "perp-neg", "npo-lora"),
    batch: int = 1,
    rounds: int = 3,
    **kwargs: Any,
) -> dict[str, dict[str, float]]:
    """{method: {"ms": median ms/step, "x_cfg": ratio to cfg}}. Methods are measured in interleaved
    rounds (cfg, m1, m2, cfg, m1, ...) and the median over rounds is kept, so drifting machine load
    (a shared CPU) hits every method alike. cfg is always measured."""
    order = ["cfg"] + [m for m in methods if m != "cfg"]
    runs: dict[str, list[float]] = {m: [] for m in order}
    for _ in range(rounds):
        for m in order:
            runs[m].append(step_cost(pipe, m, batch, **kwargs))
    ms = {m: statistics.median(v) for m, v in runs.items()}
    return {m: {"ms": round(v, 3), "x_cfg": round(v / ms["cfg"], 3)} for m, v in ms.items()}

"""The reference recipes, run in the same process as the baseline of every ratio the benchmark prints.

Re-implemented from the reference measurements `anchor_bench.py` (full fine-tune) and `anchor_lora.py`
(LoRA) in the project's shared tools, which follow the recipes users run today: the Diffusion-DPO
repository (Wallace et al., `train.py`) and diffusers' research example
`examples/research_projects/diffusion_dpo/train_diffusion_dpo.py` (Apache-2.0). What they do, per step:

- full fine-tune: fp32 master weights under bf16 autocast, a separate reference copy in bf16, eager
  PyTorch, `torch.optim.AdamW` (not fused), the VAE and text encoder run on every step (or, in the
  "cached" variant, latents and embeddings given);
- LoRA: the network in bf16, rank-8 adapters on to_q/to_k/to_v/to_out.0 in fp32, the reference through
  `disable_adapters()`;
- winner and loser in one batch, the DPO loss of the original repository (beta 5000).

For SDXL and SD3 the recipe runs from cached latents and embeddings, as in the reference measurement
(SD3 has no published recipe: the same steps, with the flow-matching interpolation and target).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def dpo_loss(pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """The reference recipe's loss (winner rows first, loser rows second)."""
    m = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    r = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    mw, ml = m.chunk(2)
    rw, rl = r.chunk(2)
    return -F.logsigmoid(-0.5 * beta * ((mw - ml) - (rw - rl))).mean()


def reference_step(
    pipe: Any,
    model: str,
    pairs: int,
    resolution: int,
    cond_shapes: dict[str, tuple[int, ...]],
    device: torch.device,
    lora: bool = False,
    with_encoders: bool = True,
    gradient_checkpointing: bool = False,
    amp: bool = True,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(step, release) for the reference recipe on a copy of `pipe`'s network (same architecture).

    `cond_shapes`: per conditioning key, the shape of one prompt's tensor (as the family encodes it).
    `with_encoders` runs the VAE and the text encoder each step (SD1.5 only, as the reference).
    """
    from diffusion_po.families import network_of

    dev = torch.device(device)
    dtype = torch.bfloat16 if amp else torch.float32
    source = network_of(pipe)
    flow = model == "sd3"
    if with_encoders and model != "sd15":
        raise ValueError("the reference recipe runs the encoders each step for SD1.5 only (as measured)")
    net = copy.deepcopy(source).to(dev, torch.float32)
    params: list[torch.nn.Parameter]
    if lora:
        from peft import LoraConfig

        net.to(dtype)
        net.requires_grad_(False)
        net.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                   target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in net.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        ref = None
        opt = torch.optim.AdamW(params, lr=1e-5)
    else:
        ref = copy.deepcopy(net).to(dtype).eval().requires_grad_(False)
        net.requires_grad_(True)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-8)
    if gradient_checkpointing:
        net.enable_gradient_checkpointing()
    net.train()
    vae = te = None
    if model == "sd15":  # the reference builds both on the GPU whether or not it runs them
        vae = copy.deepcopy(pipe.vae).to(dev, dtype).eval().requires_grad_(False)
        te = copy.deepcopy(pipe.text_encoder).to(dev, dtype).eval().requires_grad_(False)
    scale = float(pipe.vae.config.scaling_factor)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    channels = int(source.config.in_channels)
    px = torch.randn(2 * pairs, 3, resolution, resolution, device=dev, dtype=dtype)
    ids = torch.randint(0, 49408, (pairs, 77), device=dev)
    lat_cached = torch.randn(2 * pairs, channels, resolution // f, resolution // f, device=dev)
    cond = {k: torch.randn(2 * pairs, *shape, device=dev, dtype=dtype) for k, shape in cond_shapes.items()}
    ab = torch.linspace(0.9991, 0.0047, 1000, device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp)

    def forward(network: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, emb: dict[str, torch.Tensor]):
        if flow:
            return network(hidden_states=x, timestep=t, encoder_hidden_states=emb["prompt_embeds"],
                           pooled_projections=emb["pooled_projections"]).sample
        extra = {}
        if "text_embeds" in emb:
            extra["added_cond_kwargs"] = {"text_embeds": emb["text_embeds"], "time_ids": emb["time_ids"]}
        return network(x, t, emb["prompt_embeds"], **extra).sample

    def step() -> None:
        with torch.no_grad():
            if with_encoders:
                lat = vae.encode(px).latent_dist.sample().float() * scale
                emb = {"prompt_embeds": te(ids)[0].repeat(2, 1, 1)}
            else:
                lat, emb = lat_cached, cond
        noise = torch.randn_like(lat[:pairs]).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (pairs,), device=dev).repeat(2)
        if flow:
            s = (t.float() / 1000).view(-1, 1, 1, 1)
            noisy, target = (1 - s) * lat + s * noise, noise - lat
        else:
            a = ab[t].view(-1, 1, 1, 1)
            noisy, target = a.sqrt() * lat + (1 - a).sqrt() * noise, noise
        with autocast:
            pred = forward(net, noisy, t, emb)
            with torch.no_grad():
                if ref is None:
                    net.disable_adapters()
                    rp = forward(net, noisy, t, emb)
                    net.enable_adapters()
                else:
                    rp = forward(ref, noisy.to(dtype), t, emb)
        loss = dpo_loss(pred, rp, target, 5000.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def release() -> None:
        nonlocal net, ref, vae, te, opt
        net = ref = vae = te = opt = None

    return step, release


__all__ = ["dpo_loss", "reference_step"]

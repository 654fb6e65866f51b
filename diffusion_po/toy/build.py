"""Pretrain the toy world's base text-to-image model: a real `StableDiffusionPipeline` folder.

Three stages, all on the CPU and deterministic from the seed:

1. a small `AutoencoderKL` (32x32x3 <-> 8x8x4) trained on rendered toy images (MSE + L1 + a light KL);
   its `scaling_factor` is set to 1 / std of the latents;
2. the latents of `n_images` toy images are encoded once (posterior mean and std);
3. a ~4M-parameter `UNet2DConditionModel` and a small `CLIPTextModel` (real CLIP tokenizer) are trained
   jointly on the epsilon objective (min-SNR-5 weighting), with 10% empty captions for classifier-free
   guidance and an EMA of both, which is what gets saved.

`build_base(out, BuildConfig(...))` writes the pipeline (UNet and VAE weights stored in fp16 to keep the
shipped folder small; they load as fp32) plus `toy_build.json` with the configuration and timings.
`ensure_base()` returns the shipped model (`diffusion_po/toy/assets/base`), or builds and caches one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusion_po.toy import world

ASSET_DIR = Path(__file__).parent / "assets" / "base"
COMPOSITIONAL_ASSET_DIR = Path(__file__).parent / "assets" / "compositional"
COMPOSITIONAL_STEPS = 3000
WORLDS = ("simple", "compositional")


@dataclass
class BuildConfig:
    """Everything that determines the base model (the shipped one used the defaults)."""

    seed: int = 0
    n_images: int = 40000
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    """Weight of the KL term (summed over latent elements) relative to the per-pixel mean reconstruction loss."""
    steps: int = 3000
    batch: int = 32
    lr: float = 6e-4
    warmup: int = 200
    ema_decay: float = 0.999
    cond_drop: float = 0.1
    min_snr_gamma: float = 5.0
    unet_channels: tuple[int, ...] = (32, 64, 128)
    text_hidden: int = 32
    text_layers: int = 2
    threads: int = 1
    checkpoint_every: int = 500
    world: str = "simple"
    """Which toy world's images and captions: "simple" (`world`) or "compositional" (`compositional`)."""
    caption_split: str | None = None
    """Train only on captions of this split (e.g. "train"), so held-out captions are new compositions."""
    lr_schedule: str = "cosine"
    """"cosine" (decays over `steps`) or "constant" (after warmup): with "constant" the model after k steps
    does not depend on `steps`, so a snapshot at step k is exactly the build with `steps=k`."""
    snapshot_every: int = 0
    """Also save the EMA model every this many steps under `snapshots/step-N` (0: never)."""

    @classmethod
    def compositional(cls, seed: int = 0) -> BuildConfig:
        """The shipped compositional base (`assets/compositional`): trained on the train split's captions only,
        and briefly, so it gets about half of the compositional attributes right."""
        return cls(seed=seed, world="compositional", caption_split="train", lr_schedule="constant",
                   steps=COMPOSITIONAL_STEPS)

    @classmethod
    def small(cls, seed: int = 0) -> BuildConfig:
        """A reduced build for tests (seconds, not an hour)."""
        return cls(seed=seed, n_images=64, vae_steps=4, vae_batch=8, steps=4, batch=8, warmup=1,
                   unet_channels=(32, 64, 64), checkpoint_every=10**9)


def _log(msg: str, log_file: Path | None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if log_file is not None:
        with log_file.open("a") as fh:
            fh.write(line + "\n")


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=world.RESOLUTION,
    )


def make_unet(channels: tuple[int, ...], cross_dim: int):
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=world.RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_dim, attention_head_dim=32, norm_num_groups=16,
    )


def make_text_encoder(hidden: int, layers: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def render_dataset(n: int, seed: int, which: str = "simple",
                   split: str | None = None) -> tuple[torch.Tensor, list[str]]:
    """`n` toy images of world `which` as uint8 (n, 3, H, W) and their captions (from `split` when given)."""
    from tqdm.auto import tqdm

    from diffusion_po.toy import compositional

    if which not in WORLDS:
        raise ValueError(f"unknown toy world {which!r}; choose one of {', '.join(WORLDS)}")
    if which == "simple" and split is not None:
        raise ValueError("caption_split is only supported for the compositional world")
    rng = random.Random(seed)
    images = np.empty((n, world.RESOLUTION, world.RESOLUTION, 3), dtype=np.uint8)
    captions = []
    for i in tqdm(range(n), desc="render toy images", mininterval=5, disable=n < 2000):
        if which == "simple":
            scene = world.sample_scene(rng)
            images[i] = np.asarray(world.render(scene))
        else:
            scene = compositional.sample_scene(rng, split)
            images[i] = np.asarray(compositional.render(scene))
        captions.append(scene.caption)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def to_pixels(uint8: torch.Tensor) -> torch.Tensor:
    return uint8.float() / 127.5 - 1.0


def train_vae(images: torch.Tensor, cfg: BuildConfig, log_file: Path | None = None):
    """Train the autoencoder; returns it (eval mode) with `scaling_factor` set."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    vae.train()
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=5, disable=cfg.vae_steps < 50)
    for step in bar:
        lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.vae_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)
        x = to_pixels(images[idx])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == cfg.vae_steps - 1:
            _log(f"vae step {step} loss {loss.item():.4f} mse {F.mse_loss(rec, x).item():.4f} kl {kl.item():.1f}", log_file)
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(to_pixels(images[i : i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def _tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def build_base(out: str | Path, cfg: BuildConfig | None = None, log_file: str | Path | None = None) -> Path:
    """Pretrain the toy base model from `cfg.seed` and save the diffusers pipeline folder at `out`."""
    import tempfile

    from tqdm.auto import tqdm
    from transformers import CLIPTokenizer

    from diffusion_po.tiny import save_clip_tokenizer

    cfg = cfg or BuildConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = Path(log_file) if log_file else out / "build.log"
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    try:
        _log(f"toy build: {dataclasses.asdict(cfg)}", log)
        if cfg.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {cfg.lr_schedule!r}")
        images, captions = render_dataset(cfg.n_images, cfg.seed, cfg.world, cfg.caption_split)
        t0 = time.perf_counter()
        stage = out / "_stage_vae"
        stage_key = json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                if k.startswith(("vae", "seed", "n_")) or k in ("world", "caption_split")})
        if (stage / "key.json").is_file() and (stage / "key.json").read_text() == stage_key:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(stage).eval().requires_grad_(False)
            _log(f"reusing the trained autoencoder in {stage}", log)
        else:
            vae = train_vae(images, cfg, log)
            if cfg.checkpoint_every < cfg.steps:
                vae.save_pretrained(stage)
                (stage / "key.json").write_text(stage_key)
        vae_seconds = time.perf_counter() - t0
        means, stds = encode_dataset(vae, images)
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        sample = means + stds * torch.randn(means.shape, generator=gen)
        scaling = float(1.0 / sample.std())
        vae.register_to_config(scaling_factor=scaling)
        with torch.no_grad():
            rec = vae.decode(means[:128]).sample
        vae_mse = float(F.mse_loss(rec, to_pixels(images[:128])))
        _log(f"vae: {vae_seconds:.0f}s, reconstruction mse {vae_mse:.4f}, scaling_factor {scaling:.4f}", log)

        with tempfile.TemporaryDirectory() as tmp:
            save_clip_tokenizer(tmp)
            tokenizer = CLIPTokenizer.from_pretrained(tmp)
        torch.manual_seed(cfg.seed + 3)
        text_encoder = make_text_encoder(cfg.text_hidden, cfg.text_layers)
        unet = make_unet(cfg.unet_channels, cfg.text_hidden)
        scheduler = make_scheduler()
        n_params = sum(p.numel() for p in unet.parameters())
        _log(f"unet: {n_params / 1e6:.2f}M parameters; text encoder hidden {cfg.text_hidden} x {cfg.text_layers}", log)
        ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
        unet.train()
        text_encoder.train()
        opt = torch.optim.AdamW([
            {"params": list(unet.parameters()), "weight_decay": 1e-2},
            {"params": list(text_encoder.parameters()), "weight_decay": 0.0},
        ], lr=cfg.lr)
        alphas = scheduler.alphas_cumprod.float()
        snr = alphas / (1 - alphas)
        loss_weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
        token_ids = _tokenize(tokenizer, captions)
        empty_ids = _tokenize(tokenizer, [""])[0]
        t0 = time.perf_counter()
        running = []
        bar = tqdm(range(cfg.steps), desc="unet", mininterval=10, disable=cfg.steps < 50)
        for step in bar:
            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
            if cfg.lr_schedule == "cosine":
                lr *= 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.steps))) * 0.9 + 0.1
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.randint(0, len(images), (cfg.batch,), generator=gen)
            x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
            ids = token_ids[idx].clone()
            drop = torch.rand(cfg.batch, generator=gen) < cfg.cond_drop
            ids[drop] = empty_ids
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, len(alphas), (cfg.batch,), generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            cond = text_encoder(ids)[0]
            pred = unet(x_t, t, cond).sample
            per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
            loss = (per * loss_weight[t]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
            opt.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            _ema_update(ema_unet, unet, decay)
            _ema_update(ema_text, text_encoder, decay)
            running.append(float(per.detach().mean()))
            if (step + 1) % 100 == 0 or step == cfg.steps - 1:
                rate = (time.perf_counter() - t0) / (step + 1)
                _log(f"unet step {step + 1}/{cfg.steps} mse {np.mean(running):.4f} lr {lr:.2e} "
                     f"{rate:.2f}s/step, eta {(cfg.steps - step - 1) * rate / 60:.1f} min", log)
                running = []
            if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0 and step + 1 < cfg.steps:
                _save(out / "snapshots" / f"step-{step + 1}", ema_unet, vae, ema_text, tokenizer, scheduler)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                _save(out / "partial", ema_unet, vae, ema_text, tokenizer, scheduler)
        unet_seconds = time.perf_counter() - t0
        _save(out, ema_unet, vae, ema_text, tokenizer, scheduler)
        import shutil

        for leftover in ("partial", "_stage_vae"):
            if (out / leftover).exists():
                shutil.rmtree(out / leftover)
        info = {
            "config": dataclasses.asdict(cfg), "vae_seconds": round(vae_seconds, 1),
            "unet_seconds": round(unet_seconds, 1), "total_seconds": round(time.perf_counter() - started, 1),
            "vae_reconstruction_mse": vae_mse, "scaling_factor": scaling, "unet_parameters": n_params,
            "torch": torch.__version__,
        }
        (out / "toy_build.json").write_text(json.dumps(info, indent=2))
        _log(f"saved {out} ({info['total_seconds']:.0f}s)", log)
        return out
    finally:
        torch.set_num_threads(prev_threads)


def _save(folder: Path, unet, vae, text_encoder, tokenizer, scheduler) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=copy.deepcopy(unet).to(torch.float16), vae=copy.deepcopy(vae).to(torch.float16),
        text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    classic_text_encoder_keys(Path(folder) / "text_encoder" / "model.safetensors")


def classic_text_encoder_keys(path: Path) -> None:
    """Write the CLIP text encoder's weights under `text_model.`, the layout of every SD checkpoint: transformers
    5 saves a fresh CLIPTextModel without the prefix, which transformers 4 would load as random weights."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as fh:
        weights = {k: fh.get_tensor(k) for k in fh.keys()}
    if all(k.startswith("text_model.") for k in weights):
        return
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()}, str(path),
              metadata={"format": "pt"})


def cache_dir() -> Path:
    root = os.environ.get("DIFFUSION_PO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "diffusion-po")
    return Path(root) / "toy"


def is_pipeline_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() and (path / "unet").is_dir()


def ensure_base(path: str | Path | None = None, cfg: BuildConfig | None = None, world_name: str | None = None) -> Path:
    """The base model folder: `path` if given, else the shipped one of toy world `world_name` (default: the
    compositional world), else a cached build of `cfg` (default: that world's shipped recipe; built if missing)."""
    if path is not None:
        p = Path(path)
        if not is_pipeline_folder(p):
            from diffusion_po.errors import ModelLoadError

            raise ModelLoadError(f"{p} is not a toy base model folder (no model_index.json / unet/); "
                                 "build one with `diffusion-po toy build --out DIR`")
        return p
    from diffusion_po.toy.worlds import get_world

    toy_world = get_world(cfg.world if cfg is not None and world_name is None else world_name)
    if cfg is None and is_pipeline_folder(toy_world.asset_dir):
        return toy_world.asset_dir
    cfg = cfg or toy_world.build_config()
    target = cache_dir() / cache_key(cfg)
    if not is_pipeline_folder(target):
        build_base(target, cfg)
    return target


def cache_key(cfg: BuildConfig) -> str:
    """The cache folder name of a build: the seed and a digest of the whole configuration."""
    digest = hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:10]
    prefix = "base" if cfg.world == "simple" else f"base-{cfg.world}"
    return f"{prefix}-seed{cfg.seed}-{digest}"


__all__ = ["ASSET_DIR", "COMPOSITIONAL_ASSET_DIR", "BuildConfig", "build_base", "cache_key", "ensure_base"]

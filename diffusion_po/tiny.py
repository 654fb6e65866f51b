"""Tiny random-initialised pipelines of each model family, saved in the standard diffusers layout.

They are built from configs (nothing is downloaded) and then loaded back through the normal
`from_pretrained` path, so tests exercise the same code as real checkpoints. The CLIP tokenizer is a
real `CLIPTokenizer` built from the BPE vocabulary that ships inside open_clip_torch.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch

FAMILIES = ("sd", "sdxl", "sd3")

#: written into every folder of random test weights (these pipelines, the tiny scorers of
#: diffusion_po.eval.testing), so that scores computed from them say so (`scores_meta.json`)
RANDOM_WEIGHTS_MARKER = "RANDOM_TEST_WEIGHTS"


def mark_random_weights(folder: str | Path) -> None:
    """Mark ``folder`` as holding random (untrained) test weights."""
    (Path(folder) / RANDOM_WEIGHTS_MARKER).write_text("random-initialised test weights: scores mean nothing\n")


def has_random_weights(path: str | Path) -> bool:
    """Whether ``path`` (a model folder, or a checkpoint file in one) was marked by :func:`mark_random_weights`."""
    p = Path(path).expanduser()
    folder = p if p.is_dir() else p.parent
    return p.exists() and (folder / RANDOM_WEIGHTS_MARKER).is_file()


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-to-unicode table of OpenAI's CLIP BPE (same in open_clip and transformers)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49408-token vocabulary and merges, read from open_clip's bundled `bpe_simple_vocab_16e6.txt.gz`."""
    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m.split()) for m in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    return {tok: i for i, tok in enumerate(vocab)}, merges


def save_clip_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> None:
    """Write a real CLIPTokenizer (vocab.json, merges.txt) to `folder`."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token)
    tok.model_max_length = 77
    tok.save_pretrained(folder)
    # transformers 5 saves only tokenizer.json; 4.x's (slow) CLIPTokenizer, which diffusers' pipelines load
    # there, needs vocab.json and merges.txt. Keep those two (half the size) and build the fast one from them.
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer.json").unlink(missing_ok=True)


def _clip_text_config(hidden: int, layers: int = 2, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _tiny_vae(latent_channels: int = 4, sample_size: int = 32, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=sample_size,
        **extra,
    )


def build_tiny_pipeline(family: str, seed: int = 0, resolution: int = 32, prediction_type: str = "epsilon"):
    """A random-initialised diffusers pipeline of `family` ('sd', 'sdxl' or 'sd3') with real classes."""
    import tempfile

    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        save_clip_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp)
    latent = resolution // 4
    if family == "sd":
        from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

        unet = UNet2DConditionModel(
            sample_size=latent,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=16,
        )
        scheduler = DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
            clip_sample=False, steps_offset=1,
        )
        return StableDiffusionPipeline(
            unet=unet, vae=_tiny_vae(sample_size=resolution), text_encoder=CLIPTextModel(_clip_text_config(32)),
            tokenizer=tokenizer, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sdxl":
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

        # text encoders 32 + 32 -> 64 cross-attention; pooled (32) + 6 time ids x 8 -> 80
        unet = UNet2DConditionModel(
            sample_size=latent,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=(4, 8),
            transformer_layers_per_block=(1, 1),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            use_linear_projection=True,
            norm_num_groups=16,
        )
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
            steps_offset=1, timestep_spacing="leading",
        )
        return StableDiffusionXLPipeline(
            unet=unet,
            vae=_tiny_vae(sample_size=resolution, force_upcast=True),
            text_encoder=CLIPTextModel(_clip_text_config(32)),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(32, projection=32)),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    if family == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        transformer = SD3Transformer2DModel(
            sample_size=latent,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            pos_embed_max_size=32,
        )
        vae = _tiny_vae(sample_size=resolution, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False)
        return StableDiffusion3Pipeline(
            transformer=transformer,
            vae=vae,
            text_encoder=CLIPTextModelWithProjection(_clip_text_config(32)),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(32)),
            text_encoder_3=None,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            tokenizer_3=None,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        )
    raise ValueError(f"unknown family '{family}'; choose one of {', '.join(FAMILIES)}")


def save_tiny_pipeline(family: str, folder: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build a tiny pipeline of `family` and save it (safetensors) in the diffusers layout at `folder`."""
    folder = Path(folder)
    pipe = build_tiny_pipeline(family, seed=seed, **kwargs)
    pipe.save_pretrained(folder, safe_serialization=True)
    mark_random_weights(folder)
    return folder

"""Tiny random-initialised pipelines of each model family, saved in the standard diffusers layout.

They are built from configs (nothing is downloaded) and then loaded back through the normal
`from_pretrained` path, so tests exercise the same code as real checkpoints. The CLIP tokenizer is a
real `CLIPTokenizer` built from the BPE vocabulary that ships inside open_clip_torch; the T5 tokenizer
(FLUX.1, SD3.5) is a real `T5TokenizerFast` (SentencePiece-style Unigram) over a small vocabulary written here.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch

FAMILIES = ("sd", "sdxl", "sd3", "sd35", "flux", "flux-schnell", "zimage")

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


#: whole-word pieces of the tiny T5 vocabulary (every other word is spelt from single characters)
_T5_WORDS = (
    "a", "an", "the", "of", "and", "in", "on", "with", "photo", "red", "blue", "green", "yellow", "black",
    "white", "circle", "square", "triangle", "cat", "dog", "car", "house", "tree", "small", "large", "blurry",
)


def save_t5_tokenizer(folder: str | Path, model_max_length: int = 512) -> None:
    """Write a real T5 tokenizer (`tokenizer.json`, Unigram with T5's `<pad>`=0, `</s>`=1, `<unk>`=2 layout)
    that `T5TokenizerFast.from_pretrained(folder)` loads. Lower-case ASCII text always tokenizes (characters
    are pieces); nothing is downloaded."""
    import string

    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in _T5_WORDS]
    vocab += [("\u2581" + c, -3.0) for c in string.ascii_lowercase + string.digits]
    vocab += [(c, -4.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab = list(dict(reversed(vocab)).items())[::-1]  # one entry per piece (the first score wins)
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tok.model_max_length = model_max_length
    tok.save_pretrained(str(folder))


def save_qwen_tokenizer(folder: str | Path, model_max_length: int = 512) -> None:
    """Write a real byte-level BPE `Qwen2Tokenizer` with Qwen's chat special tokens and a ChatML chat template
    (what Z-Image's `apply_chat_template` needs): every byte is a token, plus merges for the words of
    `_T5_WORDS`. Nothing is downloaded."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    for word in _T5_WORDS:
        piece = "\u0120"  # byte-level BPE's space
        for ch in word:
            if piece + ch not in vocab:
                merges.append((piece, ch))
                vocab[piece + ch] = len(vocab)
            piece += ch
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.model_max_length = model_max_length
    tok.save_pretrained(str(folder))


def _t5_encoder(d_model: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 2, d_ff=d_model * 2, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    ))


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
    """A random-initialised diffusers pipeline of `family` (one of `FAMILIES`) with real classes.

    'sd35' is SD3.5-medium style (dual-attention layers, RMS qk-norm, T5 present); 'flux' is FLUX.1-dev style
    (guidance embedding, dynamic resolution shift), 'flux-schnell' FLUX.1-schnell style (neither); 'zimage'
    Z-Image style (a decoder LLM, Qwen3, as text encoder; single-stream DiT; the FLUX VAE)."""
    import tempfile

    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"unknown family '{family}'; choose one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        save_clip_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp)
        save_t5_tokenizer(Path(tmp) / "t5")
        t5_tokenizer = T5TokenizerFast.from_pretrained(str(Path(tmp) / "t5"))
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
    if family in ("sd3", "sd35"):
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        sd35 = family == "sd35"
        # SD3.5-medium's transformer differs only by config: MMDiT-X dual attention and RMS qk-norm
        extra = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if sd35 else {}
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
            **extra,
        )
        vae = _tiny_vae(sample_size=resolution, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False)
        return StableDiffusion3Pipeline(
            transformer=transformer,
            vae=vae,
            text_encoder=CLIPTextModelWithProjection(_clip_text_config(32)),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(32)),
            # T5 hidden size = joint_attention_dim (the CLIP embeddings, 32 + 32, are padded to it)
            text_encoder_3=_t5_encoder(64, len(t5_tokenizer)) if sd35 else None,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            tokenizer_3=t5_tokenizer if sd35 else None,
            # SD3.5-medium's scheduler: static shift 3.0
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0 if sd35 else 1.0),
        )
    if family == "zimage":
        return _tiny_zimage(resolution)
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    dev = family == "flux"
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * 4,  # 16 latent channels in 2x2 packed patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 hidden size
        pooled_projection_dim=32,  # CLIP-L pooled size
        guidance_embeds=dev,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    vae = _flux_vae(resolution)
    # the released schedulers: dev shifts by resolution (mu), schnell uses a static shift of 1
    if dev:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=CLIPTextModel(_clip_text_config(32)),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(32, len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def _flux_vae(resolution: int):
    """FLUX.1's VAE (also Z-Image's): 16 channels, no quant convs, the released shift and scaling factors."""
    return _tiny_vae(16, sample_size=resolution, shift_factor=0.1159, scaling_factor=0.3611,
                     use_quant_conv=False, use_post_quant_conv=False)


def _tiny_zimage(resolution: int):
    """Z-Image style: Qwen3 text encoder (penultimate hidden states), `ZImageTransformer2DModel`, the FLUX VAE,
    Z-Image-Turbo's scheduler (static shift 3)."""
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    with tempfile.TemporaryDirectory() as tmp:
        save_qwen_tokenizer(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    ))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64],
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
        vae=_flux_vae(resolution), text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )


def save_tiny_pipeline(family: str, folder: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build a tiny pipeline of `family` and save it (safetensors) in the diffusers layout at `folder`."""
    folder = Path(folder)
    pipe = build_tiny_pipeline(family, seed=seed, **kwargs)
    pipe.save_pretrained(folder, safe_serialization=True)
    mark_random_weights(folder)
    return folder

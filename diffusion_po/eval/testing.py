"""Tiny random-initialised scorer models of the real classes, for tests and CPU throughput checks.

``build_tiny_models_root(root)`` writes a complete ``--models-root`` layout (PickScore_v1,
clip-vit-large-patch14, HPSv2/HPS_v2*.pt, aesthetic/...pth) whose files have the real formats but
tiny sizes; HPS needs the tiny architecture passed as ``hps_v2.1.arch=<root>/HPSv2/tiny-hps.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusion_po.tiny import mark_random_weights

TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 32, projection_dim: int = 16) -> Path:
    """A tiny ``CLIPModel`` + CLIP image processor + CLIP tokenizer saved as a transformers folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from diffusion_po.tiny import save_clip_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406,
            "eos_token_id": 49407, "pad_token_id": 49407, "hidden_act": "quick_gelu",
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": image_size, "patch_size": 8 if image_size <= 64 else 16, "hidden_act": "quick_gelu",
        },
        projection_dim=projection_dim,
    )
    model = CLIPModel(config)
    with torch.no_grad():  # a non-default scale so the logit-scale formula is actually exercised
        model.logit_scale.fill_(3.0)
    model.save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    save_clip_tokenizer(folder)
    mark_random_weights(folder)
    return folder


def save_tiny_open_clip_config(path: str | Path, image_size: int = 32) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(TINY_OPEN_CLIP_CONFIG))
    cfg["vision_cfg"]["image_size"] = image_size
    cfg["vision_cfg"]["patch_size"] = 8 if image_size <= 64 else 14
    path.write_text(json.dumps(cfg, indent=1))
    return path


def save_tiny_hps(
    folder: str | Path, filename: str = "HPS_v2.1_compressed.pt", seed: int = 0, image_size: int = 32
) -> tuple[Path, Path]:
    """A tiny open_clip model saved like ``HPS_v2*_compressed.pt`` (``{'state_dict': fp16 tensors}``).
    Returns (architecture config json, checkpoint)."""
    import open_clip

    folder = Path(folder)
    config = save_tiny_open_clip_config(folder / "tiny-hps.json", image_size)
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(config.stem, pretrained=None)
    state = {k: v.detach().half() for k, v in model.state_dict().items()}
    ckpt = folder / filename
    torch.save({"state_dict": state}, ckpt)
    mark_random_weights(folder)
    return config, ckpt


def save_tiny_aesthetic(path: str | Path, input_size: int = 16, seed: int = 0) -> Path:
    """An aesthetic-v2 head (keys ``layers.{0,2,4,6,7}``) for ``input_size``-d embeddings."""
    from diffusion_po.eval.scorers.hf_clip import build_aesthetic_mlp

    torch.manual_seed(seed)
    head = build_aesthetic_mlp(input_size)
    with torch.no_grad():
        for module in head:
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.3)
                module.bias.uniform_(-0.5, 0.5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, path)
    mark_random_weights(path.parent)
    return path


def build_tiny_models_root(root: str | Path, image_size: int = 32) -> Path:
    """A full ``--models-root`` layout with tiny models; returns ``root``. ``image_size=224`` gives the real
    preprocessing cost (224 crops) with tiny networks, for throughput checks of the scoring loop."""
    root = Path(root)
    save_tiny_clip(root / "PickScore_v1", seed=1, image_size=image_size)
    save_tiny_clip(root / "clip-vit-large-patch14", seed=2, image_size=image_size)
    save_tiny_hps(root / "HPSv2", "HPS_v2.1_compressed.pt", seed=3, image_size=image_size)
    save_tiny_hps(root / "HPSv2", "HPS_v2_compressed.pt", seed=4, image_size=image_size)
    save_tiny_aesthetic(root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", input_size=16, seed=5)
    return root


def tiny_checkpoint_options(root: str | Path) -> list[str]:
    """``--checkpoint`` items that point HPS at the tiny architecture of :func:`build_tiny_models_root`."""
    arch = Path(root) / "HPSv2" / "tiny-hps.json"
    return [f"hps_v2.1.arch={arch}", f"hps_v2.arch={arch}"]

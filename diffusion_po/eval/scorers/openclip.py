"""Scorers on open_clip_torch: HPSv2 / HPSv2.1 and the OpenCLIP CLIP cosine (Diffusion-DPO/DRO convention).

HPS re-implements ``hpsv2``'s benchmark scoring without the ``hpsv2`` package: the ViT-H-14 model is
built with ``pretrained=None`` (no base weights needed) and the full ``HPS_v2*_compressed.pt`` state
dict is loaded strictly. Preprocessing follows hpsv2's vendored open_clip "light augmentation" val
transform: RGB -> tensor -> bicubic resize of the longest side to 224 on the tensor (antialias on) ->
symmetric zero padding to 224x224 -> OpenAI mean/std. Score = ``100 * <i/|i|, t/|t|>``.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from diffusion_po.errors import ModelLoadError
from diffusion_po.eval.models import checkpoint_hash, resolve_dir, resolve_file
from diffusion_po.eval.scorers.base import Scorer, l2_normalize

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ResizeMaxSizeTransform:
    """hpsv2's val transform: longest side to ``size`` (tensor bicubic, antialias), zero-pad to a square."""

    def __init__(self, size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> None:
        self.size = int(size)
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        # == TF.to_tensor (bit-exact), without its slow contiguous uint8 copy
        x = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        height, width = x.shape[1:]
        scale = self.size / float(max(height, width))
        if scale != 1.0:
            new_size = [round(height * scale), round(width * scale)]
            x = TF.resize(x, new_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            pad_h = self.size - new_size[0]
            pad_w = self.size - new_size[1]
            x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        return TF.normalize(x, self.mean, self.std)


def _open_clip_version() -> str:
    import open_clip

    return getattr(open_clip, "__version__", "unknown")


def resolve_arch(arch: str) -> str:
    """A built-in open_clip model name, or a path to a model-config JSON (registered under its stem)."""
    import open_clip

    path = Path(arch)
    if arch.endswith(".json"):
        if not path.is_file():
            raise ModelLoadError(f"open_clip model config {arch} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(arch) is None:
        raise ModelLoadError(f"unknown open_clip architecture '{arch}' (and not a .json model config)")
    return arch


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A weights-only ``torch.load`` of an open_clip checkpoint: ``{'state_dict': ...}`` or a bare state dict."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{what}: {path} is not a weights-only checkpoint (it pickles other objects). For HPS use "
            "HPS_v2_compressed.pt / HPS_v2.1_compressed.pt, not the 8 GB HPS_v2.pt"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"{what}: could not read {path}: {exc}") from exc
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ModelLoadError(f"{what}: {path} does not contain a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def load_open_clip_strict(arch: str, state: dict[str, torch.Tensor], what: str, source: Path) -> Any:
    """Build ``arch`` with ``pretrained=None`` and load ``state`` strictly (clear error on any mismatch)."""
    import open_clip

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly": the weights follow below
    try:
        model = open_clip.create_model(arch, pretrained=None, precision="fp32", device="cpu")
    finally:
        logging.disable(previous)
    state = dict(state)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    state.pop("text.transformer.embeddings.position_ids", None)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} with wrong shapes (e.g. {k}: checkpoint {tuple(state[k].shape)} vs model "
                f"{tuple(expected[k].shape)})"
            )
        raise ModelLoadError(
            f"{what}: {source} does not match the open_clip architecture '{arch}': {'; '.join(parts)}. "
            "Wrong checkpoint or wrong --checkpoint hps.arch?"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False)


class _OpenClipScorer(Scorer):
    """Shared parts: an open_clip model, its tokenizer and the ResizeMaxSize transform."""

    def _setup(self, model: Any, tokenizer: Any, mean: Sequence[float], std: Sequence[float]) -> None:
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._transform = ResizeMaxSizeTransform(self.image_size, mean, std)
        self.transform_id = f"resize-max:{self.image_size}:{tuple(mean)}:{tuple(std)}"

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self._transform

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        with self.autocast():
            return self.model.encode_text(tokens)

    def cosine(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        with self.autocast():
            img = self.model.encode_image(pixels.to(self.device))
        img = l2_normalize(img.float())
        txt = self.cached_text_features(prompts, self.encode_text)
        return (img * txt).sum(-1)


class HPSScorer(_OpenClipScorer):
    """HPSv2 (``hps_v2``) or HPSv2.1 (``hps_v2.1``): ``100 * cos`` with an open_clip ViT-H-14."""

    def __init__(
        self,
        version: str = "v2.1",
        checkpoint: str | None = None,
        models_root: str | None = None,
        arch: str = "ViT-H-14",
        device: str | None = None,
        dtype: str = "fp32",
    ) -> None:
        super().__init__(device, dtype)
        if version not in ("v2.0", "v2", "v2.1"):
            raise ValueError(f"HPS version must be 'v2.0' or 'v2.1', got {version!r}")
        key = "hps_v2.1" if version == "v2.1" else "hps_v2"
        self.name = key
        self.metrics = (key,)
        path = resolve_file(key, checkpoint, models_root)
        import open_clip

        arch_name = resolve_arch(arch)
        state = read_state_dict(path, key)
        model = load_open_clip_strict(arch_name, state, key, path)
        self._setup(model, open_clip.get_tokenizer(arch_name), OPENAI_MEAN, OPENAI_STD)
        self.checkpoint = str(path)
        self.checkpoint_hash = checkpoint_hash(path)
        self.version = f"hps-{'v2.1' if key == 'hps_v2.1' else 'v2.0'}/{arch_name} open_clip-{_open_clip_version()}"

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {self.metrics[0]: 100.0 * self.cosine(pixels, prompts)}


class OpenClipScoreScorer(_OpenClipScorer):
    """CLIP cosine with an OpenCLIP model (default ViT-H-14 laion2B, the Diffusion-DPO/DRO "CLIP" column),
    plus ``100 * max(cos, 0)``; the backbone is in the metric names."""

    name = "clip_openclip"

    def __init__(
        self,
        checkpoint: str | None = None,
        models_root: str | None = None,
        device: str | None = None,
        dtype: str = "fp32",
    ) -> None:
        super().__init__(device, dtype)
        import open_clip

        path = resolve_dir("clip_openclip", checkpoint, models_root)
        if not (path / "open_clip_config.json").is_file():
            raise ModelLoadError(f"clip_openclip: {path} has no open_clip_config.json (an OpenCLIP hub folder)")
        if not any(any(path.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth")):
            raise ModelLoadError(f"clip_openclip: {path} has no weights (open_clip_model.safetensors or "
                                 "open_clip_pytorch_model.bin); open_clip would build a random model")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
            tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"clip_openclip: could not load the OpenCLIP model in {path}: {exc}") from exc
        mean = getattr(model.visual, "image_mean", None) or OPENAI_MEAN
        std = getattr(model.visual, "image_std", None) or OPENAI_STD
        self._setup(model.eval().requires_grad_(False), tokenizer, mean, std)
        backbone = Path(str(checkpoint).rstrip("/")).name.lower() if checkpoint else "clip-vit-h-14-laion2b-s32b-b79k"
        self.metrics = (f"clip_cos@{backbone}", f"clip_score@{backbone}")
        self.checkpoint = str(path)
        self.checkpoint_hash = checkpoint_hash(path)
        self.version = f"clip-cos/openclip-resize-max open_clip-{_open_clip_version()}"

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        cos = self.cosine(pixels, prompts)
        return {self.metrics[0]: cos, self.metrics[1]: 100.0 * cos.clamp_min(0.0)}

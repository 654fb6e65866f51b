"""The common scorer interface.

A scorer loads its model once and scores batches of (image, prompt) pairs. Images are turned into
tensors by :meth:`Scorer.image_transform` -- a light, picklable callable that the scoring loop runs in
DataLoader workers -- and the tensors are scored in batches by :meth:`Scorer.score_pixels`. Text
embeddings are cached per prompt, since every prompt is scored for several images and both models.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from diffusion_po import __version__
from diffusion_po.tiny import has_random_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def as_embedding(output: Any) -> torch.Tensor:
    """Unwrap ``get_image_features``/``get_text_features`` output: a tensor in transformers 4.x, a
    ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the projected embedding in transformers 5."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot read an embedding from {type(output).__name__}")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)


def flatten_on_white(image: Image.Image) -> Image.Image:
    """The one rule for transparent images, for every scorer and `eval parity`: composite on white (as
    transformers 5's CLIP processor does), then RGB. Opaque images are only converted to RGB."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.copy() if image.mode == "RGB" else image.convert("RGB")  # a loaded copy, not the lazy file


def check_checkpoint_covers(module: torch.nn.Module, state: dict[str, Any], what: str, path: Any) -> None:
    """A ModelLoadError when `state` lacks weights of `module` (a truncated or wrong checkpoint that a
    `load_state_dict(strict=False)` would load silently, leaving those weights random)."""
    from diffusion_po.errors import ModelLoadError

    names = [n for n, _ in module.named_parameters()]
    missing = [n for n in names if n not in state]
    if missing:
        raise ModelLoadError(
            f"{what}: {path} lacks {len(missing)} of the model's {len(names)} weights (e.g. "
            f"{', '.join(missing[:3])}): a truncated or wrong checkpoint; download it again"
        )


class Scorer(ABC):
    """Base class. Subclasses set ``name``, ``metrics`` (first = primary), ``version``, ``checkpoint``
    and ``checkpoint_hash`` and implement :meth:`image_transform` and :meth:`score_pixels`."""

    name: str = ""
    metrics: tuple[str, ...] = ()
    version: str = ""
    checkpoint: str = ""
    checkpoint_hash: str = ""
    #: scorers with the same transform_id share one preprocessed tensor in the scoring loop
    transform_id: str = ""
    #: higher is better for every metric of this scorer
    higher_is_better: bool = True

    def __init__(self, device: str | torch.device | None = None, dtype: str = "fp32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.device = resolve_device(device)
        self.dtype_name = dtype
        self._text_cache: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- to implement
    @abstractmethod
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """Callable mapping one decoded PIL image to a (C, H, W) float tensor."""

    @abstractmethod
    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Scores of a batch of preprocessed images and their prompts: metric -> (B,) tensor."""

    # ---------------------------------------------------------------- helpers
    @property
    def primary(self) -> str:
        return self.metrics[0]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype_name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.dtype_name])

    def cached_text_features(
        self, prompts: Sequence[str], encode: Callable[[list[str]], torch.Tensor]
    ) -> torch.Tensor:
        """Normalised text embeddings for ``prompts``, encoding only prompts not seen before."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            if len(self._text_cache) + len(missing) > 50_000:  # bound memory on huge prompt sets
                self._text_cache.clear()
                missing = list(dict.fromkeys(prompts))
            feats = l2_normalize(encode(missing).float()).cpu()
            for p, f in zip(missing, feats):
                self._text_cache[p] = f
        return torch.stack([self._text_cache[p] for p in prompts]).to(self.device)

    def info(self) -> dict[str, Any]:
        """What identifies these scores: written next to every score file."""
        return {
            "scorer": self.name,
            "metrics": list(self.metrics),
            "primary": self.primary,
            "version": self.version,
            "checkpoint": self.checkpoint,
            "checkpoint_hash": self.checkpoint_hash,
            "dtype": self.dtype_name,
            "diffusion_po": __version__,
            # tiny random-initialised test models (diffusion_po.eval.testing): their scores mean nothing
            "random_weights": any(has_random_weights(p) for p in self.checkpoint.split(" + ") if p),
        }

    # ---------------------------------------------------------------- convenience API
    @torch.inference_mode()
    def score_all(self, images: Sequence[Image.Image], prompts: Sequence[str] | str) -> dict[str, list[float]]:
        """All metrics for in-memory PIL images (one prompt per image, or one prompt for all)."""
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not images:
            return {m: [] for m in self.metrics}
        transform = self.image_transform()
        pixels = torch.stack([transform(flatten_on_white(img)) for img in images])
        out = self.score_pixels(pixels, list(prompts))
        return {k: v.detach().float().cpu().tolist() for k, v in out.items()}

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str] | str) -> list[float]:
        """The primary metric for in-memory PIL images."""
        return self.score_all(images, prompts)[self.primary]

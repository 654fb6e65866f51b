"""The toy worlds' oracles as `eval score` metrics (`--metrics toy` for the simple world, `--metrics
toy_compositional` for the compositional one), and so as rewards of the online methods.

The oracle is a deterministic function of pixels and caption (`diffusion_po.toy.oracle`): no weights, no
network, so `diffusion-po eval generate/score/compare/report` runs offline on toy-world images. Its version
and checkpoint hash are those of the oracle's source, so scores are redone when the oracle changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion_po.errors import DataError
from diffusion_po.eval.scorers.base import Scorer
from diffusion_po.toy import compositional, compositional_oracle, oracle, world

#: the oracle's parts written per image; the first (the reward) is the primary metric
TOY_METRICS = ("toy_reward", "toy_colour", "toy_shape", "toy_size", "toy_position", "toy_clean",
               "toy_colour_ok", "toy_shape_ok", "toy_size_ok", "toy_position_ok")


def _to_pixels(image: Image.Image) -> torch.Tensor:
    """(3, 32, 32) float tensor in [0, 255], exactly the array the oracle scores."""
    return torch.from_numpy(oracle.to_array(image).astype(np.float32)).permute(2, 0, 1)


class ToyOracleScorer(Scorer):
    """Oracle reward and caption-following sub-scores of toy-world images (prompts must be toy captions)."""

    name = "toy"
    metrics = TOY_METRICS
    transform_id = "toy_rgb32"

    def __init__(self, device: str | torch.device | None = "cpu", dtype: str = "fp32") -> None:
        super().__init__(device="cpu", dtype=dtype)  # pure numpy: the device is always the CPU
        source = Path(oracle.__file__).read_bytes()
        self.checkpoint = "diffusion_po.toy.oracle (deterministic, no weights)"
        self.checkpoint_hash = "sha256:" + hashlib.sha256(source).hexdigest()
        self.version = "oracle-" + self.checkpoint_hash[7:19]

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return _to_pixels

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        arrays = pixels.detach().cpu().round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        results = []
        for arr, prompt in zip(arrays, prompts):
            try:
                spec = world.parse_caption(prompt)
            except ValueError as exc:
                raise DataError(f"metric toy: {exc}; score toy-world runs only "
                                "(prompts from `diffusion-po toy prompts`)") from exc
            results.append(oracle.score(arr, spec).to_dict())
        return {m: torch.tensor([r[m[4:]] for r in results], dtype=torch.float64) for m in self.metrics}


#: the compositional oracle's outputs per image: the reward (primary), the share of the caption's parts right,
#: and whether the whole caption is right (the parts differ by caption: `diffusion-po toy eval` breaks them down)
TOY_COMPOSITIONAL_METRICS = ("toyc_reward", "toyc_share_ok", "toyc_correct")


class ToyCompositionalScorer(ToyOracleScorer):
    """The compositional world's oracle (prompts must be compositional toy captions)."""

    name = "toy_compositional"
    metrics = TOY_COMPOSITIONAL_METRICS

    def __init__(self, device: str | torch.device | None = "cpu", dtype: str = "fp32") -> None:
        super().__init__(device=device, dtype=dtype)
        source = Path(compositional_oracle.__file__).read_bytes() + Path(oracle.__file__).read_bytes()
        self.checkpoint = "diffusion_po.toy.compositional_oracle (deterministic, no weights)"
        self.checkpoint_hash = "sha256:" + hashlib.sha256(source).hexdigest()
        self.version = "oracle-" + self.checkpoint_hash[7:19]

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        arrays = pixels.detach().cpu().round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        rows = []
        for arr, prompt in zip(arrays, prompts):
            try:
                spec = compositional.parse_caption(prompt)
            except ValueError as exc:
                raise DataError(f"metric toy_compositional: {exc}; score compositional toy-world runs only "
                                "(prompts from `diffusion-po toy prompts`)") from exc
            r = compositional_oracle.score(arr, spec)
            rows.append([r.reward, r.share_ok, float(r.correct)])
        return {m: torch.tensor([row[i] for row in rows], dtype=torch.float64) for i, m in enumerate(self.metrics)}

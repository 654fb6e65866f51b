"""The toy worlds' oracles as `eval score` metrics (`--metrics toy` for the simple world, `--metrics
toy_compositional` for the compositional one), and so as rewards of the online methods.

The oracle is a deterministic function of pixels and caption (`diffusion_po.toy.oracle`): no weights, no
network, so `diffusion-po eval generate/score/compare/report` runs offline on toy-world images. Its version
and checkpoint hash are those of the oracle's source, so scores are redone when the oracle changes.

A reward with a known bias (for the online methods' demonstration that curation amplifies a reward model's
biases, `diffusion-po toy online --bias red:0.3`): the options `bias_colour` and `bias_weight` add

    bias_weight x (the share of the image's foreground pixels in bias_colour, `oracle.colour_fraction`)

to the reward metric (only: the other metrics stay the oracle's); the version names the bias.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusion_po.errors import ConfigError, DataError
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

    def __init__(self, device: str | torch.device | None = "cpu", dtype: str = "fp32", bias_colour: str | None = None,
                 bias_weight: float = 0.0) -> None:
        super().__init__(device="cpu", dtype=dtype)  # pure numpy: the device is always the CPU
        self._set_source("diffusion_po.toy.oracle", Path(oracle.__file__).read_bytes())
        if bias_colour is not None and bias_colour not in world.COLOURS:
            raise ConfigError(f"{self.name} option bias_colour '{bias_colour}': choose one of {', '.join(world.COLOURS)}")
        try:
            weight = float(bias_weight)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.name} option bias_weight '{bias_weight}' must be a number") from None
        if not np.isfinite(weight) or (weight != 0.0 and bias_colour is None):
            raise ConfigError(f"{self.name} option bias_weight {bias_weight}: give a finite number together with "
                              "bias_colour")
        self.bias_colour, self.bias_weight = bias_colour, weight
        if self.biased:
            self.version += f"+bias-{bias_colour}-{weight:g}"

    def _set_source(self, module: str, source: bytes) -> None:
        """Checkpoint and version from the oracle's source (scores are redone when it changes)."""
        self.checkpoint = f"{module} (deterministic, no weights)"
        self.checkpoint_hash = "sha256:" + hashlib.sha256(source).hexdigest()
        self.version = "oracle-" + self.checkpoint_hash[7:19]

    @property
    def biased(self) -> bool:
        return self.bias_colour is not None and self.bias_weight != 0.0

    def bias(self, image: np.ndarray | Image.Image) -> float:
        """What the bias adds to one image's reward (0 without a bias)."""
        if not self.biased:
            return 0.0
        return self.bias_weight * oracle.colour_fraction(image, self.bias_colour, of_foreground=True)

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return _to_pixels

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        arrays = pixels.detach().cpu().round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        rows = []
        for arr, prompt in zip(arrays, prompts):
            try:
                spec = self.parse(prompt)
            except ValueError as exc:
                raise DataError(f"metric {self.name}: {exc}; score {self.world_label} runs only "
                                "(prompts from `diffusion-po toy prompts`)") from exc
            rows.append(self.score_image(arr, spec))
        return {m: torch.tensor([r[m] for r in rows], dtype=torch.float64) for m in self.metrics}

    world_label = "toy-world"

    def parse(self, prompt: str) -> Any:
        """The prompt as this world's caption (a ValueError when it is not one)."""
        return world.parse_caption(prompt)

    def score_image(self, arr: np.ndarray, spec: Any) -> dict[str, float]:
        """Every metric of one image (the bias added to the reward)."""
        result = oracle.score(arr, spec).to_dict()
        result["reward"] += self.bias(arr)
        return {m: result[m[4:]] for m in self.metrics}


#: the compositional oracle's outputs per image: the reward (primary), the share of the caption's parts right,
#: and whether the whole caption is right (the parts differ by caption: `diffusion-po toy eval` breaks them down)
TOY_COMPOSITIONAL_METRICS = ("toyc_reward", "toyc_share_ok", "toyc_correct")


class ToyCompositionalScorer(ToyOracleScorer):
    """The compositional world's oracle (prompts must be compositional toy captions)."""

    name = "toy_compositional"
    metrics = TOY_COMPOSITIONAL_METRICS

    def _set_source(self, module: str, source: bytes) -> None:
        super()._set_source("diffusion_po.toy.compositional_oracle",
                            Path(compositional_oracle.__file__).read_bytes() + source)

    world_label = "compositional toy-world"

    def parse(self, prompt: str) -> Any:
        return compositional.parse_caption(prompt)

    def score_image(self, arr: np.ndarray, spec: Any) -> dict[str, float]:
        r = compositional_oracle.score(arr, spec)
        return {"toyc_reward": r.reward + self.bias(arr), "toyc_share_ok": r.share_ok, "toyc_correct": float(r.correct)}

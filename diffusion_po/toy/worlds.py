"""The two toy worlds behind one interface, so every toy experiment (the main job, `toy method`, `toy compare`,
the online runs) runs on either.

- `compositional` (the default): counts, two objects with their own colours, spatial relations, sizes and
  "without X" (`toy.compositional`, scored part by part by `toy.compositional_oracle`); its shipped base
  (`assets/compositional`) was trained on train-split captions only, so held-out captions are new compositions.
- `simple`: one or two shapes with colour, size and position (`toy.world`, scored by `toy.oracle`); its
  shipped base is `assets/base`.

`get_world(name)` returns one; each has `prompts(n, seed, split)`, `score(image, caption)` (a result with
`.reward` and `.to_dict()`), `summarize(results)`, `describe(image, caption)`, `result_from_dict`,
`expert_images(captions)`, the report's rows (`report_parts`) and the validation curve's keys (`curve_keys`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

WORLD_NAMES = ("compositional", "simple")
DEFAULT_WORLD = "compositional"


class ToyWorld:
    """What a toy experiment needs of a world (the subclasses fill it in)."""

    name: str = ""
    asset_dir: Path
    scorer_metric: str = ""
    """The `eval score --metrics` name of this world's oracle (also the online methods' `reward.name`)."""
    report_parts: tuple[tuple[str, str], ...] = ()
    """(key of `summarize`, label) rows of the report's table."""
    curve_keys: tuple[str, ...] = ()
    """`summarize` keys kept per checkpoint in the validation curve (besides the reward)."""
    accuracy_key: str = ""
    """The `summarize` key of the caption accuracy that the reports' accuracy gain is measured on."""
    config_overlay: str | None = None
    """A shipped config applied over `configs/toy_dpo.yaml` (the compositional main job's) in this world."""
    pair_samples: int = 2
    """Images sampled per pair prompt in this world's main job (K > 2: the pair is the best and worst of K)."""
    captions_module: str = ""
    """The world's module (`split_captions`, `expert_images`), imported when first used (the CLI stays light)."""
    oracle_module: str = ""
    """Its oracle's module (`score`, `score_many`, `summarize`)."""

    def _captions(self) -> Any:
        return importlib.import_module(self.captions_module)

    def _oracle(self) -> Any:
        return importlib.import_module(self.oracle_module)

    def split_captions(self, split: str) -> list[str]:
        return self._captions().split_captions(split)

    def prompts(self, n: int, seed: int = 0, split: str = "test") -> list[str]:
        """`n` captions of `split`, shuffled by `seed`; cycles through the split when `n` exceeds it."""
        from diffusion_po.toy.world import shuffled_cycle

        return shuffled_cycle(self.split_captions(split), n, seed)

    def score(self, image: Image.Image | np.ndarray, caption: str) -> Any:
        return self._oracle().score(image, caption)

    def score_many(self, images: Sequence[Any], captions: Sequence[str]) -> list[Any]:
        return self._oracle().score_many(list(images), list(captions))

    def summarize(self, results: list[Any]) -> dict[str, float]:
        return self._oracle().summarize(results)

    def describe(self, image: Image.Image | np.ndarray, caption: str) -> str:
        """What the oracle sees in `image`, as a caption of the world's grammar (DCPO's per-image captions)."""
        raise NotImplementedError

    def result_from_dict(self, data: dict[str, Any]) -> Any:
        raise NotImplementedError

    def accuracy(self, result: Any) -> float:
        """One image's caption accuracy in [0, 1] (what `accuracy_key` names)."""
        return float(result.to_dict()[self.accuracy_key])

    def build_config(self, seed: int = 0) -> Any:
        """The `toy.build.BuildConfig` of this world's shipped base (with another seed)."""
        raise NotImplementedError

    def expert_images(self, captions: list[str], seed: int = 0) -> list[Image.Image]:
        """Drawings that satisfy `captions` exactly (the real data of the online runs)."""
        return self._captions().expert_images(captions, seed)


class SimpleWorld(ToyWorld):
    name = "simple"
    scorer_metric = "toy"
    report_parts = (("colour_ok", "colour right"), ("shape_ok", "shape right"), ("size_ok", "size right"),
                    ("position_ok", "position right"), ("clean", "clean / sharp"))
    curve_keys = ("colour_ok", "shape_ok")
    accuracy_key = "shape_ok"
    config_overlay = "toy_simple"
    pair_samples = 2
    captions_module = "diffusion_po.toy.world"
    oracle_module = "diffusion_po.toy.oracle"

    @property
    def asset_dir(self) -> Path:  # type: ignore[override]
        from diffusion_po.toy.build import ASSET_DIR

        return ASSET_DIR

    def describe(self, image: Image.Image | np.ndarray, caption: str) -> str:
        from diffusion_po.toy import oracle

        return oracle.describe(image, caption)

    def result_from_dict(self, data: dict[str, Any]) -> Any:
        from diffusion_po.toy import oracle

        return oracle.OracleResult(**data, shapes=[])

    def build_config(self, seed: int = 0) -> Any:
        from diffusion_po.toy.build import BuildConfig

        return BuildConfig(seed=seed)


class CompositionalWorld(ToyWorld):
    name = "compositional"
    scorer_metric = "toy_compositional"
    report_parts = (("share_ok", "attributes right"), ("correct", "whole caption right"),
                    ("count_ok", "count right"), ("colour_ok", "colours right"), ("shape_ok", "shapes right"),
                    ("binding_ok", "binding right"), ("relation_ok", "relation right"), ("size_ok", "sizes right"),
                    ("negation_ok", "negation right"))
    curve_keys = ("share_ok", "correct")
    accuracy_key = "share_ok"
    pair_samples = 4
    captions_module = "diffusion_po.toy.compositional"
    oracle_module = "diffusion_po.toy.compositional_oracle"

    @property
    def asset_dir(self) -> Path:  # type: ignore[override]
        from diffusion_po.toy.build import COMPOSITIONAL_ASSET_DIR

        return COMPOSITIONAL_ASSET_DIR

    def describe(self, image: Image.Image | np.ndarray, caption: str) -> str:
        from diffusion_po.toy import compositional_oracle

        return compositional_oracle.seen_caption(image, caption)

    def result_from_dict(self, data: dict[str, Any]) -> Any:
        from diffusion_po.toy.compositional_oracle import CompResult

        return CompResult.from_dict(data)

    def build_config(self, seed: int = 0) -> Any:
        from diffusion_po.toy.build import BuildConfig

        return BuildConfig.compositional(seed)


_WORLDS: dict[str, ToyWorld] = {"simple": SimpleWorld(), "compositional": CompositionalWorld()}


def get_world(name: str | ToyWorld | None = None) -> ToyWorld:
    """The toy world called `name` (default: the compositional one)."""
    if isinstance(name, ToyWorld):
        return name
    key = name or DEFAULT_WORLD
    if key not in _WORLDS:
        from diffusion_po.errors import UserError

        raise UserError(f"unknown toy world {key!r}; choose one of {', '.join(WORLD_NAMES)}")
    return _WORLDS[key]


__all__ = ["DEFAULT_WORLD", "WORLD_NAMES", "CompositionalWorld", "SimpleWorld", "ToyWorld", "get_world"]

"""Preference data loading (Pick-a-Pic, local pairs, DCPO, images, prompts) and caching.

The names below load `preference` (and numpy/torch) on first use, so the CLI's parsers stay fast."""

from __future__ import annotations

from typing import Any

__all__ = ["BadRow", "TrainData", "build_train_data", "collate", "decode_image", "load_rows"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from diffusion_po.data import preference

        return getattr(preference, name)
    raise AttributeError(f"module 'diffusion_po.data' has no attribute {name!r}")

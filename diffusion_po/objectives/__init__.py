"""Training methods, one module each, registered by name.

Each module holds a pure `loss(...)` over 1-D tensors of per-sample errors (fp32) returning
`(loss, metrics)`, and a `Method` subclass that builds the model inputs of a batch (noise, timesteps,
conditioning) through the `TrainContext` and calls that loss. Methods never own models.
"""

from __future__ import annotations

import importlib

from diffusion_po.errors import ConfigError
from diffusion_po.objectives.base import METHODS, Method, TrainContext, register_method

# modules that register methods; a new method adds its module name here
METHOD_MODULES = ["dpo", "npo", "self_npo", "dcpo", "dro", "kto", "mapo", "sft", "robust_dpo", "dpo_sft"]


def _import_all() -> None:
    for name in METHOD_MODULES:
        importlib.import_module(f"diffusion_po.objectives.{name}")


def get_method_class(name: str) -> type[Method]:
    _import_all()
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_names() -> list[str]:
    _import_all()
    return sorted(METHODS)


__all__ = ["METHODS", "Method", "TrainContext", "get_method_class", "method_names", "register_method"]

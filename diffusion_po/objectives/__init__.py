"""Training methods, one module each, registered by name (or loaded by dotted path, `mypkg.losses:IPO`).

Each module holds a pure `loss(...)` over 1-D tensors of per-sample errors (fp32) returning
`(loss, metrics)`, and a `Method` subclass that builds the model inputs of a batch (noise, timesteps,
conditioning) through the `TrainContext` and calls that loss. Methods never own models.
"""

from __future__ import annotations

import importlib

from diffusion_po.errors import ConfigError
from diffusion_po.objectives.base import METHODS, Method, TrainContext, register_method

# modules that register methods; a new method adds its module name here
METHOD_MODULES = ["dpo", "npo", "self_npo", "dcpo", "dro", "kto", "mapo", "sft", "robust_dpo", "dpo_sft", "curated",
                  "online_dpo"]


def _import_all() -> None:
    for name in METHOD_MODULES:
        importlib.import_module(f"diffusion_po.objectives.{name}")


def get_method_class(name: str) -> type[Method]:
    """A registered method by name, or a `Method` subclass outside the package by dotted path
    (`mypkg.losses:IPO`: the module is imported, so it must be on the Python path)."""
    if ":" in name:
        return _load_method(name)
    _import_all()
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}, "
                          "or a class by dotted path (module:Class)")
    return METHODS[name]


def _load_method(path: str) -> type[Method]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"method '{path}': a dotted path is module:Class, e.g. mypkg.losses:IPO")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"method '{path}': cannot import module '{module_name}' ({exc}); "
                          "is it on the Python path (PYTHONPATH)?") from exc
    cls = module
    for part in attr.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise ConfigError(f"method '{path}': module '{module_name}' has no '{attr}'")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method '{path}' is not a Method subclass (diffusion_po.objectives.Method)")
    return cls


def method_names() -> list[str]:
    _import_all()
    return sorted(METHODS)


__all__ = ["METHODS", "Method", "TrainContext", "get_method_class", "method_names", "register_method"]

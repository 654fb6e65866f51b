"""torch.compile helpers shared by training, sampling and the benchmark: a persistent compile cache per
model and settings, the compile counters, and undoing a compilation that failed.

The compile cache: inductor's FX-graph cache and AOT-autograd cache live under `TORCHINDUCTOR_CACHE_DIR`;
we point it at `<root>/<key>` where the key is a hash of the torch version, the network's class and
config, the compile settings and the dtype, so that a second run of the same model and config starts from
compiled kernels (the warm start) and different models never share a folder. Default root:
`$DIFFUSION_PO_COMPILE_CACHE` or `~/.cache/diffusion-po/compile`. A `TORCHINDUCTOR_CACHE_DIR` set by the
user is kept as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_ROOT = Path(os.environ.get("DIFFUSION_PO_COMPILE_CACHE", "~/.cache/diffusion-po/compile")).expanduser()


def cache_key(network: torch.nn.Module, settings: dict[str, Any]) -> str:
    """A short hash of what the compiled code depends on: torch, the network's class and config, settings."""
    config = getattr(network, "config", None)
    config = dict(config) if config is not None else {}
    payload = {"torch": torch.__version__, "class": type(network).__name__, "config": config, "settings": settings}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{type(network).__name__}-{digest}"


def use_compile_cache(network: torch.nn.Module, settings: dict[str, Any], root: str | Path | None = None) -> Path:
    """Point inductor's on-disk caches at this model's folder (unless the user set TORCHINDUCTOR_CACHE_DIR).
    Returns the folder in use."""
    user = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if user and not os.environ.get("_DIFFUSION_PO_SET_CACHE_DIR"):
        return Path(user)
    folder = Path(root).expanduser() if root else DEFAULT_ROOT
    folder = folder / cache_key(network, settings)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["_DIFFUSION_PO_SET_CACHE_DIR"] = "1"
    return folder


def compile_counters() -> dict[str, int]:
    """dynamo/inductor counters of this process: graphs compiled, graph breaks, FX/AOT cache hits and misses."""
    from torch._dynamo.utils import counters

    stats = counters.get("stats", {})
    inductor = counters.get("inductor", {})
    aot = counters.get("aot_autograd", {})
    return {
        "graphs": int(stats.get("unique_graphs", 0)),
        "frames_ok": int(counters.get("frames", {}).get("ok", 0)),
        "graph_breaks": int(sum(counters.get("graph_break", {}).values())),
        "recompiles": int(sum(counters.get("recompiles", {}).values())) if "recompiles" in counters else 0,
        "fxgraph_cache_hit": int(inductor.get("fxgraph_cache_hit", 0)),
        "fxgraph_cache_miss": int(inductor.get("fxgraph_cache_miss", 0)),
        "aot_autograd_cache_hit": int(aot.get("autograd_cache_hit", 0)),
        "aot_autograd_cache_miss": int(aot.get("autograd_cache_miss", 0)),
    }


def is_compile_error(exc: BaseException) -> bool:
    """An error raised by dynamo or inductor (compilation), not by the model's own code."""
    for cls in type(exc).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if module.startswith(("torch._dynamo", "torch._inductor")):
            return True
    return False


def uncompile(module: torch.nn.Module) -> int:
    """Undo `Module.compile` on `module` and every submodule (they run eagerly again). Returns how many."""
    n = 0
    for sub in module.modules():
        if getattr(sub, "_compiled_call_impl", None) is not None:
            sub._compiled_call_impl = None
            n += 1
    return n


__all__ = ["DEFAULT_ROOT", "cache_key", "compile_counters", "is_compile_error", "uncompile", "use_compile_cache"]

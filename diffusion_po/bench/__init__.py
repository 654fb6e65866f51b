"""`diffusion-po bench`: training and sampling throughput, memory and FLOP utilisation of our code path
against the reference recipes (re-implemented in `reference.py`), on random-initialised networks.

The runner (and torch) loads on first use of these names, so `diffusion-po bench --help` stays fast."""

from __future__ import annotations

from typing import Any

__all__ = ["CASES", "Settings", "format_case", "run_bench"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from diffusion_po.bench import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'diffusion_po.bench' has no attribute {name!r}")

"""`diffusion-po bench`: training and sampling throughput, memory and FLOP utilisation of our code path
against the reference recipes (re-implemented in `reference.py`), on random-initialised networks."""

from diffusion_po.bench.runner import CASES, Settings, format_case, run_bench

__all__ = ["CASES", "Settings", "format_case", "run_bench"]

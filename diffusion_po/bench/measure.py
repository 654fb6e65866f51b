"""Timing, memory and FLOP counting for the benchmark."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak memory allocated by PyTorch on the GPU since the last reset, GiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Time `step`: the first call alone (compilation, allocation), then `warmup - 1` more untimed calls,
    then `steps` timed calls (each synchronised). Returns first_s, mean_s, median_s, min_s."""
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "mean_s": statistics.fmean(times), "median_s": statistics.median(times),
            "min_s": min(times)}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of `fn` by `torch.utils.flop_counter` (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak_tflops(device: torch.device) -> dict[str, Any]:
    """The measured dense matrix-product rate: bf16 8192^3 on a GPU (the reference's ceiling), fp32
    512^3 on the CPU (tiny runs: only ratios matter there)."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
    else:
        n, dtype, reps = 512, torch.float32, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_steps(lambda: a @ b, device, warmup=3, steps=reps)
    return {"tflops": 2 * n**3 / t["mean_s"] / 1e12, "dtype": str(dtype).replace("torch.", ""), "n": n}


__all__ = ["count_flops", "free_memory", "matmul_peak_tflops", "peak_gib", "sync", "time_steps"]

"""Timing, memory and FLOP counting for the benchmark."""

from __future__ import annotations

import gc
import re
import statistics
import time
from collections.abc import Callable, Iterable
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


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (after set-up: the peak then is the training peak, which still counts
    the weights, optimizer state and everything else that stays allocated)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak memory allocated by PyTorch on the GPU since the last reset, GiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def peak_reserved_gib(device: torch.device) -> float | None:
    """Peak memory reserved by PyTorch's caching allocator since the last reset, GiB (None on the CPU): what
    the process really held of the device, fragmentation included."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) / 2**30


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


def copy_gbps(device: torch.device) -> dict[str, Any]:
    """The measured memory bandwidth: a device-to-device copy of 1 GiB (GPU) or 64 MiB (CPU), bytes read
    plus bytes written per second, GB/s."""
    n = (2**30 if device.type == "cuda" else 2**26) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_steps(lambda: dst.copy_(src), device, warmup=3, steps=10)
    return {"gbps": 2 * 4 * n / t["median_s"] / 1e9, "bytes": 4 * n}


#: kernel-name patterns of each category, first match wins (CUDA kernel names; on the CPU, aten op names)
KERNEL_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"flash|fmha|attention|_sdp|sdpa|mha"),
    ("optimizer", r"adam|multi_tensor|foreach|optimizer"),
    ("triton", r"^triton|triton_"),
    ("conv", r"conv|implicit_gemm|dgrad|wgrad|fprop|winograd|cudnn"),
    ("gemm", r"gemm|cutlass|cublas|nvjet|xmma|wgmma|matmul|aten::(addmm|mm|bmm|baddbmm)$"),
    ("memcpy", r"memcpy|memset|aten::copy_"),
)


def kernel_category(name: str) -> str:
    for category, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return category
    return "other"


def summarize_kernels(kernels: Iterable[dict[str, Any]], window_us: float, steps: int = 1,
                      top: int = 8) -> dict[str, Any]:
    """A kernel profile: `kernels` as {name, start_us, dur_us} over a `window_us` of wall time covering
    `steps` steps. Returns the busy fraction (the union of the kernels' intervals over the window, so
    kernels overlapping on several streams count once), ms per step in each category, the top kernels."""
    rows = sorted(({"name": str(k["name"]), "start": float(k["start_us"]), "dur": float(k["dur_us"])}
                   for k in kernels), key=lambda r: r["start"])
    busy, end = 0.0, float("-inf")
    for r in rows:
        lo, hi = r["start"], r["start"] + r["dur"]
        if hi <= end:
            continue
        busy += hi - max(lo, end)
        end = hi
    per_category = {category: 0.0 for category, _ in KERNEL_CATEGORIES} | {"other": 0.0}
    per_name: dict[str, float] = {}
    for r in rows:
        per_category[kernel_category(r["name"])] += r["dur"]
        per_name[r["name"]] = per_name.get(r["name"], 0.0) + r["dur"]
    n = max(1, steps)
    total = sum(r["dur"] for r in rows)
    return {
        "steps": steps, "window_ms_per_step": window_us / 1e3 / n, "kernels_per_step": len(rows) / n,
        "kernel_ms_per_step": total / 1e3 / n, "busy_fraction": busy / window_us if window_us > 0 else None,
        "ms_per_step": {k: v / 1e3 / n for k, v in per_category.items()},
        "share": {k: v / total for k, v in per_category.items()} if total > 0 else {},
        "top": [{"name": name[:160], "ms_per_step": t / 1e3 / n, "category": kernel_category(name)}
                for name, t in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]],
    }


def kernel_profile(step: Callable[[], Any], device: torch.device, steps: int = 3) -> dict[str, Any]:
    """Profile `steps` calls of `step` with torch.profiler and summarise the device kernels
    (`summarize_kernels`). On the CPU the "kernels" are the aten ops with their self time (the dry run of
    the code path: the busy fraction there means little)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        window_us = (time.perf_counter() - t0) * 1e6
    kernels: list[dict[str, Any]] = []
    if cuda:  # kernels, copies and memsets; not the annotations projected onto the device's timeline
        device = [e for e in prof.profiler.kineto_results.events()
                  if e.device_type() == DeviceType.CUDA and not e.is_user_annotation()
                  and "annotation" not in str(e.activity_type())]
        work = [e for e in device if str(e.activity_type()) in ("kernel", "gpu_memcpy", "gpu_memset")] or device
        kernels = [{"name": e.name(), "start_us": e.start_ns() / 1e3, "dur_us": e.duration_ns() / 1e3} for e in work]
    else:
        for e in prof.events():  # nested ops: each one's own (self) time, so nothing counts twice
            if e.device_type == DeviceType.CPU and not e.is_async and e.name.startswith("aten::"):
                kernels.append({"name": e.name, "start_us": e.time_range.start, "dur_us": e.self_cpu_time_total})
    out = summarize_kernels(kernels, window_us, steps)
    out["source"] = "cuda kernels" if cuda else "cpu aten ops, self time"
    return out


__all__ = ["KERNEL_CATEGORIES", "copy_gbps", "count_flops", "free_memory", "kernel_category", "kernel_profile",
           "matmul_peak_tflops", "peak_gib", "peak_reserved_gib", "reset_peak", "summarize_kernels", "sync",
           "time_steps"]

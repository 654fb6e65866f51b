"""A micro-benchmark of torch's scaled-dot-product-attention backends at the UNets' attention shapes.

SD1.5 at 512² (16 pairs: 32 images per forward) attends over 64², 32² and 16² latent tokens with 8 heads of
40, 80 and 160 channels; SDXL at 1024² (4 pairs: 8 images) over 64² tokens with 10 heads of 64. Each
backend (PyTorch's default choice, flash, memory-efficient, cuDNN) is forced with
`torch.nn.attention.sdpa_kernel`; a backend that cannot run a shape is recorded with its error. FLOPs
counted: forward 4·B·H·L²·D (the two matrix products), forward+backward 3.5x that (backward: 2.5x the
forward, the flash backward's recomputation of the scores included).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

#: (label, batch, heads, tokens, head dim) at full size
SHAPES_FULL: tuple[tuple[str, int, int, int, int], ...] = (
    ("sd15-d40", 32, 8, 4096, 40),
    ("sd15-d80", 32, 8, 1024, 80),
    ("sd15-d160", 32, 8, 256, 160),
    ("sdxl-d64", 8, 10, 4096, 64),
)
#: the same head dims at a size the CPU runs in milliseconds (the dry run of the code path)
SHAPES_TINY: tuple[tuple[str, int, int, int, int], ...] = tuple(
    (label, 1, 2, 64, dim) for label, _, _, _, dim in SHAPES_FULL)
BACKENDS = ("default", "flash", "efficient", "cudnn")


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    import contextlib

    from torch.nn.attention import sdpa_kernel

    ctx = contextlib.nullcontext() if backend == "default" else sdpa_kernel(_backend(backend))
    with ctx:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _time_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, ref: torch.Tensor,
                  backend: str, device: torch.device, warmup: int, steps: int, fwd_flops: int) -> dict[str, float]:
    from diffusion_po.bench.measure import time_steps

    with torch.no_grad():
        o = _attend(q, k, v, backend)
    err = ((o[:1].float() - ref).norm() / ref.norm()).item()
    fwd = time_steps(lambda: _attend(q, k, v, backend), device, warmup, steps)
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    both = time_steps(lambda: _attend(qg, kg, vg, backend).backward(grad), device, warmup, steps)
    return {"fwd_ms": 1e3 * fwd["median_s"], "fwd_bwd_ms": 1e3 * both["median_s"],
            "fwd_tflops": fwd_flops / fwd["median_s"] / 1e12,
            "fwd_bwd_tflops": 3.5 * fwd_flops / both["median_s"] / 1e12, "rel_err": err}


def sdpa_bench(device: torch.device, size: str = "full", dtype: torch.dtype | None = None, steps: int = 10,
               warmup: int = 3, backends: tuple[str, ...] = BACKENDS) -> dict[str, Any]:
    """Per shape and backend: forward and forward+backward ms (median), TFLOP/s, and the output's relative
    error against the math backend in fp32 on the first image."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = SHAPES_FULL if size == "full" else SHAPES_TINY
    out: dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "flops": "fwd 4BHL^2D, fwd+bwd 3.5x fwd",
                           "shapes": {}}
    g = torch.Generator(device=device).manual_seed(0)
    for label, b, h, n, d in shapes:
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g) for _ in range(3))
        grad = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g)
        high = torch.float64 if device.type == "cpu" else torch.float32
        with torch.no_grad():
            ref = _attend(q[:1].to(high), k[:1].to(high), v[:1].to(high), "math").float()
        fwd_flops = 4 * b * h * n * n * d
        row: dict[str, Any] = {"batch": b, "heads": h, "tokens": n, "head_dim": d}
        for backend in backends:
            with warnings.catch_warnings(record=True) as why:  # torch says why a backend cannot run
                warnings.simplefilter("always")
                try:
                    row[backend] = _time_backend(q, k, v, grad, ref, backend, device, warmup, steps, fwd_flops)
                except RuntimeError as exc:  # this backend cannot run this shape/dtype/device
                    reasons = dict.fromkeys(" ".join(str(w.message).split()) for w in why)
                    row[backend] = {"error": " ".join(str(exc).split())[:200], "why": list(reasons)[:4]}
        usable = {name: r for name, r in row.items() if isinstance(r, dict) and "fwd_bwd_ms" in r}
        if usable:
            row["fastest_fwd_bwd"] = min(usable, key=lambda name: usable[name]["fwd_bwd_ms"])
        out["shapes"][label] = row
    return out


__all__ = ["BACKENDS", "SHAPES_FULL", "SHAPES_TINY", "sdpa_bench"]

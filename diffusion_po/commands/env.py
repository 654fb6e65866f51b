"""`diffusion-po env`: versions and devices, for bug reports."""

from __future__ import annotations

import argparse
import platform


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("env", help="print versions and devices (paste into bug reports)",
                            description="Print the versions of diffusion-po, Python, torch and the HF stack, and the devices.")
    parser.set_defaults(func=run)


def environment() -> dict[str, str]:
    import importlib.metadata as md

    import torch

    from diffusion_po import __version__

    info = {"diffusion-po": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "datasets",
                "safetensors", "open_clip_torch", "xformers", "bitsandbytes"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    info["cuda available"] = str(torch.cuda.is_available())
    if torch.cuda.is_available():
        info["cuda"] = str(torch.version.cuda)
        info["gpus"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    info["cpu threads"] = str(torch.get_num_threads())
    return info


def run(args: argparse.Namespace) -> int:
    for key, value in environment().items():
        print(f"- {key}: {value}")
    return 0

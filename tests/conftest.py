"""Shared fixtures: tiny random-initialised pipelines of each family, saved once per session in the
standard diffusers layout and loaded back through `from_pretrained`. Nothing touches the network."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one thread count for the whole run and for the subprocesses tests start: the same kernels everywhere,
# so runs compared for equality (resume, several processes) differ by nothing but what is tested
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(family, prediction_type='epsilon') -> path of a saved tiny pipeline.

    family: 'sd', 'sdxl', 'sd3', 'sd35' (SD3.5-medium style, with T5), 'flux' (FLUX.1-dev style) or
    'flux-schnell', 'zimage' (Z-Image style: a Qwen3 decoder-LLM text encoder)."""
    from diffusion_po.tiny import save_tiny_pipeline

    cache: dict[tuple[str, str], str] = {}

    def make(family: str = "sd", prediction_type: str = "epsilon") -> str:
        key = (family, prediction_type)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny_{family}_{prediction_type}")
            # the flow-matching families (sd3, sd35, flux, flux-schnell, zimage) have no prediction_type to choose
            kwargs = {"prediction_type": prediction_type} if family in ("sd", "sdxl") else {}
            cache[key] = str(save_tiny_pipeline(family, folder, **kwargs))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_sd(tiny_model_factory) -> str:
    return tiny_model_factory("sd")

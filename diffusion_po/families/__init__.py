"""Model families behind one interface: `sd` (SD 1.x/2.x), `sdxl`, `sd3` (SD3 and SD3.5; DiT, flow matching),
`flux` (FLUX.1 dev and schnell), `zimage` (Z-Image: a decoder-LLM text encoder)."""

from typing import Any

from diffusion_po.families import flow, flux, sd, zimage  # noqa: F401  (registers the families)
from diffusion_po.families.base import (
    Conditioning,
    Family,
    cat_cond,
    compile_regions,
    cond_to,
    family_class_for,
    family_for_pipeline,
    family_names,
    load_pipeline,
    network_of,
    per_sample_error,
    repeat_cond,
    slice_cond,
    speed_up_for_sampling,
)


def load_family(path: str, vae_path: str | None = None, revision: str | None = None, variant: str | None = None,
                max_sequence_length: int | None = None, options: dict[str, Any] | None = None) -> Family:
    """Load a pipeline by hub id or local folder and wrap it in its family. `options`: the family's options
    (a training config's `family_options`, checked by `Family.check_options`); `max_sequence_length`: T5
    prompt length of families with a T5 encoder (one of those options); None = the family's default."""
    return Family.from_pretrained(path, vae_path=vae_path, revision=revision, variant=variant,
                                  max_sequence_length=max_sequence_length, options=options)


__all__ = [
    "Conditioning", "Family", "cat_cond", "compile_regions", "cond_to", "family_class_for", "family_for_pipeline",
    "family_names", "load_family", "load_pipeline", "network_of", "per_sample_error", "repeat_cond", "slice_cond",
    "speed_up_for_sampling",
]

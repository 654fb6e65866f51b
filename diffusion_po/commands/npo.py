"""`diffusion-po npo merge`: write a loadable negative model from NPO weights by weight arithmetic.

    theta^- = theta^+ + s * Delta_NPO - alpha * (theta^+ - theta_base),   Delta_NPO = theta_NPO - theta_base

theta_base: the model the NPO weights were trained on; theta^+: the positive model used at inference
(default: the base itself, so theta^- = theta_NPO); alpha: the reference's `merge_weight` (default 0,
"positive model + NPO delta"); s: a scale on the NPO delta (default 1). The NPO weights are a LoRA folder
(`pytorch_lora_weights.safetensors`, as `diffusion-po train` writes; fused through diffusers/peft) or a
full network (a diffusers model folder, a training output folder with `unet/` or `transformer/`, a pipeline
folder, or a single .safetensors state dict). The positive model is a pipeline folder, a network folder, or
a LoRA folder applied to the base.

Output: `OUTPUT/unet/` (or `transformer/`) in diffusers format, loadable with
`UNet2DConditionModel.from_pretrained(OUTPUT, subfolder="unet")` or as `--negative-model OUTPUT` in
`diffusion-po sample`; with `--save-pipeline` the whole pipeline (positive components + negative network).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusion_po.errors import ModelLoadError, UserError

if TYPE_CHECKING:  # torch loads when a function runs: `diffusion-po npo --help` stays fast
    import torch

LORA_FILE = "pytorch_lora_weights.safetensors"
#: names of the output dtypes (`diffusion_po.sampling.api.DTYPES` maps them to torch dtypes)
DTYPE_NAMES = ("bf16", "fp16", "fp32")


# ----------------------------------------------------------------------------- arithmetic
def merge_state_dicts(
    positive: dict[str, torch.Tensor],
    npo: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    alpha: float = 0.0,
    npo_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """theta^- = theta^+ + s (theta_NPO - theta_base) - alpha (theta^+ - theta_base), key by key, in fp32.

    All three state dicts must have the same keys and shapes; non-float entries are taken from `positive`.
    Returns new fp32 tensors (float keys) or the positive's tensors (others).
    """
    for name, other in (("NPO", npo), ("base", base)):
        missing = sorted(set(positive) - set(other))
        extra = sorted(set(other) - set(positive))
        if missing or extra:
            raise ModelLoadError(
                f"the {name} weights do not match the positive model's network: "
                f"{len(missing)} keys missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}); "
                "are they for the same architecture?"
            )
    import torch

    out = {}
    with torch.no_grad():
        for key, pos in positive.items():
            if not pos.is_floating_point():
                out[key] = pos
                continue
            if npo[key].shape != pos.shape or base[key].shape != pos.shape:
                raise ModelLoadError(f"shape mismatch at '{key}': positive {tuple(pos.shape)}, "
                                     f"NPO {tuple(npo[key].shape)}, base {tuple(base[key].shape)}")
            p, n, b = pos.float(), npo[key].float(), base[key].float()
            out[key] = p + npo_scale * (n - b) - alpha * (p - b)
    return out


# ----------------------------------------------------------------------------- loading
def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _is_lora_state(keys: list[str]) -> bool:
    return any("lora_" in k or ".lora." in k for k in keys)


def _fused_lora_state(base_path: str, lora: Path) -> dict[str, torch.Tensor]:
    """The base network with the LoRA's network part fused in (scale 1), as a state dict."""
    from diffusion_po.families import family_class_for, load_pipeline, network_of
    from diffusion_po.families.base import check_lora_family

    pipe = load_pipeline(base_path)
    name, network = family_class_for(pipe).network_name, network_of(pipe)
    source = lora if lora.is_file() else lora / LORA_FILE
    if not source.is_file():
        raise ModelLoadError(f"{lora}: no {LORA_FILE} in the folder")
    check_lora_family(pipe, source, "LoRA")
    try:
        out = type(pipe).lora_state_dict(str(source.parent), weight_name=source.name, return_lora_metadata=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not read LoRA '{lora}': {str(exc).splitlines()[0]}") from exc
    # SD/SDXL loaders return (state, network_alphas, metadata); SD3's returns (state, metadata)
    state, alphas, metadata = out if len(out) == 3 else (out[0], None, out[1])
    keys = {k: v for k, v in state.items() if k.startswith(f"{name}.")}
    if not keys:
        raise ModelLoadError(f"LoRA '{lora}' has no '{name}.' weights (is it a text-encoder-only LoRA?)")
    kwargs: dict[str, Any] = {"prefix": name, "adapter_name": "npo_merge"}
    if alphas:
        kwargs["network_alphas"] = {k: v for k, v in alphas.items() if k.startswith(f"{name}.")}
    if metadata:
        kwargs["metadata"] = metadata
    try:
        network.load_lora_adapter(keys, **kwargs)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"LoRA '{lora}' does not fit the base network: {str(exc).splitlines()[0]}") from exc
    network.fuse_lora(adapter_names=["npo_merge"])
    network.unload_lora()
    return _state(network)


def load_network_state(path: str, base_path: str, base_state: dict[str, torch.Tensor],
                       network_name: str, network_cls: type) -> tuple[dict[str, torch.Tensor], str]:
    """Weights of a network given as a LoRA (applied to the base), a model/pipeline/output folder, or a
    .safetensors state dict. Returns (state dict, what it was)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
        if _is_lora_state(list(state)):
            return _fused_lora_state(base_path, p), "lora file"
        return state, "state dict file"
    if p.is_dir():
        if (p / LORA_FILE).is_file() and not (p / network_name / "config.json").is_file():
            return _fused_lora_state(base_path, p), "lora"
        for sub, what in ((network_name, "network folder"), (None, "network folder")):
            folder = p / sub if sub else p
            if (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
                try:
                    net = network_cls.from_pretrained(str(folder))
                except (OSError, ValueError) as exc:
                    raise ModelLoadError(f"could not load '{folder}': {str(exc).splitlines()[0]}") from exc
                return _state(net), what
        raise ModelLoadError(
            f"'{path}': expected a LoRA folder ({LORA_FILE}), a pipeline or output folder with {network_name}/, "
            "a model folder with config.json, or a .safetensors file"
        )
    if path == base_path:
        return base_state, "base"
    raise ModelLoadError(f"'{path}' does not exist")


def merge_npo(
    base: str,
    npo: str,
    output: str | Path,
    positive: str | None = None,
    alpha: float = 0.0,
    npo_scale: float = 1.0,
    dtype: str = "fp32",
    save_pipeline: bool = False,
) -> Path:
    """Compute theta^- and write it to `output/<unet|transformer>` (and the pipeline with `save_pipeline`)."""
    from diffusion_po.families import family_class_for, load_pipeline, network_of
    from diffusion_po.sampling.api import DTYPES

    if dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}")
    output = Path(output)
    pipe = load_pipeline(base)
    name, network = family_class_for(pipe).network_name, network_of(pipe)
    network_cls = type(network)
    base_state = _state(network)
    npo_state, npo_kind = load_network_state(npo, base, base_state, name, network_cls)
    if positive is None or positive == base:
        pos_state, pos_kind = base_state, "base"
    else:
        pos_path = Path(positive)
        if pos_path.is_dir() and (pos_path / "model_index.json").is_file():
            pos_pipe = load_pipeline(positive)
            pos_state, pos_kind = _state(network_of(pos_pipe)), "pipeline"
            pipe = pos_pipe  # components of the positive model for --save-pipeline
        else:
            pos_state, pos_kind = load_network_state(positive, base, base_state, name, network_cls)
    merged = merge_state_dicts(pos_state, npo_state, base_state, alpha, npo_scale)
    target = DTYPES[dtype]
    merged = {k: (v.to(target) if v.is_floating_point() else v) for k, v in merged.items()}
    negative = network_cls.from_config(network.config)
    negative.load_state_dict(merged)
    negative.to(target)
    output.mkdir(parents=True, exist_ok=True)
    if save_pipeline:
        pipe.register_modules(**{name: negative})
        pipe.save_pretrained(str(output), safe_serialization=True)
    else:
        negative.save_pretrained(str(output / name), safe_serialization=True)
    info = {
        "formula": "theta_neg = theta_pos + npo_scale * (theta_npo - theta_base) - alpha * (theta_pos - theta_base)",
        "base": base, "npo": npo, "npo_kind": npo_kind, "positive": positive or base, "positive_kind": pos_kind,
        "alpha": alpha, "npo_scale": npo_scale, "dtype": dtype, "network": name,
    }
    (output / "npo_merge.json").write_text(json.dumps(info, indent=2))
    return output


# ----------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "npo", help="NPO tools: merge NPO weights into a negative model",
        description="Tools for Diffusion-NPO negative models.",
    )
    verbs = parser.add_subparsers(dest="npo_verb", metavar="ACTION")
    merge = verbs.add_parser(
        "merge", help="theta^- = theta^+ + s*Delta_NPO - alpha*(theta^+ - theta_base) -> a loadable negative model",
        description=(
            "Write the negative model theta^- = theta^+ + s * Delta_NPO - alpha * (theta^+ - theta_base), "
            "Delta_NPO = theta_NPO - theta_base, as a diffusers network folder (OUTPUT/unet or OUTPUT/transformer)."
        ),
    )
    merge.add_argument("--base", required=True, help="the model the NPO weights were trained on (pipeline folder or hub id)")
    merge.add_argument("--npo", required=True,
                       help="NPO weights: a LoRA folder (pytorch_lora_weights.safetensors), a training output / "
                            "pipeline / model folder, or a .safetensors state dict")
    merge.add_argument("--positive", help="the positive model theta^+ (pipeline, model or LoRA folder); default: the base")
    merge.add_argument("--alpha", type=float, default=0.0, help="merge weight alpha (reference default 0)")
    merge.add_argument("--npo-scale", type=float, default=1.0, help="scale s of the NPO delta (default 1)")
    merge.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="dtype of the written weights")
    merge.add_argument("--save-pipeline", action="store_true",
                       help="write the whole pipeline (the positive model's components with the negative network)")
    merge.add_argument("--output", "-o", required=True, help="output folder")
    merge.set_defaults(func=run_merge)
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])


def run_merge(args: argparse.Namespace) -> int:
    out = merge_npo(args.base, args.npo, args.output, positive=args.positive, alpha=args.alpha,
                    npo_scale=args.npo_scale, dtype=args.dtype, save_pipeline=args.save_pipeline)
    print(f"negative model written to {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_merge(args)

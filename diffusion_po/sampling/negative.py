"""The negative (NPO) model of NPO guidance, and peft mixed-adapter batches.

Two forms:
- **adapter**: the NPO weights are a LoRA adapter on the pipeline's own network. The positive branches
  run with `__base__` (no adapter) and the negative branches with the NPO adapter *in the same forward*:
  peft's LoRA layers accept `adapter_names=[...]` (one name per batch row) and add each row's LoRA delta
  only to that row. diffusers' UNet/transformer forward has no such argument, so `mixed_adapter_batch`
  injects it into every LoRA layer with forward pre-hooks, which is what peft's own
  `PeftModel.forward(adapter_names=...)` does.
- **network**: a separate network (a merged negative model, a full NPO checkpoint, Self-NPO's student);
  its branches run in a second batched forward.

The positive model must be the network's *base* weights for the adapter form, so a positive LoRA is
fused first (`load_positive_lora`). Mixed batches are refused by peft for DoRA adapters and merged
adapters; use the network form there.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from diffusion_po.errors import ModelLoadError
from diffusion_po.families import family_class_for, network_of
from diffusion_po.families.base import check_lora_family

BASE_ADAPTER = "__base__"


@dataclass
class NegativeModel:
    """Which weights compute the negative branches, and which branches those are.

    Exactly one of `adapter` (name of a LoRA adapter on the pipeline's network) or `network`.
    `kinds`: the branch kinds the negative model computes: ("uncond", "neg") by default (the NPO
    reference uses theta^- for the whole negative/unconditional side); ("uncond",) keeps negative
    prompts on the positive model.
    """

    adapter: str | None = None
    network: torch.nn.Module | None = None
    kinds: tuple[str, ...] = ("uncond", "neg")
    description: dict[str, Any] = field(default_factory=dict)
    #: how an adapter shares the forward: "rows" (our hooks add the LoRA delta to a contiguous slice of
    #: rows: views only) or "peft" (peft's `adapter_names` mixed batch: per-row index lists)
    mixed: str = "rows"

    def __post_init__(self) -> None:
        if (self.adapter is None) == (self.network is None):
            raise ValueError("NegativeModel needs exactly one of `adapter` or `network`")
        if self.mixed not in ("rows", "peft"):
            raise ValueError(f"NegativeModel.mixed must be 'rows' or 'peft', got {self.mixed!r}")
        bad = set(self.kinds) - {"uncond", "neg"}
        if bad:
            raise ValueError(f"NegativeModel.kinds may contain 'uncond' and 'neg', not {sorted(bad)}")

    def describe(self) -> dict[str, Any]:
        out = {"form": "adapter" if self.adapter else "network", "kinds": list(self.kinds)}
        out.update(self.description)
        return out


def _lora_layers(network: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in network.modules() if isinstance(m, LoraLayer)]


def adapter_names_of(network: torch.nn.Module) -> set[str]:
    """Names of the LoRA adapters present on `network`."""
    names: set[str] = set()
    for layer in _lora_layers(network):
        names |= set(layer.lora_A.keys()) | set(getattr(layer, "lora_embedding_A", {}).keys())
    return names


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


@contextmanager
def mixed_adapter_batch(network: torch.nn.Module, adapter_names: list[str]) -> Iterator[None]:
    """Within the context, row i of every forward of `network` uses adapter `adapter_names[i]`
    (`"__base__"` = no adapter). Needs a network with peft LoRA layers, in eval mode, unmerged."""
    layers = _lora_layers(network)
    if not layers:
        raise ValueError("mixed_adapter_batch: the network has no LoRA layers")
    unknown = {n for n in adapter_names if n != BASE_ADAPTER} - adapter_names_of(network)
    if unknown:
        raise ValueError(f"mixed_adapter_batch: no adapter named {', '.join(sorted(unknown))} on the network")
    if network.training:
        raise ValueError("mixed_adapter_batch: put the network in eval mode (peft refuses mixed batches in training)")
    handles = [
        layer.register_forward_pre_hook(partial(_inject_adapter_names, adapter_names=list(adapter_names)), with_kwargs=True)
        for layer in layers
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _add_adapter_rows(module, args, output, adapter: str, start: int, stop: int):
    """Forward hook: output[start:stop] += LoRA_adapter(x[start:stop]) (as peft's vanilla LoRA forward)."""
    if module.disable_adapters:
        return output
    x = args[0][start:stop]
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    x = x.to(lora_a.weight.dtype)
    delta = lora_b(lora_a(module.lora_dropout[adapter](x))) * module.scaling[adapter]
    output[start:stop] += delta.to(output.dtype)
    return output


@contextmanager
def adapter_on_rows(network: torch.nn.Module, adapter: str, start: int, stop: int) -> Iterator[None]:
    """Within the context, rows [start, stop) of every forward of `network` also get LoRA adapter
    `adapter` (which must be loaded but inactive, see `deactivate_adapter`); other rows see the active
    weights only. Same result as peft's mixed batch with a contiguous block of rows, but with slices
    (views) instead of per-layer index lists, so nothing is copied host-to-device per layer."""
    from peft.tuners.lora.layer import Linear, _ConvNd

    layers = [m for m in _lora_layers(network) if adapter in m.lora_A]
    if not layers:
        raise ValueError(f"adapter_on_rows: no adapter named {adapter} on the network")
    for m in layers:
        if adapter in m.active_adapters:
            raise ValueError(
                f"adapter '{adapter}' is active, so every row would get it; call "
                f"diffusion_po.sampling.negative.deactivate_adapter(network, '{adapter}') first (load_npo_lora does)"
            )
        if m.merged:
            raise ValueError("adapter_on_rows: the network has merged (fused) adapters; unfuse them first")
        if not isinstance(m, (Linear, _ConvNd)) or adapter in getattr(m, "lora_variant", {}):
            raise ValueError(
                f"adapter_on_rows supports plain LoRA on Linear/Conv layers only ({type(m).__name__}); "
                "use NegativeModel(mixed='peft') or a separate network"
            )
    handles = [m.register_forward_hook(partial(_add_adapter_rows, adapter=adapter, start=start, stop=stop)) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def deactivate_adapter(network: torch.nn.Module, adapter_name: str) -> None:
    """Keep adapter `adapter_name` loaded but inactive, so plain forwards (and the stock pipeline) compute
    theta^+; mixed-adapter batches still use it for the rows that name it."""
    for layer in _lora_layers(network):
        active = [a for a in layer.active_adapters if a != adapter_name]
        layer.set_adapter(active, inference_mode=True)


# ---------------------------------------------------------------------------- loading


def _lora_file_check(path: str | Path, what: str) -> None:
    p = Path(path)
    if p.exists() and p.is_dir() and not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ModelLoadError(f"{what} '{path}': no .safetensors/.bin LoRA weights in the folder")
    if not p.exists() and (str(path).startswith((".", "/", "~")) or str(path).count("/") != 1):
        raise ModelLoadError(f"{what} '{path}' does not exist (and is not a hub id of the form org/name)")


def _lora_load_error(path: str | Path, what: str, exc: Exception) -> ModelLoadError:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not Path(path).exists():  # a hub id
        msg += (" (a hub id: this machine may be offline (HF_HUB_OFFLINE) and the LoRA not in the cache; "
                "download it once or pass a local folder)")
    return ModelLoadError(f"could not load {what} '{path}': {msg}")


def load_positive_lora(pipe: Any, path: str | Path, scale: float = 1.0) -> None:
    """Load a LoRA (network and text-encoder parts) and fuse it into the base weights: theta^+ = base + scale*Delta."""
    _lora_file_check(path, "--lora")
    check_lora_family(pipe, path, "--lora")
    try:
        pipe.load_lora_weights(str(path), adapter_name="positive")
    except (OSError, ValueError, KeyError) as exc:
        raise _lora_load_error(path, "LoRA", exc) from exc
    pipe.fuse_lora(lora_scale=scale, adapter_names=["positive"])
    pipe.unload_lora_weights()


def load_npo_lora(pipe: Any, path: str | Path, adapter_name: str = "npo", kinds: tuple[str, ...] = ("uncond", "neg")) -> NegativeModel:
    """Load an NPO LoRA into the pipeline's network (only the network part) as adapter `adapter_name`,
    for mixed-adapter batches: theta^- = theta^+ + Delta_NPO (the reference's merge weight alpha = 0)."""
    _lora_file_check(path, "--npo-lora")
    check_lora_family(pipe, path, "--npo-lora")
    name, network = family_class_for(pipe).network_name, network_of(pipe)
    try:
        out = type(pipe).lora_state_dict(str(path), return_lora_metadata=True)
    except (OSError, ValueError, KeyError) as exc:
        raise _lora_load_error(path, "NPO LoRA", exc) from exc
    # SD/SDXL loaders return (state, network_alphas, metadata); SD3 returns (state, metadata)
    state, alphas, metadata = out if len(out) == 3 else (out[0], None, out[1])
    network_keys = {k: v for k, v in state.items() if k.startswith(f"{name}.")}
    if not network_keys:
        raise ModelLoadError(f"NPO LoRA '{path}' has no '{name}.' weights (text-encoder-only LoRA?)")
    kwargs: dict[str, Any] = {"prefix": name, "adapter_name": adapter_name}
    if alphas:
        kwargs["network_alphas"] = {k: v for k, v in alphas.items() if k.startswith(f"{name}.")}
    if metadata:
        kwargs["metadata"] = metadata
    network.load_lora_adapter(network_keys, **kwargs)
    network.eval()
    deactivate_adapter(network, adapter_name)
    ignored = len(state) - len(network_keys)
    desc = {"npo_lora": str(path), "adapter": adapter_name}
    if ignored:
        desc["ignored_text_encoder_keys"] = ignored
    return NegativeModel(adapter=adapter_name, kinds=kinds, description=desc)


def load_network_like(pipe: Any, path: str | Path, what: str = "--negative-model") -> torch.nn.Module:
    """A network of the class of `pipe`'s unet/transformer from a pipeline or training output folder (its
    unet/ or transformer/) or a model folder (config.json), on the device and in the dtype of `pipe`'s."""
    name, network = family_class_for(pipe).network_name, network_of(pipe)
    p = Path(path)
    subfolder = name if (p / name / "config.json").is_file() else None
    if p.exists() and subfolder is None and not (p / "config.json").is_file():
        raise ModelLoadError(f"{what} '{path}': expected a pipeline or training output folder with {name}/ "
                             "or a model folder with config.json")
    try:
        loaded = type(network).from_pretrained(str(path), subfolder=subfolder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what} '{path}': could not load a {type(network).__name__}: "
                             f"{str(exc).splitlines()[0]}") from exc
    param = next(network.parameters())
    return loaded.to(device=param.device, dtype=param.dtype)


def swap_network(pipe: Any, path: str | Path, what: str = "--network") -> None:
    """Replace `pipe`'s unet/transformer by a trained one (a full fine-tune's output folder)."""
    pipe.register_modules(**{family_class_for(pipe).network_name: load_network_like(pipe, path, what).eval()})


def load_negative_network(pipe: Any, path: str | Path, kinds: tuple[str, ...] = ("uncond", "neg")) -> NegativeModel:
    """A separate negative network from a diffusers pipeline folder (its unet/transformer) or a model folder."""
    neg = load_network_like(pipe, path, "--negative-model").eval().requires_grad_(False)
    return NegativeModel(network=neg, kinds=kinds, description={"negative_model": str(path)})


@torch.no_grad()
def merge_negative_network(
    positive: torch.nn.Module,
    npo: torch.nn.Module,
    base: torch.nn.Module | None = None,
    alpha: float = 0.0,
) -> torch.nn.Module:
    """The reference's weight-offset merge, theta^- = theta^+ + Delta_NPO - alpha (theta^+ - theta_base),
    written for full weights: theta^- = theta_NPO + (1 - alpha)(theta^+ - theta_base) where
    theta_NPO = theta_base + Delta_NPO. `npo` is the NPO network (base + NPO delta, e.g. a fused NPO LoRA).
    With `base=None`, `npo` must already sit on theta^+ (theta^- = npo) and alpha must be 0."""
    if base is None:
        if alpha:
            raise ValueError("merge weight alpha != 0 needs the base network (theta_base)")
        return npo
    out = copy.deepcopy(npo)
    pos_state, base_state = positive.state_dict(), base.state_dict()
    for key, value in out.state_dict().items():
        if key in pos_state and key in base_state and value.is_floating_point():
            value.add_((1.0 - alpha) * (pos_state[key].to(value) - base_state[key].to(value)))
    return out

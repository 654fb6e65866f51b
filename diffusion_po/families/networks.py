"""Copies of a family's network for training-time teachers and snapshots (Self-NPO's EMA teacher, DRO's
sampling snapshot)."""

from __future__ import annotations

import copy

import torch

from diffusion_po.errors import ConfigError


def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float, only_trainable: bool = True) -> None:
    """target <- decay * target + (1 - decay) * source, parameter by parameter (names must match)."""
    src = dict(source.named_parameters())
    with torch.no_grad():
        for name, p in target.named_parameters():
            s = src.get(name)
            if s is None or (only_trainable and not s.requires_grad):
                continue
            p.lerp_(s.detach().to(p.dtype), 1.0 - decay)


def frozen_copy(network: torch.nn.Module) -> torch.nn.Module:
    """A deep copy with gradients off, in eval mode (EMA teachers, sampling snapshots)."""
    net = copy.deepcopy(network)
    net.requires_grad_(False)
    net.eval()
    return net


def copy_weights(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Load `source`'s current parameters and buffers into `target` (same architecture)."""
    target.load_state_dict(source.state_dict())


def trained_names(network: torch.nn.Module) -> set[str]:
    """Names of the parameters being trained (all of them for a full fine-tune, the LoRA weights otherwise):
    the only ones in which a frozen copy can come to differ from the network."""
    return {n for n, p in network.named_parameters() if p.requires_grad}


def params_state(copy_of: torch.nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """The parameters `names` of a frozen copy, on the CPU (for a method's checkpoint state)."""
    return {k: v.detach().cpu().clone() for k, v in copy_of.named_parameters() if k in names}


def load_params_state(copy_of: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Put `params_state`'s tensors back into the frozen copy; a ConfigError naming `what` if they do not fit."""
    params = dict(copy_of.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise ConfigError(f"the checkpoint's {what} does not fit this network (e.g. {missing[0]})")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


__all__ = ["copy_weights", "ema_update", "frozen_copy", "load_params_state", "params_state", "trained_names"]

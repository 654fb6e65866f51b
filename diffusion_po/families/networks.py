"""Copies of a family's network for training-time teachers and snapshots (Self-NPO's EMA teacher, DRO's
sampling snapshot)."""

from __future__ import annotations

import copy

import torch


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


__all__ = ["copy_weights", "ema_update", "frozen_copy"]

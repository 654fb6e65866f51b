"""What a method sees of the trainer (`TrainContext`) and what the trainer sees of a method (`Method`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from diffusion_po.config import from_dict

if TYPE_CHECKING:
    from diffusion_po.config import TrainConfig
    from diffusion_po.families import Conditioning, Family

Batch = dict[str, Any]
Metrics = dict[str, Any]


class TrainContext(Protocol):
    """The trainer's services to a method. Random draws come from one generator shared by all processes:
    each process draws the whole global micro-batch and keeps its own slice, so the run is the same
    whatever the number of processes."""

    family: Family
    config: TrainConfig
    device: torch.device

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal of `shape` (per-process batch first), this process's slice of the global draw."""

    def rand(self, n: int) -> torch.Tensor:
        """Uniform [0, 1) of length n, this process's slice."""

    def timesteps(self, n: int) -> torch.Tensor:
        """Training timesteps (family's density), this process's slice, on `device`."""

    def latents(self, batch: Batch, key: str) -> torch.Tensor:
        """Scaled latents of batch images `key` ('w', 'l' or '' for unpaired): VAE-encoded pixels or cached."""

    def encode_prompts(self, prompts: list[str], batch: Batch | None = None, key: str = "") -> Conditioning:
        """Conditioning for prompts (with empty-prompt dropout) and the images' size/crop where the family needs them."""

    def policy_predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The trained network's prediction, with gradients."""

    def reference_predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The frozen reference's prediction (LoRA disabled, or the frozen copy), without gradients."""

    def autocast(self) -> Any:
        """The run's mixed-precision context, for methods that call networks themselves."""

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar over all processes, without grad."""

    def speed_up(self, module: torch.nn.Module) -> torch.nn.Module:
        """The run's speed switches (channels-last, compiled blocks) on a copy of the network, in place."""

    @property
    def trainable_network(self) -> torch.nn.Module:
        """The unwrapped network being trained (for EMA teachers and policy snapshots)."""


class Method:
    """A training method: how a batch becomes model inputs, and its loss. Subclasses register by `name`."""

    name: ClassVar[str] = ""
    data_formats: ClassVar[tuple[str, ...]] = ("pickapic", "pairs")
    needs_reference: ClassVar[bool] = True

    @dataclasses.dataclass
    class Options:
        """Method-specific keys under `method_options:`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.options = from_dict(self.Options, dict(config.method_options), "method_options", "method_options.")

    def compute_loss(self, ctx: TrainContext, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        raise NotImplementedError

    def setup(self, ctx: TrainContext) -> None:
        """Called once after the trainer has built the network (teachers, snapshots, buffers)."""

    def on_optimizer_step(self, ctx: TrainContext, step: int) -> None:
        """Called after every optimizer step (EMA teachers, policy snapshots)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls

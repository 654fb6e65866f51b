"""What a method sees of the trainer (`TrainContext`) and what the trainer sees of a method (`Method`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from diffusion_po.errors import ConfigError
from diffusion_po.typed import from_dict

if TYPE_CHECKING:
    from diffusion_po.config import TrainConfig
    from diffusion_po.families import Conditioning, Family

Batch = dict[str, Any]
"""A collated batch. Methods read `captions` (list[str], one per example), `captions_w`/`captions_l`
(per-image captions, data.format dcpo) and `labels` (0/1 per image, data.format images) directly; the
images and their size/crop only through the context (`latents`, `has_images`, `image_sizes`,
`batch_size`), whose key layout (pixels, cached latents, cached posteriors) is the trainer's business."""
Metrics = dict[str, Any]


class TrainContext(Protocol):
    """The trainer's services to a method. Random draws come from one generator shared by all processes:
    each process draws the whole global micro-batch and keeps its own slice, so the run is the same
    whatever the number of processes."""

    family: Family
    config: TrainConfig
    device: torch.device
    process_index: int
    """This process's rank (0 on a single process)."""
    num_processes: int

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal of `shape` (per-process batch first), this process's slice of the global draw."""

    def rand(self, n: int) -> torch.Tensor:
        """Uniform [0, 1) of length n, this process's slice."""

    def timesteps(self, n: int) -> torch.Tensor:
        """Training timesteps (family's density), this process's slice, on `device`."""

    def training_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The noise x_t is made with (`randn`, plus `noise_offset` x a normal per sample and channel when set)."""

    def error_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights of the errors at timesteps `t` (min-SNR-gamma with `snr_gamma`), or None: unweighted."""

    def latents(self, batch: Batch, key: str) -> torch.Tensor:
        """Scaled latents of batch images `key` ('w', 'l' or '' for unpaired): VAE-encoded pixels or cached."""

    def has_images(self, batch: Batch, key: str = "") -> bool:
        """Whether the batch holds images `key` ('w', 'l' or '' for unpaired) in any form (pixels or cached)."""

    def batch_size(self, batch: Batch) -> int:
        """The number of examples (pairs or images) of this process's batch."""

    def image_sizes(self, batch: Batch | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The images' original sizes and crop offsets (SDXL micro-conditioning), None where the batch has none."""

    def encode_prompts(self, prompts: list[str], batch: Batch | None = None, key: str = "") -> Conditioning:
        """Conditioning for prompts (with empty-prompt dropout) and the images' size/crop where the family needs them."""

    def policy_predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The trained network's prediction, with gradients."""

    def reference_predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The frozen reference's prediction (LoRA disabled, or the frozen copy), without gradients.
        Only for methods with `needs_reference = True` (else an error: no reference was kept)."""

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
    """A training method: how a batch becomes model inputs, and its loss. Subclasses register by `name`
    (or are loaded by dotted path, `method: mypkg.losses:IPO`).

    `needs_reference` is the one place a method says whether it uses the frozen reference: the trainer
    keeps one (a frozen copy for full fine-tunes) only then, and `ctx.reference_predict` refuses otherwise.
    Every setting of the method is a field of its `Options` dataclass (keys under `method_options:`);
    `__post_init__` checks their values (raise ConfigError naming `method_options.KEY`)."""

    name: ClassVar[str] = ""
    data_formats: ClassVar[tuple[str, ...]] = ("pickapic", "pairs")
    needs_reference: ClassVar[bool] = True
    shared_error_path: ClassVar[bool] = True
    """The method's errors come from `paired_errors` / `image_errors` (where `noise_offset` and `snr_gamma`
    act); False makes the config refuse those keys."""

    @dataclasses.dataclass
    class Options:
        """Method-specific keys under `method_options:`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.options = self.parse_options(config.method_options, config.method)

    @classmethod
    def option_names(cls) -> list[str]:
        """The keys the method reads under `method_options`."""
        return [f.name for f in dataclasses.fields(cls.Options)]

    @classmethod
    def parse_options(cls, method_options: dict[str, Any], method: str | None = None,
                      source: str = "method_options") -> Any:
        """The method's `Options` from a `method_options` mapping; a key it does not read, a wrong type or
        a bad value is a ConfigError naming the key, the method and `source`."""
        method = method or cls.name or cls.__name__
        fields = cls.option_names()
        unknown = [k for k in method_options if k not in fields]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: key '{unknown[0]}' is not read by method '{method}' "
                              f"(its options: {', '.join(fields) or 'none'}){hint}")
        try:
            return from_dict(cls.Options, dict(method_options), source, "method_options.")
        except ConfigError as exc:  # a value check of Options.__post_init__ does not know the source
            msg = str(exc)
            raise ConfigError(msg if msg.startswith(f"{source}:") else f"{source}: {msg}") from None

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


def check_option(ok: bool, key: str, requirement: str, value: Any) -> None:
    """For `Options.__post_init__`: a ConfigError `method_options.KEY must REQUIREMENT, got VALUE` unless ok."""
    if not ok:
        raise ConfigError(f"method_options.{key} must {requirement}, got {value!r}")


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls

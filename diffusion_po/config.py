"""Typed run configuration: YAML files and `--set key=value` overrides into validated dataclasses.

Key names follow the diffusers training examples' flags, so a command line from those scripts carries
over (`learning_rate`, `train_batch_size`, `gradient_accumulation_steps`, `beta_dpo`, ...). The data set
is its own section (`data:`). Method-specific options live under `method_options:` and are validated by
the method's own `Options` dataclass; the diffusers scripts' top-level spellings of method settings
(`METHOD_KEY_ALIASES`: `beta_dpo: 5000`, `--set beta_dpo=...`) mean the same keys under `method_options`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import yaml

from diffusion_po.errors import ConfigError

if TYPE_CHECKING:
    import torch
METHOD_KEY_ALIASES = ("beta_dpo", "sft_weight", "label_smoothing")
"""Method settings that may also be written at the top level, as the diffusers training examples' flags;
they go to `method_options`, where the chosen method must read them."""


@dataclass
class DataConfig:
    """Where the training examples come from and how images are prepared."""

    format: Literal["pickapic", "pairs", "dcpo", "prompts", "images", "cache"] = "pickapic"
    """pickapic: parquet with jpg_0/jpg_1/label_0/caption; pairs: prompt/chosen/rejected (paths or bytes);
    dcpo: pickapic plus caption_0/caption_1; prompts: text only; images: image/caption (SFT, DRO experts,
    KTO with a label column); cache: a folder written by `diffusion-po data cache`."""
    data_files: list[str] = field(default_factory=list)
    """Local files or glob patterns (parquet, jsonl, json, csv)."""
    dataset_name: str | None = None
    """A local `datasets` folder (save_to_disk) or a hub data set id (needs network)."""
    split: str = "train"
    streaming: bool = False
    shuffle_buffer_size: int = 1000
    drop_ties: bool = True
    strict: bool = False
    """Stop at the first bad row (with its row id) instead of skipping and counting it."""
    reverse_labels: bool = False
    """Swap winner and loser (Diffusion-NPO trains on reversed preferences)."""
    caption_column: str = "caption"
    label_column: str = "label"
    """For `images` with labels (KTO): 1 desirable, 0 undesirable."""
    max_train_samples: int | None = None
    center_crop: bool = True
    random_crop: bool = False
    random_flip: bool = True
    image_root: str | None = None
    """Folder that relative image paths in `pairs`/`images` files are resolved against (default: the file's folder)."""
    cache_dir: str | None = None
    """Root folder of encoded-data caches (`diffusion-po data cache` writes `<cache_dir>/<model key>/<resolution>/`;
    `format: cache` trains from the one made for this run's model and resolution)."""


@dataclass
class TrainConfig:
    """A training run. Defaults follow the Diffusion-DPO repository where it has one."""

    method: str = "dpo"
    pretrained_model_name_or_path: str = ""
    pretrained_vae_model_name_or_path: str | None = None
    revision: str | None = None
    variant: str | None = None
    output_dir: str = "runs/dpo"
    seed: int = 0
    resolution: int = 512
    max_sequence_length: int | None = None
    """T5 prompt length (tokens) of families with a T5 encoder (SD3), the same for training and sampling;
    None = the stock pipeline's default (256)."""

    train_batch_size: int = 1
    """Pairs (or examples) per device per micro-step."""
    gradient_accumulation_steps: int = 1
    total_batch_size: int | None = None
    """Pairs (or examples) per optimizer update over all processes. When set, the trainer derives
    gradient_accumulation_steps = total_batch_size / (train_batch_size x processes) once it knows the process
    count (a ConfigError if that does not divide), so a recipe keeps its batch on any number of GPUs; with
    `scale_lr` the learning rate is then learning_rate x total_batch_size on any number of GPUs."""
    max_train_steps: int = 2000
    learning_rate: float = 1e-8
    scale_lr: bool = False
    """Multiply learning_rate by train_batch_size x gradient_accumulation_steps x processes (Diffusion-DPO repo)."""
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0

    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """`no` (YAML reads a bare `no` as false: both mean fp32), fp16 or bf16."""
    upcast_vae: bool = False
    """Keep the VAE in fp32 whatever mixed_precision is (the diffusers SDXL DPO example keeps even the fp16-fix
    VAE in fp32 "to avoid NaN losses"); false: fp32 only where the VAE's config asks (force_upcast)."""
    sdxl_time_ids: Literal["image", "fixed"] = "image"
    """SDXL micro-conditioning: `image` = each image's original size and crop (the diffusers example);
    `fixed` = [res, res, 0, 0, res, res] for every image (the Diffusion-DPO repository, its released DPO-SDXL)."""
    gradient_checkpointing: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    allow_tf32: bool = True

    use_lora: bool = False
    rank: int = 8
    lora_alpha: float | None = None
    """Defaults to `rank` (scale 1), as in the diffusers examples."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    use_ema: bool = False
    ema_decay: float = 0.9999

    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    """How many checkpoints to keep (the newest); null keeps all."""
    async_checkpointing: bool | None = None
    """Write checkpoints in the background: the state is copied to (pinned) host memory, training goes on,
    and the files, manifest and commit follow in a thread; None = on with CUDA, off on CPU. Needs host RAM
    for one copy of the checkpointed state (kept between checkpoints)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder, or `latest` for the newest good `output_dir/checkpoint-N` (verified)."""
    overwrite_output_dir: bool = False
    """A fresh run into an `output_dir` that holds another run replaces it (otherwise it stops)."""
    max_loss_spike_ratio: float | None = 100.0
    """Refuse to commit a checkpoint when the median loss since the last checkpoint is more than this many
    times the median of the earlier steps (an exploded run); null turns the check off."""
    report_to: str = "tensorboard"
    """tensorboard, wandb, all, or none."""
    logging_dir: str = "logs"
    save_full_pipeline: bool = False
    """Full fine-tunes: also write the whole pipeline (model_index.json, vae/, text_encoder/, ...)."""

    proportion_empty_prompts: float = 0.0
    max_nonfinite_steps: int = 20
    """Stop after this many optimizer steps in a row whose loss was NaN/inf (each one is skipped)."""
    dataloader_num_workers: int | None = None
    """Loader worker processes; None = on a GPU, up to 4 per process (image decoding off the critical
    path; 2 from the data cache), on the CPU 0 (the cores train). Batches are the same either way."""

    # --- speed switches (docs/performance.md); none changes the loss beyond bf16 rounding
    compile: Literal["auto", "none", "blocks", "full"] = "auto"
    """torch.compile of the network: `blocks` compiles each repeated block (regional compilation: a
    fraction of the start-up time of `full`, nearly the same speed); `auto` = blocks on CUDA, none on CPU."""
    compile_blocks: list[str] = field(default_factory=list)
    """Class names of the blocks `compile: blocks` compiles; empty = the family's default
    (UNets: BasicTransformerBlock, ResnetBlock2D; SD3: JointTransformerBlock)."""
    compile_mode: str | None = None
    """torch.compile mode (None = default; `max-autotune-no-cudagraphs`, `reduce-overhead`)."""
    compile_backend: str = "inductor"
    compile_dynamic: bool | None = None
    """torch.compile `dynamic`: None lets dynamo make a dimension dynamic once it sees it change (fewer
    recompilations across block sizes), False compiles every shape for itself."""
    compile_cache_dir: str | None = None
    """Root of the persistent compile cache (inductor FX-graph and AOT-autograd caches), one folder per
    network config and compile settings; None = $DIFFUSION_PO_COMPILE_CACHE or ~/.cache/diffusion-po/compile.
    A TORCHINDUCTOR_CACHE_DIR set in the environment wins."""
    channels_last: bool | None = None
    """channels-last memory format for the UNet's convolutions; None = on with CUDA, off on CPU."""
    frozen_weights_in_weight_dtype: bool = True
    """LoRA: keep the frozen base weights in the mixed-precision dtype (bf16/fp16), as the diffusers
    examples do, instead of fp32 cast on every forward; the LoRA weights stay fp32."""
    fused_optimizer: bool | None = None
    """torch's fused AdamW; None = on with CUDA. It also skips a non-finite step on the device (`found_inf`),
    so the step needs no host read before the update."""
    reference_inference_mode: bool = True
    """Run the reference forward under torch.inference_mode (no autograd bookkeeping at all)."""
    attention_backend: str | None = None
    """diffusers attention backend (`set_attention_backend`: flash, _native_cudnn, ...); None = PyTorch SDPA's choice."""
    encoders_on_device: bool | None = None
    """Keep the VAE and text encoders on the GPU; None = not when training from the data cache (which
    needs neither: they stay on the CPU, for the rare prompt a method encodes itself)."""
    prefetch_to_device: bool = True
    """CUDA: copy the next batch to the GPU on a side stream while the current step runs."""
    method_options: dict[str, Any] = field(default_factory=dict)
    """The method's settings (its `Options`); `load_train_config` fills in the method's defaults."""
    data: DataConfig = field(default_factory=DataConfig)

    @classmethod
    def prepare_keys(cls, data: dict[str, Any], source: str) -> dict[str, Any]:
        """Move the top-level spellings of method settings (METHOD_KEY_ALIASES) under `method_options`."""
        given = [k for k in METHOD_KEY_ALIASES if k in data]
        options = data.get("method_options")
        if not given or not (options is None or isinstance(options, dict)):
            return data
        out, options = dict(data), dict(options or {})
        for key in given:
            value = out.pop(key)
            if key in options and options[key] != value:
                raise ConfigError(f"{source}: key '{key}' is set twice, {value!r} at the top level and "
                                  f"{options[key]!r} under method_options; keep one")
            options[key] = value
        out["method_options"] = options
        return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{source}: key '{key}' has {value!r}, expected {_type_name(tp)}"
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "no" in choices:  # YAML 1.1 reads a bare `no` (mixed_precision: no) as false
            value = "no"
        if value not in choices:
            raise ConfigError(f"{source}: key '{key}' is {value!r}; choose one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key '{key}' must be a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section '{key}' must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, source, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: key '{key}': unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], source: str = "<config>", prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, naming the key and `source` on any unknown key or wrong type.
    A class with a `prepare_keys(data, source)` classmethod rewrites the mapping first (key aliases)."""
    prepare = getattr(cls, "prepare_keys", None)
    if prepare is not None:
        data = prepare(data, source)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}", source) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` or `section.key=value`; the value is read as YAML (1e-5, true, [a, b], null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key=value` (dotted for sections) set. A method setting with a
    top-level spelling (`beta_dpo=...` or `method_options.beta_dpo=...`) replaces it where `data` sets it."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        key, value = parse_override(text)
        for parts in _override_targets(out, key.split(".")):
            node = out
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override '{text}': '{part}' is not a section")
            node[parts[-1]] = value
    return out


def _override_targets(data: dict[str, Any], parts: list[str]) -> list[list[str]]:
    """Where an override goes: the key itself, or, for a method setting of METHOD_KEY_ALIASES, each of its two
    spellings that `data` already has (so `--set beta_dpo=...` wins over a file's `method_options.beta_dpo`)."""
    name = parts[-1]
    spellings = [[name], ["method_options", name]]
    if name not in METHOD_KEY_ALIASES or parts not in spellings:
        return [parts]
    options = data.get("method_options")
    present = [p for p in spellings if (name in data if len(p) == 1 else isinstance(options, dict) and name in options)]
    return present or [parts]


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML file (or defaults when None), apply overrides, validate, and return a TrainConfig."""
    data = load_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        data = apply_overrides(data, overrides)
        source += " (with --set overrides)"
    cfg = from_dict(TrainConfig, data, source)
    validate(cfg, source)
    return cfg


def validate(cfg: TrainConfig, source: str) -> None:
    """Checks across keys that the types alone cannot express."""
    positive = ["train_batch_size", "gradient_accumulation_steps", "max_train_steps", "resolution", "rank"]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{source}: key '{key}' must be positive, got {getattr(cfg, key)}")
    if cfg.checkpointing_steps <= 0:
        raise ConfigError(f"{source}: key 'checkpointing_steps' must be positive")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit <= 0:
        raise ConfigError(f"{source}: key 'checkpoints_total_limit' is {cfg.checkpoints_total_limit}; give how many "
                          "checkpoints to keep (1 or more), or null to keep all")
    if cfg.max_loss_spike_ratio is not None and cfg.max_loss_spike_ratio <= 1:
        raise ConfigError(f"{source}: key 'max_loss_spike_ratio' must be above 1 (or null to turn the check off)")
    if not 0.0 <= cfg.proportion_empty_prompts < 1.0:
        raise ConfigError(f"{source}: key 'proportion_empty_prompts' must be in [0, 1)")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"{source}: key 'learning_rate' must be positive")
    if not cfg.pretrained_model_name_or_path:
        raise ConfigError(f"{source}: key 'pretrained_model_name_or_path' is required (a local folder or hub id)")
    if cfg.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise ConfigError(f"{source}: key 'report_to' must be tensorboard, wandb, all or none")
    if cfg.total_batch_size is not None and cfg.total_batch_size <= 0:
        raise ConfigError(f"{source}: key 'total_batch_size' must be positive, got {cfg.total_batch_size}")
    _check_lr_scheduler(cfg.lr_scheduler, source)
    resolve_method_options(cfg, source)


def resolve_method_options(cfg: TrainConfig, source: str) -> None:
    """Check `cfg.method_options` against the chosen method's `Options` (keys it reads, types, values) and
    fill in its defaults, so the error comes before any model is loaded and the saved config shows them."""
    from diffusion_po.objectives import get_method_class  # the methods' Options build on this module

    try:
        method_cls = get_method_class(cfg.method)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc.__cause__
    options = method_cls.parse_options(cfg.method_options, cfg.method, source)
    cfg.method_options = dataclasses.asdict(options)


def default_num_workers(cfg: TrainConfig, device_type: str, num_processes: int = 1) -> int:
    """`dataloader_num_workers`, or its default: decoding workers on a GPU (bounded by the cores each process
    has), none on the CPU, where the cores are busy training."""
    import os

    if cfg.dataloader_num_workers is not None:
        return cfg.dataloader_num_workers
    if device_type != "cuda":
        return 0
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    wanted = 2 if cfg.data.format == "cache" else 4
    return max(0, min(wanted, cores // max(1, num_processes) - 1))


def _check_lr_scheduler(name: str, source: str) -> None:
    """`lr_scheduler` must be one of diffusers' `get_scheduler` names (checked before any model loads)."""
    import difflib

    from diffusers.optimization import SchedulerType

    names = [s.value for s in SchedulerType]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}: key 'lr_scheduler' is {name!r}{hint}; choose one of {', '.join(names)}")


def resolve_total_batch(cfg: TrainConfig, num_processes: int) -> TrainConfig:
    """`cfg` with gradient_accumulation_steps derived from `total_batch_size` for `num_processes` processes
    (unchanged when total_batch_size is not set)."""
    if cfg.total_batch_size is None:
        return cfg
    per_step = cfg.train_batch_size * num_processes
    steps, rest = divmod(cfg.total_batch_size, per_step)
    if rest or steps == 0:
        raise ConfigError(
            f"total_batch_size {cfg.total_batch_size} is not a multiple of train_batch_size {cfg.train_batch_size} "
            f"x {num_processes} process(es) = {per_step}; change train_batch_size, the process count or total_batch_size"
        )
    if cfg.gradient_accumulation_steps not in (1, steps):
        raise ConfigError(
            f"total_batch_size {cfg.total_batch_size} sets gradient_accumulation_steps ({steps} on {num_processes} "
            f"process(es)); drop gradient_accumulation_steps: {cfg.gradient_accumulation_steps} or total_batch_size"
        )
    return dataclasses.replace(cfg, gradient_accumulation_steps=steps)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    """The torch dtype of the frozen weights under `mixed_precision` (fp16, bf16; anything else fp32)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)

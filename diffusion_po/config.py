"""Typed run configuration: YAML files and `--set key=value` overrides into validated dataclasses.

Key names follow the diffusers training examples' flags, so a command line from those scripts carries
over (`learning_rate`, `train_batch_size`, `gradient_accumulation_steps`, `beta_dpo`, ...). The data set
is its own section (`data:`). Method-specific options live under `method_options:` and are validated by
the method's own `Options` dataclass; the diffusers scripts' top-level spellings of method settings
(`METHOD_KEY_ALIASES`: `beta_dpo: 5000`, `--set beta_dpo=...`) mean the same keys under `method_options`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from diffusion_po.errors import ConfigError
from diffusion_po.typed import from_dict, to_dict  # noqa: F401  (re-exported: config.from_dict, config.to_dict)

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
    aspect_buckets: bool = False
    """Aspect-ratio buckets (SDXL/FLUX-style): each pair goes to the bucket nearest jpg_0's aspect ratio, both
    images are resized and cropped to it, and every batch holds one bucket only; off: square `resolution` crops."""
    buckets: list[list[int]] = field(default_factory=list)
    """The buckets as [width, height] pairs; empty = SDXL's standard buckets scaled to `resolution`."""
    cache_dir: str | None = None
    """Root folder of encoded-data caches (`diffusion-po data cache` writes `<cache_dir>/<model key>/<resolution>/`;
    `format: cache` trains from the one made for this run's model and resolution)."""


@dataclass
class ValidationGuidance:
    """The sampler of validation images: `diffusion_po.sampling.generate`'s settings."""

    name: str = "cfg"
    """cfg, perp-neg, npo (or composable)."""
    scale: float | None = None
    """Guidance scale; None = the family's usual one (7.5 for SD, 5 for SDXL, ...)."""
    rescale: float = 0.0
    negative_prompt: str | list[str] | None = None
    """Negative prompts, "text" or "text:weight" each (Perp-Neg weights, `diffusion-po sample` syntax)."""
    steps: int | None = None
    """Denoising steps; None = the family's default."""
    scheduler: str | None = None
    """A scheduler short name or diffusers class (as `diffusion-po sample --scheduler`); None = the pipeline's."""
    negative_model: str | None = None
    """npo: the negative model, an NPO LoRA (file or folder, put on the base model) or a network folder."""


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
    family_options: dict[str, Any] = field(default_factory=dict)
    """Options of the model's family (`Family.option_types`), e.g. `weighting: logit_normal|none` (SD3, SD3.5,
    FLUX.1, Z-Image: the training timestep density), `guidance_scale: 3.5` (FLUX.1-dev's embedded guidance);
    `max_sequence_length` may be written here or at the top level. Checked when the model loads (a key the
    family does not have is an error naming it and the family)."""

    train_batch_size: int = 1
    """Pairs (or examples) per device per micro-step."""
    gradient_accumulation_steps: int = 1
    total_batch_size: int | None = None
    """Pairs (or examples) per optimizer update over all processes. When set, the trainer derives
    gradient_accumulation_steps = total_batch_size / (train_batch_size x processes) once it knows the process
    count (a ConfigError if that does not divide), so a recipe keeps its batch on any number of GPUs; with
    `scale_lr` the learning rate is then learning_rate x total_batch_size on any number of GPUs."""
    max_train_steps: int = 2000
    num_train_epochs: int | None = None
    """Train this many passes over the data instead of `max_train_steps` (the steps follow from the usable
    rows and the effective batch, as in the diffusers examples); not with streaming data (no row count)."""
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
    """CUDA: TF32 matmuls and convolutions (torch.backends.cuda.matmul / cudnn .allow_tf32); false sets them off."""
    snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' `--snr_gamma`, 5.0 recommended): each sample's
    error is weighted by min(SNR, gamma)/SNR (epsilon), /(SNR + 1) (v_prediction) or min(SNR, gamma) (sample),
    the same weight on policy and reference errors. DDPM families only; None = unweighted."""
    noise_offset: float = 0.0
    """Add noise_offset x a per-channel normal to the training noise (diffusers' `--noise_offset`; 0.1 common)."""

    use_lora: bool = False
    rank: int = 8
    lora_alpha: float | None = None
    """Defaults to `rank` (scale 1), as in the diffusers examples."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, peft's `LoraConfig(use_dora=True)`); needs use_lora."""

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
    """The trackers' folder, relative to output_dir (or absolute); tensorboard writes under
    `<logging_dir>/<tracker_project_name>/`."""
    tracker_project_name: str = "diffusion-po"
    """The project name given to accelerate's `init_trackers` (the wandb project, the tensorboard run folder)."""

    # --- validation images during training (docs/training.md, "Validation images and model card")
    validation_prompts: str | list[str] | None = None
    """Prompts sampled during training: a list, or a .txt (one prompt a line) / .jsonl prompt file (as
    `diffusion-po sample`); None turns validation off."""
    validation_steps: int = 500
    """Sample the validation prompts every this many optimizer steps (and at step 0 and at the end)."""
    num_validation_images: int = 2
    """Images per validation prompt; image j of every prompt has seed validation_seed + j, at every step."""
    validation_seed: int = 0
    validation_guidance: ValidationGuidance = field(default_factory=ValidationGuidance)
    """How validation images are sampled (a section, or just the name: `validation_guidance: perp-neg`)."""
    validation_scorer: str | None = None
    """A scorer of `diffusion-po eval score` (pickscore, hps_v2.1, clip, aesthetic, toy, ...): the mean over
    the validation images is logged as `validation/<scorer>`."""
    validation_scorer_options: dict[str, Any] = field(default_factory=dict)
    """The scorer's options (`checkpoint`, `models_root`, ...), as `--checkpoint NAME.OPTION=VALUE` of eval score."""

    # --- the model card and the hub
    push_to_hub: bool = False
    """At the end, upload output_dir (without checkpoints) to the hub repo `hub_model_id`; offline or without
    a token the run ends with an error after everything is saved."""
    hub_model_id: str | None = None
    """The hub repo (`user/name`); None = the output_dir's folder name under your account."""
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
        if isinstance(data.get("validation_guidance"), str):  # the shorthand `validation_guidance: perp-neg`
            data = {**data, "validation_guidance": {"name": data["validation_guidance"]}}
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
    if cfg.num_train_epochs is not None and cfg.num_train_epochs <= 0:
        raise ConfigError(f"{source}: key 'num_train_epochs' must be positive, got {cfg.num_train_epochs}")
    if cfg.num_train_epochs is not None and cfg.data.streaming:
        raise ConfigError(f"{source}: key 'num_train_epochs' needs the data's row count, which streaming data "
                          "does not have; set max_train_steps instead, or data.streaming: false")
    if cfg.snr_gamma is not None and cfg.snr_gamma <= 0:
        raise ConfigError(f"{source}: key 'snr_gamma' must be positive (5.0 is usual), or null for no weighting")
    if cfg.noise_offset < 0:
        raise ConfigError(f"{source}: key 'noise_offset' must be >= 0, got {cfg.noise_offset}")
    if cfg.use_dora and not cfg.use_lora:
        raise ConfigError(f"{source}: key 'use_dora' trains a DoRA adapter and needs use_lora: true")
    _check_buckets(cfg.data, source)
    _check_lr_scheduler(cfg.lr_scheduler, source)
    try:
        family_options_of(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _check_validation(cfg, source)
    resolve_method_options(cfg, source)
    _check_shared_error_path(cfg, source)


def _check_buckets(data: DataConfig, source: str) -> None:
    """`data.buckets` are [width, height] pairs of positive sizes, and only with `data.aspect_buckets`."""
    if data.buckets and not data.aspect_buckets:
        raise ConfigError(f"{source}: key 'data.buckets' is set but data.aspect_buckets is false; turn it on or drop it")
    for i, bucket in enumerate(data.buckets):
        if len(bucket) != 2 or min(bucket) <= 0:
            raise ConfigError(f"{source}: key 'data.buckets[{i}]' is {bucket!r}; give [width, height] in pixels")
    if data.aspect_buckets and data.format not in ("pickapic", "dcpo", "pairs", "images"):
        raise ConfigError(f"{source}: data.aspect_buckets needs image data (data.format pickapic, dcpo, pairs or "
                          f"images), not '{data.format}'")
    if data.aspect_buckets and data.streaming:
        raise ConfigError(f"{source}: data.aspect_buckets groups all rows by aspect ratio first; it does not work "
                          "with data.streaming: true")


def _check_shared_error_path(cfg: TrainConfig, source: str) -> None:
    """snr_gamma and noise_offset act where the shared error path draws noise and weighs errors
    (paired_errors / image_errors); a method that does its own refuses them."""
    from diffusion_po.objectives import get_method_class

    method_cls = get_method_class(cfg.method)
    given = [k for k, on in (("snr_gamma", cfg.snr_gamma is not None), ("noise_offset", cfg.noise_offset > 0)) if on]
    if given and not method_cls.shared_error_path:
        raise ConfigError(f"{source}: key '{given[0]}' is not supported by method '{cfg.method}' (it draws its own "
                          "noise and errors, not through the shared paired/image error path); remove the key")


def family_options_of(cfg: TrainConfig) -> dict[str, Any]:
    """The options of the run's Family (`load_family(..., options=)`): `family_options` with the top-level
    `max_sequence_length`; a ConfigError when both set it to different values."""
    options = dict(cfg.family_options)
    if cfg.max_sequence_length is not None:
        given = options.setdefault("max_sequence_length", cfg.max_sequence_length)
        if given != cfg.max_sequence_length:
            raise ConfigError(f"key 'max_sequence_length' is set twice, {cfg.max_sequence_length!r} at the top level "
                              f"and {given!r} under family_options; keep one")
    return options


PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json")
"""A `validation_prompts` string ending so is a prompt file; any other string is one prompt."""


def _check_validation(cfg: TrainConfig, source: str) -> None:
    """The validation keys, before any model loads: counts, the guidance and scorer names, the files."""
    if cfg.validation_prompts is None:
        return
    for key in ("validation_steps", "num_validation_images"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{source}: key '{key}' must be positive, got {getattr(cfg, key)}")
    if cfg.validation_prompts == [] or cfg.validation_prompts == "":
        raise ConfigError(f"{source}: key 'validation_prompts' is empty; give prompts, a prompt file, or null")
    prompts = cfg.validation_prompts
    if isinstance(prompts, str) and prompts.lower().endswith(PROMPT_FILE_SUFFIXES) and not Path(prompts).is_file():
        raise ConfigError(f"{source}: key 'validation_prompts': prompt file '{prompts}' does not exist")
    from diffusion_po.guidance import GUIDANCE_METHODS, make_guidance

    g = cfg.validation_guidance
    try:
        guidance = make_guidance(g.name)
    except ValueError as exc:
        raise ConfigError(f"{source}: key 'validation_guidance.name': {exc}") from None
    g.name = guidance.name
    if guidance.requires_negative_model and not g.negative_model:
        raise ConfigError(f"{source}: validation_guidance '{g.name}' needs validation_guidance.negative_model "
                          "(an NPO LoRA or a negative network folder)")
    if g.negative_model and not guidance.requires_negative_model:
        raise ConfigError(f"{source}: validation_guidance.negative_model is read by 'npo' guidance only, not "
                          f"'{g.name}' ({', '.join(GUIDANCE_METHODS)})")
    if g.steps is not None and g.steps <= 0:
        raise ConfigError(f"{source}: key 'validation_guidance.steps' must be positive, got {g.steps}")
    if cfg.validation_scorer is not None:
        from diffusion_po.errors import UserError
        from diffusion_po.eval.scorers import canonical_name

        try:
            cfg.validation_scorer = canonical_name(cfg.validation_scorer)
        except UserError as exc:
            raise ConfigError(f"{source}: key 'validation_scorer': {exc}") from None


def resolve_method_options(cfg: TrainConfig, source: str) -> None:
    """Check `cfg.method_options` against the chosen method's `Options` (keys it reads, types, values) and
    fill in its defaults, so the error comes before any model is loaded and the saved config shows them."""
    from diffusion_po.objectives import get_method_class  # local: torch loads only when a config is validated

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


def steps_for_epochs(cfg: TrainConfig, batches_per_epoch: int) -> TrainConfig:
    """`cfg` with max_train_steps = num_train_epochs passes of `batches_per_epoch` global micro-batches,
    rounded up to whole optimizer steps (unchanged when num_train_epochs is not set)."""
    if cfg.num_train_epochs is None:
        return cfg
    steps = math.ceil(cfg.num_train_epochs * batches_per_epoch / cfg.gradient_accumulation_steps)
    return dataclasses.replace(cfg, max_train_steps=steps)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    """The torch dtype of the frozen weights under `mixed_precision` (fp16, bf16; anything else fp32)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)

"""The shared trainer: one loop on accelerate for every method.

The trainer loads the family, wraps the network (LoRA through peft, or full fine-tuning with a frozen
reference copy), feeds batches to the method, and owns precision, accumulation, clipping, EMA,
checkpoints, resume, logging and the final diffusers-format outputs. It knows nothing of any method.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffusion_po.config import (
    TrainConfig,
    default_num_workers,
    family_options_of,
    resolve_total_batch,
    save_config,
    steps_for_epochs,
    to_dict,
    weight_dtype_of,
)
from diffusion_po.data import build_train_data
from diffusion_po.errors import ConfigError, DataError, UserError
from diffusion_po.families import Conditioning, Family, compile_regions, cond_to, load_family
from diffusion_po.families.base import raise_compile_limits
from diffusion_po.objectives import Method, get_method_class
from diffusion_po.training import async_checkpoint, model_card, run_folder, validation
from diffusion_po.training import checkpoint as ckpt

logger = logging.getLogger("diffusion_po.train")


class TrainingError(UserError):
    """The run cannot go on (non-finite losses, out of memory); the message says what to change."""


OOM_ADVICE = (
    "out of memory. Lower train_batch_size (and raise gradient_accumulation_steps to keep the effective batch), "
    "turn on gradient_checkpointing, use mixed_precision bf16/fp16, or train a LoRA (use_lora: true, rank)."
)


@dataclass
class TrainState:
    """What accelerate does not save by itself: counters and the shared noise generator."""

    step: int = 0
    micro_step: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    bad_rows: int = 0
    recent_losses: list[float] = field(default_factory=list)
    """The logged loss of the latest steps (for the loss-spike check before a checkpoint)."""
    """Distinct bad rows seen so far, over all processes."""
    bad_row_ids: list[Any] = field(default_factory=list)
    generator_state: torch.Tensor | None = None
    host_generator_state: tuple | None = None
    method_state: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


#: the host generator's seed is the run's seed plus this (its stream differs from the device generator's on CPU)
HOST_SEED_OFFSET = 1_000_003


class Context:
    """The `TrainContext` the methods see (see diffusion_po/objectives/base.py)."""

    def __init__(self, trainer: Trainer):
        self._t = trainer
        self.family: Family = trainer.family
        self.config: TrainConfig = trainer.cfg
        self.device: torch.device = trainer.accelerator.device
        self.process_index: int = trainer.accelerator.process_index
        self.num_processes: int = trainer.accelerator.num_processes
        # on the training device: the draws need no host-to-device copy (and no synchronisation)
        self.generator = torch.Generator(device=self.device).manual_seed(trainer.cfg.seed)
        #: host-side draws (prompt dropout picks strings): a stream of its own, so no device read is needed
        self.host_generator = random.Random(trainer.cfg.seed + HOST_SEED_OFFSET)

    # --- random draws: global, sliced per process
    def _slice(self, full: torch.Tensor, n: int) -> torch.Tensor:
        lo = self.process_index * self.config.train_batch_size
        return full[lo : lo + n]

    def _global_n(self, n: int) -> int:
        per = max(n, self.config.train_batch_size)
        return per * self.num_processes

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        full = torch.randn((self._global_n(shape[0]), *shape[1:]), generator=self.generator, device=self.device)
        return self._slice(full, shape[0])

    def rand(self, n: int) -> torch.Tensor:
        return self._slice(torch.rand(self._global_n(n), generator=self.generator, device=self.device), n)

    def timesteps(self, n: int) -> torch.Tensor:
        full = self.family.sample_timesteps(self._global_n(n), self.generator)
        return self._slice(full, n).to(self.device)

    def training_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        noise = self.randn(shape)
        offset = self.config.noise_offset
        if offset > 0:  # as the diffusers examples: offset x a normal per sample and channel, drawn after the noise
            noise = noise + offset * self.randn((shape[0], shape[1], *([1] * (len(shape) - 2))))
        return noise

    def error_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        gamma = self.config.snr_gamma
        return None if gamma is None else self.family.min_snr_weights(t, gamma).to(self.device)

    # --- inputs
    IMAGE_KEYS = ("latents", "latent_mean", "pixels")
    """The forms images `key` take in a batch: `latents_KEY`, `latent_mean_KEY` (+ `latent_std_KEY`), `pixels_KEY`."""

    def has_images(self, batch: dict[str, Any], key: str = "") -> bool:
        suffix = f"_{key}" if key else ""
        return any(f"{kind}{suffix}" in batch for kind in self.IMAGE_KEYS)

    def batch_size(self, batch: dict[str, Any]) -> int:
        return int(batch["size"]) if "size" in batch else len(batch["captions"])

    def image_sizes(self, batch: dict[str, Any] | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not batch:
            return None, None
        return batch.get("original_sizes"), batch.get("crop_top_lefts")

    def latents(self, batch: dict[str, Any], key: str) -> torch.Tensor:
        suffix = f"_{key}" if key else ""
        if f"latents{suffix}" in batch:
            return batch[f"latents{suffix}"].to(self.device).float()
        if f"latent_mean{suffix}" in batch:  # cached posterior: draw like the VAE would
            mean = batch[f"latent_mean{suffix}"].to(self.device).float()
            std = batch[f"latent_std{suffix}"].to(self.device).float()
            return self.family.scale_latents(mean + std * self.randn(tuple(mean.shape)))
        pixels = batch[f"pixels{suffix}"].to(self.device)
        f = self.family.vae_scale_factor
        shape = (pixels.shape[0], self.family.latent_channels, pixels.shape[2] // f, pixels.shape[3] // f)
        return self.family.encode_images(pixels, eps=self.randn(shape)).to(self.device)

    def encode_prompts(self, prompts: list[str], batch: dict[str, Any] | None = None, key: str = "") -> Conditioning:
        prompts = list(prompts)
        p = self.config.proportion_empty_prompts
        if p > 0:
            # decided on the host (they pick strings), from a host generator: no device read
            lo = self.process_index * self.config.train_batch_size
            draws = [self.host_generator.random() for _ in range(self._global_n(len(prompts)))][lo : lo + len(prompts)]
            prompts = ["" if u < p else text for u, text in zip(draws, prompts)]
        if batch is not None and "prompt_cond" in batch and p == 0:  # precomputed embeddings (data cache)
            return cond_to(batch["prompt_cond"], self.device)
        sizes, crops = self.image_sizes(batch)
        # the images' (h, w): an aspect bucket's, else the run's square resolution (SDXL's target size)
        resolution = batch.get("target_size", self.config.resolution) if batch else self.config.resolution
        table = batch.get("prompt_table") if batch else None
        if table is not None:  # the data cache: embeddings of every caption of the batch, and of ""
            rows = [table["index"].get(text) for text in prompts]
            if all(r is not None for r in rows):
                index = torch.tensor(rows, dtype=torch.long)
                cond = {k: v[index.to(v.device)].to(self.device, non_blocking=True).float()
                        for k, v in table["cond"].items()}
                return self.family.row_conditioning(cond, sizes, crops, resolution)
        return cond_to(self.family.encode_prompts(prompts, sizes, crops, resolution), self.device)

    # --- predictions
    def policy_predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        with self._t.accelerator.autocast():
            return self.family.predict(self._t.network, self._t.network_input(x_t), t, cond)

    def reference_predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        method = self._t.method
        if not method.needs_reference:  # no frozen copy was kept: the "reference" would be the live policy
            raise RuntimeError(f"method '{self.config.method}' calls ctx.reference_predict but declares "
                            f"needs_reference = False; set needs_reference = True on {type(method).__name__}")
        inference = self.config.reference_inference_mode
        with torch.inference_mode() if inference else torch.no_grad():
            with self._t.reference_network() as ref, self._t.accelerator.autocast():
                out = self.family.predict(ref, self._t.network_input(x_t), t, cond)
        # an inference tensor may not meet autograd later; a copy outside inference mode may
        return out.clone() if inference else out

    def autocast(self):
        """The run's mixed-precision context (for methods that call networks themselves)."""
        return self._t.accelerator.autocast()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar over all processes (e.g. KTO's batch reference point), without grad."""
        acc = self._t.accelerator
        value = value.detach()
        if self.num_processes == 1:
            return value
        return acc.reduce(value.reshape(1).to(acc.device), reduction="mean").reshape(())

    def speed_up(self, module: torch.nn.Module) -> torch.nn.Module:
        """Apply the run's speed switches (channels-last, compiled blocks) to another copy of the network,
        e.g. a sampling snapshot or an EMA teacher (a deep copy of the network is not compiled). In place."""
        speed_up(module, self.config, self.family, self.device, self._t.channels_last)
        return module

    @property
    def trainable_network(self) -> torch.nn.Module:
        """The unwrapped network being trained (for methods that snapshot it, e.g. an EMA teacher)."""
        return self._t.accelerator.unwrap_model(self._t.network)


class Trainer:
    """The training loop. `family`: an already loaded `Family` (benchmarks, notebooks) instead of loading
    `cfg.pretrained_model_name_or_path`."""

    def __init__(self, cfg: TrainConfig, config_source: str | None = None, family: Family | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        check_trackers(cfg.report_to)
        log_with = None if cfg.report_to == "none" else cfg.report_to
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            cpu=not torch.cuda.is_available(),  # lets torchrun/accelerate start gloo processes on CPU-only machines
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / cfg.logging_dir)),
        )
        check_launch(self.accelerator.num_processes)
        # total_batch_size: the accumulation follows from the process count, known only now
        self.cfg = cfg = resolve_total_batch(cfg, self.accelerator.num_processes)
        self.accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self._lock = run_folder.RunLock(self.output_dir)
        # before any model loads: the run folder is usable, and the checkpoint to resume is sound and fits
        self.resume_path, self.resume_changes = self._main_decides(self._preflight)
        method_cls = get_method_class(cfg.method)
        self.method_formats: tuple[str, ...] = tuple(method_cls.data_formats)
        if cfg.data.format not in method_cls.data_formats and cfg.data.format != "cache":
            raise UserError(
                f"method '{cfg.method}' takes data.format {' or '.join(method_cls.data_formats)}, "
                f"not '{cfg.data.format}'"
            )
        self.method: Method = method_cls(cfg)
        self.weight_dtype = weight_dtype_of(cfg.mixed_precision)
        set_tf32(cfg.allow_tf32, self.accelerator.device)

        if family is None:
            family = load_family(cfg.pretrained_model_name_or_path, cfg.pretrained_vae_model_name_or_path,
                                 cfg.revision, cfg.variant, options=family_options_of(cfg))
        self.family = family
        if cfg.snr_gamma is not None:
            check_snr_gamma(family)
        self.cache_fingerprint: str | None = None
        if cfg.data.format == "cache":  # the encoders' identity, taken before they are cast to bf16/fp16
            from diffusion_po.data.cache import fingerprint

            self.cache_fingerprint = fingerprint(family)
        encoders = cfg.encoders_on_device if cfg.encoders_on_device is not None else cfg.data.format != "cache"
        self.family.to(self.accelerator.device, self.weight_dtype, encoders=encoders, upcast_vae=cfg.upcast_vae)
        if cfg.sdxl_time_ids != "image":
            if not hasattr(self.family, "sdxl_time_ids"):
                raise UserError(f"sdxl_time_ids: {cfg.sdxl_time_ids} is for SDXL models, not {type(self.family).__name__}")
            self.family.sdxl_time_ids = cfg.sdxl_time_ids
        network = self.family.network
        self.reference: torch.nn.Module | None = None
        self.channels_last = _want_channels_last(cfg, self.family, self.accelerator.device)
        set_seed(cfg.seed)  # torch/numpy/random: peft's LoRA init draws from the global generator
        if cfg.use_lora:
            from peft import LoraConfig

            network.requires_grad_(False)
            if cfg.frozen_weights_in_weight_dtype and self.weight_dtype != torch.float32:
                torch.nn.Module.to(network, self.weight_dtype)  # frozen base in bf16/fp16, as the diffusers examples
            network.add_adapter(LoraConfig(
                r=cfg.rank, lora_alpha=cfg.lora_alpha or cfg.rank, init_lora_weights="gaussian",
                target_modules=cfg.lora_target_modules, use_dora=cfg.use_dora,
            ))
            for p in network.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            network.requires_grad_(True)
            if self.method.needs_reference:
                self.reference = copy.deepcopy(network).eval().requires_grad_(False)
                if self.weight_dtype != torch.float32:
                    self.reference.to(self.weight_dtype)
        network.train()
        if cfg.gradient_checkpointing:
            network.enable_gradient_checkpointing()
        if cfg.enable_xformers_memory_efficient_attention:
            try:
                network.enable_xformers_memory_efficient_attention()
            except Exception as exc:
                raise UserError(f"xformers requested but not usable here ({exc}); drop the flag to use SDPA") from exc
        self.compiled = speed_up(network, cfg, self.family, self.accelerator.device, self.channels_last)
        if self.reference is not None:
            speed_up(self.reference, cfg, self.family, self.accelerator.device, self.channels_last)

        if cfg.num_train_epochs is not None:  # the steps follow from the data: count its batches once
            self.cfg = cfg = steps_for_epochs(cfg, self.build_data(count_only=True).batches_per_epoch)
            if (self.resume_changes or {}).get("max_train_steps", [None])[0] == cfg.max_train_steps:
                del self.resume_changes["max_train_steps"]  # compared before the steps were known: unchanged
        params = [p for p in network.parameters() if p.requires_grad]
        lr = cfg.learning_rate
        if cfg.scale_lr:
            lr *= cfg.train_batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes
        self.optimizer = self._optimizer(params, lr)
        from diffusers.optimization import get_scheduler

        n = self.accelerator.num_processes
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps * n,
                                          num_training_steps=cfg.max_train_steps * n)
        self.network, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            network, self.optimizer, self.lr_scheduler
        )
        self.ema = None
        if cfg.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel([p for p in self.unwrapped.parameters() if p.requires_grad], decay=cfg.ema_decay)
            self.ema.to(self.accelerator.device)
            self.accelerator.register_for_checkpointing(self.ema)
        self.state = TrainState()
        self._window_finite: torch.Tensor | None = None  # the open accumulation window, on the device
        self._window_metrics: list[dict[str, Any]] = []
        self.compile_error: str | None = None
        self._compile_fallback_pending = cfg.compile == "auto" and self.compiled != "none"
        self._last_commit_step = 0  # the step of the last checkpoint (or of the resume): the loss-spike window
        self.async_checkpoints = self._want_async_checkpoints()
        self._host_copy = async_checkpoint.HostCopier()
        self._writer = async_checkpoint.BackgroundWriter()
        self.accelerator.register_for_checkpointing(self.state)
        self.context = Context(self)
        self.config_source = config_source
        setup = getattr(self.method, "setup", None)
        if callable(setup):
            setup(self.context)

    def _want_async_checkpoints(self) -> bool:
        """`async_checkpointing`, or its default (on with CUDA), where the snapshot can stand for save_state."""
        wanted = self.cfg.async_checkpointing
        why_not = async_checkpoint.supported(self.accelerator)
        if wanted and why_not:
            raise ConfigError(f"async_checkpointing: true cannot be used here ({why_not}); set it to false or null")
        if wanted is None:
            return self.accelerator.device.type == "cuda" and why_not is None
        return bool(wanted)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.network)

    def network_input(self, x_t: torch.Tensor) -> torch.Tensor:
        """The noisy latents as the network wants them (channels-last for convolutional networks)."""
        if self.channels_last and x_t.dim() == 4:
            return x_t.contiguous(memory_format=torch.channels_last)
        return x_t

    def _optimizer(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        cfg = self.cfg
        kwargs = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                      eps=cfg.adam_epsilon)
        if cfg.use_8bit_adam:
            if not torch.cuda.is_available():
                raise UserError("use_8bit_adam needs a CUDA GPU and bitsandbytes; set use_8bit_adam: false")
            try:
                import bitsandbytes as bnb
            except ImportError as exc:
                raise UserError("use_8bit_adam needs bitsandbytes: pip install 'diffusion-po[bnb]'") from exc
            return bnb.optim.AdamW8bit(params, **kwargs)
        fused = cfg.fused_optimizer
        if fused is None:
            fused = self.accelerator.device.type == "cuda"
        return torch.optim.AdamW(params, fused=fused or None, **kwargs)

    @property
    def skips_on_device(self) -> bool:
        """A non-finite window is skipped by the fused optimizer itself (`found_inf`, as GradScaler does), so
        the step needs no host read before it; fp16 leaves `found_inf` to accelerate's GradScaler."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return bool(getattr(inner, "defaults", {}).get("fused")) and self.cfg.mixed_precision != "fp16"

    @contextlib.contextmanager
    def reference_network(self):
        """The reference: the same network with LoRA adapters disabled, or the frozen copy."""
        if self.reference is not None:
            yield self.reference
            return
        net = self.unwrapped
        if self.cfg.use_lora:
            layers = self._lora_layers()
            if layers is None:
                net.disable_adapters()
                try:
                    yield net
                finally:
                    net.enable_adapters()
                return
            # what peft's disable_adapters() does to the forward, without walking every module and
            # toggling requires_grad twice per step (the reference runs without gradients anyway)
            before = [layer._disable_adapters for layer in layers]
            for layer in layers:
                layer._disable_adapters = True
            try:
                yield net
            finally:
                for layer, flag in zip(layers, before):
                    layer._disable_adapters = flag
        else:
            yield net

    def _lora_layers(self) -> list[torch.nn.Module] | None:
        """The network's peft LoRA layers (found once), or None if peft's private flag is not there."""
        if not hasattr(self, "_lora_layer_cache"):
            from peft.tuners.tuners_utils import BaseTunerLayer

            layers = [m for m in self.unwrapped.modules() if isinstance(m, BaseTunerLayer)]
            ok = layers and all(isinstance(getattr(m, "_disable_adapters", None), bool) for m in layers)
            self._lora_layer_cache = layers if ok else None
        return self._lora_layer_cache

    # ------------------------------------------------------------------ run folder
    def _main_decides(self, decide):
        """Run `decide()` on the main process only and hand its result (or its UserError) to every process."""
        acc = self.accelerator
        result: list[Any] = [None, None]
        if acc.is_main_process:
            try:
                result = [decide(), None]
            except UserError as exc:
                result = [None, exc]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(result)
        if result[1] is not None:
            raise result[1]
        return result[0]

    def _preflight(self) -> tuple[Path | None, dict[str, list[Any]]]:
        """The folder can take a run and no other run holds it; the checkpoint to resume (verified, the newest
        good one) and the config keys that differ from it (refused when they change what it means)."""
        cfg = self.cfg
        resuming = bool(cfg.resume_from_checkpoint)
        run_folder.check_output_dir(self.output_dir)
        self._lock.probe()
        path = ckpt.resolve_resume(self.output_dir, cfg.resume_from_checkpoint, report=self.accelerator.print)
        if path is None:
            if resuming:
                self.accelerator.print(f"resume: no checkpoint in {self.output_dir} yet; starting from scratch")
            return None, {}
        has_lora = any(path.glob("*lora*.safetensors"))
        if has_lora != cfg.use_lora:
            kind = "a LoRA" if has_lora else "a full fine-tune"
            raise ConfigError(f"{path} holds {kind} but the config has use_lora: {str(cfg.use_lora).lower()}; "
                              f"resume it with use_lora: {str(has_lora).lower()}, or start a new output_dir")
        saved = run_folder.read_config(path / "config.yaml")
        changes = run_folder.resume_changes(path, saved, to_dict(cfg)) if saved is not None else {}
        return path, changes

    def _claim(self) -> None:
        """Take the run folder's lock (check again under it) and clear it for --overwrite."""
        cfg = self.cfg
        self._lock.acquire()
        resuming = bool(cfg.resume_from_checkpoint)
        run_folder.check_run_folder(self.output_dir, resuming, cfg.overwrite_output_dir, cfg.logging_dir)
        if cfg.overwrite_output_dir and not resuming:
            removed = run_folder.clear_run_folder(self.output_dir, cfg.logging_dir)
            if removed:
                self.accelerator.print(f"overwrite_output_dir: removed the previous run in {self.output_dir} "
                                       f"({', '.join(removed)})")
        run_folder.recover_final(self.output_dir)

    # ------------------------------------------------------------------ run
    def run(self) -> Path:
        """Train (holding the run folder's lock) and return the output folder."""
        try:
            self._main_decides(self._claim)
            return self._run()
        finally:
            self._drain_writer()
            self._lock.release()

    def _run(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        resume = self.resume_path
        if resume is not None:
            try:
                acc.load_state(str(resume))
            except Exception as exc:
                raise UserError(f"{resume}: the checkpoint does not load ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); resume from an older "
                                "checkpoint-N, or start a new run") from exc
            if self.state.generator_state is not None:
                self.context.generator.set_state(self.state.generator_state)
            if self.state.host_generator_state is not None:
                self.context.host_generator.setstate(self.state.host_generator_state)
            self.method.load_state_dict(self.state.method_state)
            acc.print(f"resumed from {resume} at step {self.state.step}")
        self._last_commit_step = self.state.step
        metrics_log = run_folder.MetricsLog(self.output_dir / "metrics.jsonl")
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dropped = metrics_log.trim(self.state.step)  # rows of steps this resume undoes, torn lines
            if dropped:
                acc.print(f"metrics.jsonl: dropped {dropped} rows after step {self.state.step} (undone by the resume)")
            if cfg.resume_from_checkpoint:
                if self.resume_changes:
                    acc.print("resume: changed " + "; ".join(f"{k}: {a!r} -> {b!r}"
                                                             for k, (a, b) in self.resume_changes.items()))
                history = run_folder.MetricsLog(self.output_dir / run_folder.HISTORY_FILE)
                self._append_or_stop(history, run_folder.resume_row(resume, self.state.step, self.resume_changes))
        data = self.build_data()
        if acc.is_main_process:  # only once the data is there: a run that cannot start leaves no run behind
            save_config(cfg, self.output_dir / "config.yaml")
        if cfg.report_to != "none":
            acc.init_trackers(cfg.tracker_project_name, config=_flat_scalars(to_dict(cfg)))
        warning = model_card.push_warning(cfg)
        if warning and acc.is_main_process:
            logger.warning(warning)
            acc.print(f"WARNING: {warning}")
        if acc.is_main_process:
            rows = f"{data.num_rows} rows" if data.num_rows is not None else "streaming"
            ties = f", {data.dropped_ties} ties dropped" if data.dropped_ties else ""
            acc.print(f"data: {data.source} ({rows}{ties}); method {cfg.method}; "
                      f"{'LoRA r=' + str(cfg.rank) if cfg.use_lora else 'full fine-tune'}; "
                      f"effective batch {cfg.train_batch_size * cfg.gradient_accumulation_steps * acc.num_processes}")
        self.validation = validation.start(self)  # a fresh run: the base model's images (step 0)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_train_steps, initial=self.state.step, desc="train",
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        good_rows_seen = 0
        started = time.perf_counter()
        loader = data.loader
        if cfg.prefetch_to_device and acc.device.type == "cuda":
            loader = DevicePrefetcher(loader, acc.device)
        for batch in loader:
            if self.state.step >= cfg.max_train_steps:
                break
            fewest_rows = self._note_bad_rows(batch)
            self.state.micro_step += 1
            good_rows_seen += batch["size"]
            if fewest_rows == 0:  # all processes skip together (one alone would hang the others' collectives)
                if self.state.micro_step >= 50 and good_rows_seen == 0:
                    raise DataError(f"{data.source}: the first {self.state.micro_step} batches had no usable rows")
                continue
            window = self.train_step(batch)
            if window is None:
                continue
            # ---- an optimizer step (or a skipped one) has completed
            finite, logs = window
            if not finite:
                self.state.nonfinite_in_row += 1
                self.state.nonfinite_total += 1
                acc.print(f"step {self.state.step + 1}: non-finite loss, step skipped "
                          f"({self.state.nonfinite_in_row} in a row)")
                if self.state.nonfinite_in_row >= cfg.max_nonfinite_steps:
                    raise TrainingError(
                        f"{self.state.nonfinite_in_row} steps in a row had a NaN/inf loss; lower learning_rate or "
                        "beta_dpo, use bf16 instead of fp16, or check the data"
                    )
                continue
            self.state.nonfinite_in_row = 0
            self.state.step += 1
            if self.ema is not None:
                self.ema.step([p for p in self.unwrapped.parameters() if p.requires_grad])
            self.method.on_optimizer_step(self.context, self.state.step)
            logs["lr"] = self.lr_scheduler.get_last_lr()[0]
            logs["step"] = self.state.step
            logs["bad_rows"] = self.state.bad_rows
            if "loss" in logs:
                self.state.recent_losses.append(float(logs["loss"]))
                del self.state.recent_losses[:-max(1000, 2 * cfg.checkpointing_steps)]
            if cfg.report_to != "none":
                acc.log(logs, step=self.state.step)
            if acc.is_main_process:
                self._append_or_stop(metrics_log, logs)
            bar.update(1)
            bar.set_postfix({k: f"{logs[k]:.4g}" for k in ("loss", "implicit_acc") if k in logs})
            if self.state.step % cfg.checkpointing_steps == 0 or self.state.step == cfg.max_train_steps:
                self.save_checkpoint()
            if self.validation is not None and self.validation.due(self.state.step):
                self.validation.run(self.state.step)
            if os.environ.get("DIFFUSION_PO_DIE_AFTER_STEP") == str(self.state.step):
                os._exit(137)  # for tests: dies like a SIGKILL, without any clean-up
        bar.close()
        if self.state.step < cfg.max_train_steps:
            raise DataError(f"{data.source}: the data ran out after {self.state.step} steps")
        elapsed = time.perf_counter() - started
        self.wait_for_checkpoint()
        self.save_final()
        model_card.write_for_run(self, self.validation)
        if acc.is_main_process:
            acc.print(f"done: {self.state.step} steps in {elapsed:.1f}s; skipped {self.state.bad_rows} bad rows, "
                      f"{self.state.nonfinite_total} non-finite steps; outputs in {self.output_dir}")
        acc.end_training()
        if cfg.push_to_hub and acc.is_main_process:  # last: an upload that fails loses nothing
            acc.print(f"pushed to the hub: {model_card.push_to_hub(self.output_dir, cfg.hub_model_id)}")
        return self.output_dir

    def build_data(self, count_only: bool = False):
        """This process's loader from the run's micro-step on: image files, or the data cache.
        `count_only`: for its row and batch counts (no loader workers, position 0)."""
        cfg, acc = self.cfg, self.accelerator
        workers = 0 if count_only else default_num_workers(cfg, acc.device.type, acc.num_processes)
        micro_step = 0 if count_only else self.state.micro_step
        if cfg.data.format == "cache":
            from diffusion_po.data.cache import build_cache_data

            return build_cache_data(cfg, self.family, self.method_formats, cfg.train_batch_size, acc.process_index,
                                    acc.num_processes, micro_step, workers, self.cache_fingerprint)
        return build_train_data(cfg.data, cfg.resolution, cfg.train_batch_size, acc.process_index,
                                acc.num_processes, cfg.seed, micro_step, workers)

    def train_step(self, batch: dict[str, Any]) -> tuple[bool, dict[str, float]] | None:
        """One micro-step: loss and backward; at the end of an accumulation window also clipping and the
        optimizer step (or, after a non-finite loss anywhere in the window on any process, no step and
        cleared gradients). Returns None inside a window; at its end (finite, the window's metrics averaged
        over micro-steps and processes), read from the device in one transfer: the only host
        synchronisation of the step. With the fused optimizer (CUDA) that read comes after the step is
        queued (the optimizer skips a non-finite window on the device); otherwise it comes before it."""
        acc, cfg = self.accelerator, self.cfg
        with acc.accumulate(self.network):
            try:
                loss, metrics = self._loss_and_backward(batch)
                finite = torch.isfinite(loss.detach()).reshape(1)
                self._window_finite = finite if self._window_finite is None else self._window_finite & finite
                self._window_metrics.append(metrics)
                if not acc.sync_gradients:
                    return None
                keys, values = _window_mean(self._window_metrics, acc.device)
                ok = self._window_finite.float().to(acc.device)
                self._window_finite, self._window_metrics = None, []
                if acc.num_processes > 1:
                    ok = acc.gather(ok).min().reshape(1)
                    values = acc.reduce(values, reduction="mean")
                if self.skips_on_device:
                    if cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.network.parameters(), cfg.max_grad_norm)
                    getattr(self.optimizer, "optimizer", self.optimizer).found_inf = (1.0 - ok).reshape(())
                    self.optimizer.step()
                    host = torch.cat([ok, values]).tolist()
                    if host[0] > 0:
                        self.lr_scheduler.step()
                else:
                    host = torch.cat([ok, values]).tolist()
                    if host[0] > 0:
                        if cfg.max_grad_norm > 0:
                            acc.clip_grad_norm_(self.network.parameters(), cfg.max_grad_norm)
                        self.optimizer.step()
                        self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            except torch.OutOfMemoryError as exc:
                raise TrainingError(OOM_ADVICE) from exc
        finite = host[0] > 0
        return finite, (dict(zip(keys, host[1:])) if finite else {})

    def _loss_and_backward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The method's loss and its backward. Under `compile: auto`, a compilation error in the first step
        (dynamo or inductor) is reported and the step is redone eagerly with the same random draws."""
        if not self._compile_fallback_pending:
            loss, metrics = self.method.compute_loss(self.context, batch)
            self.accelerator.backward(loss)
            return loss, metrics
        from diffusion_po.families.compiling import is_compile_error, uncompile

        state = self.context.generator.get_state()
        try:
            loss, metrics = self.method.compute_loss(self.context, batch)
            self.accelerator.backward(loss)
        except Exception as exc:
            if not is_compile_error(exc):
                raise
            inner = getattr(exc, "inner_exception", None) or exc.__cause__
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][:2]
            if inner is not None:
                lines.append(f"{type(inner).__name__}: {inner}")
            message = " ".join(lines)[:300] or type(exc).__name__
            uncompile(self.unwrapped)
            if self.reference is not None:
                uncompile(self.reference)
            self.compiled = f"failed ({type(exc).__name__}: {message}); running eager"
            self.compile_error = f"{type(exc).__name__}: {message}"
            logger.warning("torch.compile failed, training eagerly instead (set compile: none to skip it, or "
                           "compile: blocks to make it an error): %s", self.compile_error)
            self.accelerator.print(f"WARNING: torch.compile failed ({self.compile_error}); running eager")
            self.optimizer.zero_grad(set_to_none=True)
            self.context.generator.set_state(state)
            loss, metrics = self.method.compute_loss(self.context, batch)
            self.accelerator.backward(loss)
        finally:
            self._compile_fallback_pending = False
        return loss, metrics

    def _note_bad_rows(self, batch: dict[str, Any]) -> int:
        """Count the distinct bad rows of all processes (a row drawn again in a later epoch counts once) and
        warn once per row, naming its file and row. Returns the fewest usable rows any process got."""
        acc = self.accelerator
        bad = list(batch.get("bad_rows") or [])
        fewest = batch["size"]
        if acc.num_processes > 1:  # two numbers gathered each micro-step; the rows themselves only when any
            from accelerate.utils import gather_object

            counts = acc.gather(torch.tensor([[len(bad), batch["size"]]], device=acc.device))
            fewest = int(counts[:, 1].min().item())
            bad = gather_object(bad) if counts[:, 0].sum().item() else []
        if not bad:
            return fewest
        if self.cfg.data.strict:
            raise DataError(f"{bad[0][1]} (data.strict is on; set it off to skip and count bad rows)")
        seen = set(self.state.bad_row_ids)
        new = [(row_id, text) for row_id, text in dict(bad).items() if row_id not in seen]
        self.state.bad_row_ids.extend(row_id for row_id, _ in new)
        self.state.bad_rows = len(self.state.bad_row_ids)
        if acc.is_main_process:
            for _, text in new[:3]:
                logger.warning("skipped %s", text)
        return fewest

    # ------------------------------------------------------------------ saving
    def save_checkpoint(self) -> Path | None:
        """Write `checkpoint-STEP` (on the main process returns its path). With `async_checkpoints` the state is
        copied to host memory and written, checksummed and committed in the background: the path holds the
        checkpoint once `wait_for_checkpoint` returned (the next checkpoint and the end of training wait)."""
        acc = self.accelerator
        step = self.state.step
        self.wait_for_checkpoint()  # one write at a time; its host buffers are reused below
        self.check_before_commit()
        tmp = ckpt.temporary_dir(self.output_dir, step)
        self.state.generator_state = self.context.generator.get_state()
        self.state.host_generator_state = self.context.host_generator.getstate()
        self.state.method_state = self.method.state_dict()
        if self.async_checkpoints:
            return self._start_checkpoint(tmp, step)
        with self._disk_full_stops(tmp):
            acc.save_state(str(tmp))  # (accelerate makes channels-last weights contiguous for safetensors)
            if acc.is_main_process:
                self._write_weights(tmp, self._loadable_state())
                save_config(self.cfg, tmp / "config.yaml")  # what the checkpoint means, for a resume to compare
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            with self._disk_full_stops(tmp):
                ckpt.write_manifest(tmp)
            final = ckpt.commit(self.output_dir, step)
            ckpt.rotate(self.output_dir, self.cfg.checkpoints_total_limit)
        self._last_commit_step = step
        acc.wait_for_everyone()
        return final

    def _start_checkpoint(self, tmp: Path, step: int) -> Path | None:
        """The asynchronous checkpoint: every process writes its small files now (RNG states, scaler); the main
        process copies the rest to host memory and hands the write, manifest, commit and rotation to a thread."""
        acc = self.accelerator
        paused = time.perf_counter()
        with self._disk_full_stops(tmp):
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # what a killed run left of this step
            acc.wait_for_everyone()
            async_checkpoint.write_small_state(acc, tmp)
            if acc.is_main_process:
                save_config(self.cfg, tmp / "config.yaml")
        acc.wait_for_everyone()  # every process's files are in: the main process commits alone
        self._last_commit_step = step
        if not acc.is_main_process:
            return None
        snap = async_checkpoint.AcceleratorSnapshot.take(acc, self._host_copy, extra=self._loadable_state())
        paused = time.perf_counter() - paused

        def write() -> None:
            begun = time.perf_counter()
            snap.write(tmp)
            self._write_weights(tmp, snap.extra)
            ckpt.write_manifest(tmp)
            ckpt.commit(self.output_dir, step)
            ckpt.rotate(self.output_dir, self.cfg.checkpoints_total_limit)
            logger.info("checkpoint-%d: training paused %.3fs (the small files, the host copy of %.2f GiB); "
                        "written in the background in %.2fs", step, paused, self._host_copy.nbytes / 2**30,
                        time.perf_counter() - begun)

        self._writer.start(tmp, write)
        return self.output_dir / f"checkpoint-{step}"

    def wait_for_checkpoint(self) -> None:
        """Let the checkpoint being written in the background finish; its failure (a full disk: the same
        one-line message as a synchronous write) stops the run here, on every process."""
        if self.async_checkpoints:
            self._main_decides(self._finish_write)

    def _finish_write(self) -> None:
        if self._writer.busy:
            with self._disk_full_stops(self._writer.folder):
                self._writer.wait()

    def _drain_writer(self) -> None:
        """At the end of a run, also one that failed: the background write finishes (reported, not raised,
        so that the run's own error stays the one shown) before the run folder's lock goes."""
        try:
            self._finish_write()
        except Exception as exc:
            logger.error("the checkpoint written in the background failed: %s", exc)

    def check_before_commit(self) -> None:
        """Refuse to checkpoint an exploded run: non-finite trained weights, or a loss spike (the median loss
        since the last checkpoint over `max_loss_spike_ratio` times the median before it)."""
        step, cfg = self.state.step, self.cfg
        params = [p.detach() for p in self.unwrapped.parameters() if p.requires_grad]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise TrainingError(f"step {step}: the trained weights hold NaN/inf, so checkpoint-{step} was not "
                                "written (the last one is kept); lower learning_rate, keep max_grad_norm on, or "
                                "use bf16 instead of fp16, and resume")
        if cfg.max_loss_spike_ratio is None:
            return
        ratio = loss_spike_ratio(self.state.recent_losses, step - self._last_commit_step)
        if ratio is not None and ratio > cfg.max_loss_spike_ratio:
            raise TrainingError(f"step {step}: the loss since the last checkpoint is {ratio:.3g}x its earlier median "
                                f"(max_loss_spike_ratio {cfg.max_loss_spike_ratio:g}), so checkpoint-{step} was not "
                                "written (the last one is kept); lower learning_rate and resume, or raise "
                                "max_loss_spike_ratio (null turns the check off)")

    @contextlib.contextmanager
    def _disk_full_stops(self, partial: Path, checkpoint: bool = True):
        """A full disk while writing `partial`: remove it and stop with one line (where, free and, for a
        checkpoint, how much one needs)."""
        try:
            yield
        except Exception as exc:
            if not ckpt.is_disk_full(exc):
                raise
            shutil.rmtree(partial, ignore_errors=True)
            needed = self._checkpoint_bytes() if checkpoint else None
            raise TrainingError(ckpt.disk_full_message(partial, needed)) from exc

    def _append_or_stop(self, log: run_folder.MetricsLog, row: dict[str, Any]) -> None:
        """Append a row to a jsonl log; a full disk stops the run with one line."""
        try:
            log.append(row)
        except OSError as exc:
            if not ckpt.is_disk_full(exc):
                raise
            raise TrainingError(ckpt.disk_full_message(log.path)) from exc

    def _checkpoint_bytes(self) -> int:
        """About how much one checkpoint takes: the last complete one, or an estimate from the parameters
        (the whole network, the trained weights twice more for AdamW, once more for the loadable copy)."""
        done = ckpt.list_checkpoints(self.output_dir)
        if done:
            return ckpt.folder_bytes(done[-1])
        net = self.unwrapped
        every = sum(p.numel() * p.element_size() for p in net.parameters())
        trained = sum(p.numel() * 4 for p in net.parameters() if p.requires_grad)
        return every + trained * (3 + (1 if self.ema is not None else 0))

    def _loadable_state(self) -> dict[str, torch.Tensor]:
        """What `_write_weights` writes: the LoRA weights (diffusers names), or the network's state dict."""
        net = self.unwrapped
        return self.family.lora_state_dict(net) if self.cfg.use_lora else net.state_dict()

    def _write_weights(self, folder: Path, state: dict[str, torch.Tensor]) -> None:
        """Loadable weights next to the accelerate state, from `state` (`_loadable_state`, live or a host copy):
        the LoRA file, or the network in diffusers format (config.json and safetensors as save_pretrained)."""
        if self.cfg.use_lora:
            self.family.save_lora(folder, state=state)
            return
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
        from huggingface_hub import save_torch_state_dict

        target = folder / self.family.network_name
        self.unwrapped.save_config(target)
        save_torch_state_dict(state, target, filename_pattern=SAFETENSORS_WEIGHTS_NAME.replace(".safetensors",
                              "{suffix}.safetensors"), max_shard_size="10GB")

    def save_final(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        net = self.unwrapped
        if self.ema is not None:
            self.ema.copy_to([p for p in net.parameters() if p.requires_grad])
        # written into a staging folder, then renamed into place: a kill leaves the old outputs or the new
        staging = self.output_dir / run_folder.FINAL_STAGING
        shutil.rmtree(staging, ignore_errors=True)
        with self._disk_full_stops(staging, checkpoint=False):
            if self.cfg.use_lora:
                self.family.save_lora(staging, net)
            else:
                net.save_pretrained(staging / self.family.network_name)
                if self.cfg.save_full_pipeline:
                    self.family.pipe.save_pretrained(staging)
        run_folder.publish(staging, self.output_dir)


def _window_mean(rows: list[dict[str, Any]], device: torch.device) -> tuple[list[str], torch.Tensor]:
    """The keys every micro-step's metrics share, and their means over the window as one fp64 device tensor
    (no host read: python numbers become device tensors)."""
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    if not keys:
        return [], torch.zeros(0, dtype=torch.float64, device=device)

    def column(key: str) -> torch.Tensor:
        values = [r[key] if torch.is_tensor(r[key]) else torch.tensor(float(r[key])) for r in rows]
        return torch.stack([v.detach().reshape(()).to(device, torch.float64) for v in values])

    return keys, torch.stack([column(k).mean() for k in keys])


def _metric_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Metrics as floats with one device-to-host copy for all tensor values (not one sync per metric)."""
    out: dict[str, float] = {}
    tensors = {k: v for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if tensors:
        dev = next(iter(tensors.values())).device
        values = torch.stack([v.detach().float().reshape(()).to(dev) for v in tensors.values()]).tolist()
        out.update(zip(tensors, values))
    for k, v in metrics.items():
        if k not in out:
            out[k] = float(v)
    return {k: out[k] for k in metrics}


def loss_spike_ratio(losses: list[float], window: int, min_history: int = 3) -> float | None:
    """Median of the last `window` losses over the median of the ones before (None with fewer than
    `min_history` earlier losses or a non-positive earlier median)."""
    window = min(window, len(losses))
    history, recent = losses[: len(losses) - window], losses[len(losses) - window:]
    if window <= 0 or len(history) < min_history:
        return None
    base = statistics.median(history)
    return statistics.median(recent) / base if base > 0 else None


def set_tf32(allow: bool, device: torch.device) -> None:
    """`allow_tf32` on a CUDA device: TF32 for matmuls and cuDNN convolutions on (true) or off (false);
    elsewhere nothing to set."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def check_snr_gamma(family: Family) -> None:
    """snr_gamma is min-SNR weighting of the DDPM families; flow-matching families refuse it."""
    if family.prediction_type == "flow":
        raise ConfigError(f"snr_gamma (min-SNR weighting) is for DDPM families (epsilon / v_prediction / sample), not "
                          f"the flow-matching family '{family.name}', whose timestep density already weights "
                          "the loss; remove snr_gamma")


def check_trackers(report_to: str) -> None:
    """`report_to` names trackers that are installed (accelerate would drop a missing one silently)."""
    wanted = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}.get(report_to, [])
    missing = [name for name in wanted if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"report_to: {report_to} needs {' and '.join(missing)}, which is not installed: "
                          f"pip install {' '.join(missing)}, or set report_to: none")


def check_launch(num_processes: int) -> None:
    """`accelerate launch --num_processes N --cpu` without mpirun starts a single process (its simple
    launcher sets MASTER_ADDR for N > 1 but no WORLD_SIZE): stop instead of training on one process."""
    env = os.environ
    launched_several = "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env
    told = any(k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if launched_several and not told and num_processes == 1:
        raise UserError("accelerate launch asked for several CPU processes but started one (accelerate needs "
                        "mpirun for multi-CPU runs); on CPUs use `torchrun --nproc_per_node N -m diffusion_po.cli "
                        "train CONFIG`, on GPUs `accelerate launch --multi_gpu` (docs/training.md)")


def _want_channels_last(cfg: TrainConfig, family: Family, device: torch.device) -> bool:
    if cfg.channels_last is not None:
        return bool(cfg.channels_last) and family.convolutional
    return device.type == "cuda" and family.convolutional


def speed_up(network: torch.nn.Module, cfg: TrainConfig, family: Family, device: torch.device,
             channels_last: bool) -> str:
    """Apply the run's speed switches to `network` in place; returns what was compiled ('none', 'blocks: N', 'full')."""
    if channels_last:
        network.to(memory_format=torch.channels_last)
    if cfg.attention_backend:
        try:
            network.set_attention_backend(cfg.attention_backend)
        except Exception as exc:
            raise UserError(f"attention_backend '{cfg.attention_backend}' is not usable here ({exc}); "
                            "leave attention_backend unset to use PyTorch's SDPA") from exc
    mode = cfg.compile
    if mode == "auto":  # a compilation error under `auto` falls back to eager, loudly (Trainer.train_step)
        mode = "blocks" if device.type == "cuda" else "none"
    if mode == "none":
        return "none"
    raise_compile_limits()  # every distinct block shape (and grad mode, dtype) is one entry
    if cfg.compile_backend == "inductor":
        from diffusion_po.families.compiling import use_compile_cache

        use_compile_cache(network, {"mode": mode, "blocks": list(cfg.compile_blocks), "compile_mode": cfg.compile_mode,
                                    "dynamic": cfg.compile_dynamic, "mixed_precision": cfg.mixed_precision,
                                    "lora": cfg.use_lora, "channels_last": channels_last}, cfg.compile_cache_dir)
    kwargs: dict[str, Any] = {"backend": cfg.compile_backend, "dynamic": cfg.compile_dynamic}
    if cfg.compile_mode:
        kwargs["mode"] = cfg.compile_mode
    if mode == "full":
        network.compile(**kwargs)
        return "full"
    names = tuple(cfg.compile_blocks) or family.repeated_blocks
    n = compile_regions(network, names, **kwargs)
    if n == 0:
        raise UserError(f"compile: blocks found no {', '.join(names)} in the {type(network).__name__}; "
                        "set compile_blocks to class names of its repeated blocks, or compile: full")
    return f"blocks: {n}"


class DevicePrefetcher:
    """Iterate a loader with each next batch already copied to the GPU on a side stream.
    Keys in `HOST_KEYS` stay on the host (the families read image sizes there)."""

    HOST_KEYS = frozenset({"original_sizes", "crop_top_lefts", "row_ids", "bad_rows", "target_size"})

    def __init__(self, loader: Any, device: torch.device):
        self.loader, self.device = loader, device

    def _to(self, value: Any) -> Any:
        if torch.is_tensor(value):
            return value.to(self.device, non_blocking=True)
        if isinstance(value, dict):
            return {k: (v if k in self.HOST_KEYS else self._to(v)) for k, v in value.items()}
        return value

    def _record(self, value: Any, stream: Any) -> None:
        if torch.is_tensor(value) and value.device.type == "cuda":
            value.record_stream(stream)
        elif isinstance(value, dict):
            for v in value.values():
                self._record(v, stream)

    def __iter__(self):
        stream = torch.cuda.Stream(self.device)
        pending = None
        for batch in self.loader:
            with torch.cuda.stream(stream):
                ready = self._to(batch)
            if pending is not None:
                yield self._hand_over(pending, stream)
            pending = ready
        if pending is not None:
            yield self._hand_over(pending, stream)

    def _hand_over(self, batch: Any, stream: Any) -> Any:
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(stream)
        self._record(batch, current)
        return batch


def _flat_scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, list):
            out[f"{prefix}{k}"] = ",".join(map(str, v))
    return out


def train(cfg: TrainConfig, config_source: str | None = None) -> Path:
    """Run training to `cfg.max_train_steps` (resuming when asked) and return the output folder."""
    # before anything loads: a fresh run does not go into another run's folder (checked again under the lock)
    run_folder.check_run_folder(Path(cfg.output_dir), bool(cfg.resume_from_checkpoint), cfg.overwrite_output_dir,
                                cfg.logging_dir)
    return Trainer(cfg, config_source).run()


__all__ = ["Context", "DevicePrefetcher", "Trainer", "TrainState", "TrainingError", "speed_up", "train"]

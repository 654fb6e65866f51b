"""The shared trainer: one loop on accelerate for every method.

The trainer loads the family, wraps the network (LoRA through peft, or full fine-tuning with a frozen
reference copy), feeds batches to the method, and owns precision, accumulation, clipping, EMA,
checkpoints, resume, logging and the final diffusers-format outputs. It knows nothing of any method.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffusion_po.config import TrainConfig, save_config, to_dict
from diffusion_po.data import build_train_data
from diffusion_po.errors import DataError, UserError
from diffusion_po.families import Conditioning, Family, compile_regions, cond_to, load_family
from diffusion_po.families.base import raise_compile_limits
from diffusion_po.objectives import Method, get_method_class
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
    generator_state: torch.Tensor | None = None
    method_state: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


class Context:
    """The `TrainContext` the methods see (see diffusion_po/objectives/base.py)."""

    def __init__(self, trainer: Trainer):
        self._t = trainer
        self.family: Family = trainer.family
        self.config: TrainConfig = trainer.cfg
        self.device: torch.device = trainer.accelerator.device
        self.generator = torch.Generator().manual_seed(trainer.cfg.seed)

    # --- random draws: global, sliced per process
    def _slice(self, full: torch.Tensor, n: int) -> torch.Tensor:
        acc = self._t.accelerator
        lo = acc.process_index * self.config.train_batch_size
        return full[lo : lo + n]

    def _global_n(self, n: int) -> int:
        per = max(n, self.config.train_batch_size)
        return per * self._t.accelerator.num_processes

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        full = torch.randn((self._global_n(shape[0]), *shape[1:]), generator=self.generator)
        return self._slice(full, shape[0]).to(self.device)

    def rand(self, n: int) -> torch.Tensor:
        return self._slice(torch.rand(self._global_n(n), generator=self.generator), n).to(self.device)

    def timesteps(self, n: int) -> torch.Tensor:
        full = self.family.sample_timesteps(self._global_n(n), self.generator)
        return self._slice(full, n).to(self.device)

    # --- inputs
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
            drop = self.rand(len(prompts)) < p
            prompts = ["" if d else text for d, text in zip(drop.tolist(), prompts)]
        if batch is not None and "prompt_cond" in batch and p == 0:  # precomputed embeddings (data cache)
            return cond_to(batch["prompt_cond"], self.device)
        sizes = batch.get("original_sizes") if batch else None
        crops = batch.get("crop_top_lefts") if batch else None
        table = batch.get("prompt_table") if batch else None
        if table is not None:  # the data cache: embeddings of every caption of the batch, and of ""
            rows = [table["index"].get(text) for text in prompts]
            if all(r is not None for r in rows):
                index = torch.tensor(rows, dtype=torch.long)
                cond = {k: v[index.to(v.device)].to(self.device, non_blocking=True).float()
                        for k, v in table["cond"].items()}
                return self.family.row_conditioning(cond, sizes, crops, self.config.resolution)
        return cond_to(self.family.encode_prompts(prompts, sizes, crops, self.config.resolution), self.device)

    # --- predictions
    def policy_predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        with self._t.accelerator.autocast():
            return self.family.predict(self._t.network, self._t.network_input(x_t), t, cond)

    def reference_predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
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
        if acc.num_processes == 1:
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

    @property
    def accelerator(self):
        return self._t.accelerator


class Trainer:
    """The training loop. `family`: an already loaded `Family` (benchmarks, notebooks) instead of loading
    `cfg.pretrained_model_name_or_path`."""

    def __init__(self, cfg: TrainConfig, config_source: str | None = None, family: Family | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        log_with = None if cfg.report_to == "none" else cfg.report_to
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            cpu=not torch.cuda.is_available(),  # lets torchrun/accelerate start gloo processes on CPU-only machines
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / cfg.logging_dir)),
        )
        method_cls = get_method_class(cfg.method)
        self.method_formats: tuple[str, ...] = tuple(method_cls.data_formats)
        if cfg.data.format not in method_cls.data_formats and cfg.data.format != "cache":
            raise UserError(
                f"method '{cfg.method}' takes data.format {' or '.join(method_cls.data_formats)}, "
                f"not '{cfg.data.format}'"
            )
        self.method: Method = method_cls(cfg)
        self.weight_dtype = weight_dtype_of(cfg.mixed_precision)
        if torch.cuda.is_available() and cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        if family is None:
            family = load_family(cfg.pretrained_model_name_or_path, cfg.pretrained_vae_model_name_or_path,
                                 cfg.revision, cfg.variant)
        self.family = family
        self.cache_fingerprint: str | None = None
        if cfg.data.format == "cache":  # the encoders' identity, taken before they are cast to bf16/fp16
            from diffusion_po.data.cache import fingerprint

            self.cache_fingerprint = fingerprint(family)
        encoders = cfg.encoders_on_device if cfg.encoders_on_device is not None else cfg.data.format != "cache"
        self.family.to(self.accelerator.device, self.weight_dtype, encoders=encoders)
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
                target_modules=cfg.lora_target_modules,
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
        self._window_bad = False
        self.accelerator.register_for_checkpointing(self.state)
        self.context = Context(self)
        self.config_source = config_source
        setup = getattr(self.method, "setup", None)
        if callable(setup):
            setup(self.context)

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
        fused = torch.cuda.is_available() and self.accelerator.device.type == "cuda"
        return torch.optim.AdamW(params, fused=fused or None, **kwargs)

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

    # ------------------------------------------------------------------ run
    def run(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        resume = ckpt.resolve_resume(self.output_dir, cfg.resume_from_checkpoint)
        if resume is not None:
            acc.load_state(str(resume))
            if self.state.generator_state is not None:
                self.context.generator.set_state(self.state.generator_state)
            self.method.load_state_dict(self.state.method_state)
            acc.print(f"resumed from {resume} at step {self.state.step}")
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
        if cfg.report_to != "none":
            acc.init_trackers("diffusion-po", config=_flat_scalars(to_dict(cfg)))
        data = self.build_data()
        if acc.is_main_process:
            rows = f"{data.num_rows} rows" if data.num_rows is not None else "streaming"
            ties = f", {data.dropped_ties} ties dropped" if data.dropped_ties else ""
            acc.print(f"data: {data.source} ({rows}{ties}); method {cfg.method}; "
                      f"{'LoRA r=' + str(cfg.rank) if cfg.use_lora else 'full fine-tune'}; "
                      f"effective batch {cfg.train_batch_size * cfg.gradient_accumulation_steps * acc.num_processes}")
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_train_steps, initial=self.state.step, desc="train",
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        metrics_file = self.output_dir / "metrics.jsonl"
        self._window_bad = False
        window_metrics: list[dict[str, float]] = []
        good_rows_seen = 0
        started = time.perf_counter()
        loader = data.loader
        if cfg.prefetch_to_device and acc.device.type == "cuda":
            loader = DevicePrefetcher(loader, acc.device)
        for batch in loader:
            if self.state.step >= cfg.max_train_steps:
                break
            self._note_bad_rows(batch)
            self.state.micro_step += 1
            good_rows_seen += batch["size"]
            if batch["size"] == 0:
                if self.state.micro_step >= 50 and good_rows_seen == 0:
                    raise DataError(f"{data.source}: the first {self.state.micro_step} batches had no usable rows")
                continue
            finite, metrics = self.train_step(batch)
            if finite:
                window_metrics.append(metrics)
            if not acc.sync_gradients:
                continue
            # ---- an optimizer step (or a skipped one) has completed
            if self._window_bad:
                self.state.nonfinite_in_row += 1
                self.state.nonfinite_total += 1
                self._window_bad = False
                window_metrics = []
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
            logs = self._global_average(_average(window_metrics))
            window_metrics = []
            logs["lr"] = self.lr_scheduler.get_last_lr()[0]
            logs["step"] = self.state.step
            logs["bad_rows"] = self.state.bad_rows
            if cfg.report_to != "none":
                acc.log(logs, step=self.state.step)
            if acc.is_main_process:
                with metrics_file.open("a") as fh:
                    fh.write(json.dumps(logs) + "\n")
            bar.update(1)
            bar.set_postfix({k: f"{logs[k]:.4g}" for k in ("loss", "implicit_acc") if k in logs})
            if self.state.step % cfg.checkpointing_steps == 0 or self.state.step == cfg.max_train_steps:
                self.save_checkpoint()
            if os.environ.get("DIFFUSION_PO_DIE_AFTER_STEP") == str(self.state.step):
                os._exit(137)  # for tests: dies like a SIGKILL, without any clean-up
        bar.close()
        if self.state.step < cfg.max_train_steps:
            raise DataError(f"{data.source}: the data ran out after {self.state.step} steps")
        elapsed = time.perf_counter() - started
        self.save_final()
        if acc.is_main_process:
            acc.print(f"done: {self.state.step} steps in {elapsed:.1f}s; skipped {self.state.bad_rows} bad rows, "
                      f"{self.state.nonfinite_total} non-finite steps; outputs in {self.output_dir}")
        acc.end_training()
        return self.output_dir

    def build_data(self):
        """This process's loader from the run's micro-step on: image files, or the data cache."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.data.format == "cache":
            from diffusion_po.data.cache import build_cache_data

            return build_cache_data(cfg, self.family, self.method_formats, cfg.train_batch_size, acc.process_index,
                                    acc.num_processes, self.state.micro_step, cfg.dataloader_num_workers,
                                    self.cache_fingerprint)
        return build_train_data(cfg.data, cfg.resolution, cfg.train_batch_size, acc.process_index,
                                acc.num_processes, cfg.seed, self.state.micro_step, cfg.dataloader_num_workers)

    def train_step(self, batch: dict[str, Any]) -> tuple[bool, dict[str, float]]:
        """One micro-step: loss, backward and, at the end of an accumulation window, clipping and the
        optimizer step (or, after a non-finite loss anywhere in the window, no step and cleared gradients).
        Returns (the loss was finite on every process, the method's metrics as floats)."""
        acc, cfg = self.accelerator, self.cfg
        with acc.accumulate(self.network):
            try:
                loss, metrics = self.method.compute_loss(self.context, batch)
                acc.backward(loss)  # queued before the one host sync below; a non-finite window is dropped
                finite = torch.isfinite(loss.detach()).float().reshape(1)
                finite = acc.gather(finite.to(acc.device)).min().item() > 0
                if not finite:
                    self._window_bad = True
                if acc.sync_gradients and not self._window_bad and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.network.parameters(), cfg.max_grad_norm)
                if acc.sync_gradients and self._window_bad:
                    self.optimizer.zero_grad(set_to_none=True)
                else:
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            except torch.OutOfMemoryError as exc:
                raise TrainingError(OOM_ADVICE) from exc
        return finite, _metric_floats(metrics) if finite else {}

    def _global_average(self, logs: dict[str, float]) -> dict[str, float]:
        """Average the step's metrics over processes, so the log describes the global batch."""
        if self.accelerator.num_processes == 1 or not logs:
            return logs
        keys = sorted(logs)
        values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist()))

    def _note_bad_rows(self, batch: dict[str, Any]) -> None:
        bad = batch.get("bad_rows") or []
        if not bad:
            return
        if self.cfg.data.strict:
            row_id, reason = bad[0]
            raise DataError(f"row {row_id}: {reason} (data.strict is on; set it off to skip and count bad rows)")
        self.state.bad_rows += len(bad)
        for row_id, reason in bad[:3]:
            logger.warning("skipped row %s: %s", row_id, reason)

    # ------------------------------------------------------------------ saving
    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        step = self.state.step
        tmp = ckpt.temporary_dir(self.output_dir, step)
        self.state.generator_state = self.context.generator.get_state()
        self.state.method_state = self.method.state_dict()
        acc.save_state(str(tmp))  # (accelerate makes channels-last weights contiguous for safetensors)
        if acc.is_main_process:
            self._write_weights(tmp)
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            final = ckpt.commit(self.output_dir, step)
            ckpt.rotate(self.output_dir, self.cfg.checkpoints_total_limit)
        acc.wait_for_everyone()
        return final

    def _write_weights(self, folder: Path) -> None:
        """Loadable weights next to the accelerate state: the LoRA file, or the network in diffusers format."""
        net = self.unwrapped
        if self.cfg.use_lora:
            self.family.save_lora(folder, net)
        else:
            net.save_pretrained(folder / self.family.network_name)

    def save_final(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        net = self.unwrapped
        if self.ema is not None:
            self.ema.copy_to([p for p in net.parameters() if p.requires_grad])
        if self.cfg.use_lora:
            self.family.save_lora(self.output_dir, net)
        else:
            net.save_pretrained(self.output_dir / self.family.network_name)
            if self.cfg.save_full_pipeline:
                self.family.pipe.save_pretrained(self.output_dir)


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
    if mode == "auto":
        mode = "blocks" if device.type == "cuda" else "none"
        import torch._dynamo as dynamo

        dynamo.config.suppress_errors = True  # a default must never stop a run: fall back to eager
    if mode == "none":
        return "none"
    raise_compile_limits()  # every distinct block shape (and grad mode, dtype) is one entry
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

    HOST_KEYS = frozenset({"original_sizes", "crop_top_lefts", "row_ids", "bad_rows"})

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


def _average(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {}
    keys = rows[0].keys()
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys if all(k in r for r in rows)}


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
    return Trainer(cfg, config_source).run()


__all__ = ["Context", "DevicePrefetcher", "Trainer", "TrainState", "TrainingError", "speed_up", "train"]

"""Validation images during training: the base model's images at step 0, then the trained model's every
`validation_steps` and at the end, with the same seeds, so the grids pair up image for image.

Each round writes `output_dir/validation/step-N.png` (rows: prompts, columns: seeds; step-0 is the base
model), sends the images to the trackers (tensorboard `add_images`, wandb `wandb.Image`), and with a
`validation_scorer` logs the mean score as `validation/<scorer>` (also in `validation/scores.jsonl`).
Sampling goes through `diffusion_po.sampling.generate` with any of our guidance methods.

Only the main process samples. The network goes to eval mode and back, the global random state is
restored afterwards, and the trainer's noise generator is never touched: a run with validation trains
exactly the same weights as one without.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffusion_po.config import PROMPT_FILE_SUFFIXES, TrainConfig
from diffusion_po.errors import ConfigError
from diffusion_po.training import model_card, run_folder

if TYPE_CHECKING:
    from diffusion_po.families import Family
    from diffusion_po.sampling import NegativeModel
    from diffusion_po.training.trainer import Trainer

FOLDER = "validation"
SCORES_FILE = "scores.jsonl"
TRACKER_KEY = "validation"
"""The trackers' image key (step 0 holds the base model's images)."""


def grid_name(step: int) -> str:
    return f"step-{step}.png"


def read_prompts(spec: str | list[str]) -> list[tuple[str, list[tuple[str, float]]]]:
    """`validation_prompts` as (prompt, its own negatives): a list of prompts, a prompt file (.txt one a line,
    or .jsonl as `diffusion-po sample` reads, with per-prompt negative prompts), or one prompt."""
    from diffusion_po.sampling.io import read_prompt_file

    if isinstance(spec, str) and spec.lower().endswith(PROMPT_FILE_SUFFIXES):
        return [(row["prompt"], list(row["negatives"])) for row in read_prompt_file(spec)]
    prompts = [spec] if isinstance(spec, str) else list(spec)
    return [(p, []) for p in prompts]


def negative_prompts(spec: str | list[str] | None) -> list[tuple[str, float]]:
    """`validation_guidance.negative_prompt`: "text" or "text:weight", one or a list."""
    from diffusion_po.sampling.io import parse_weighted

    if spec is None:
        return []
    return [parse_weighted(text) for text in ([spec] if isinstance(spec, str) else spec)]


def load_negative_model(cfg: TrainConfig, family: Family) -> NegativeModel:
    """The fixed negative model of `npo` validation guidance, as a separate network (the trained network
    is not touched): an NPO LoRA put on the base model (`pretrained_model_name_or_path`) and fused, or a
    negative network folder (a pipeline folder with unet/ or transformer/, or a model folder)."""
    from diffusion_po.families import load_pipeline, network_of
    from diffusion_po.sampling import NegativeModel, load_negative_network, load_npo_lora

    path = str(cfg.validation_guidance.negative_model)
    p = Path(path)
    if not (p.is_file() and p.suffix == ".safetensors") and not (p.is_dir() and any(p.glob("*lora*.safetensors"))):
        return load_negative_network(family.pipe, path)
    pipe = load_pipeline(cfg.pretrained_model_name_or_path, revision=cfg.revision, variant=cfg.variant)
    load_npo_lora(pipe, path, adapter_name="npo")
    net = network_of(pipe)
    net.fuse_lora(adapter_names=["npo"])
    net.unload_lora()
    param = next(family.network.parameters())
    net.to(param.device, param.dtype).eval().requires_grad_(False)
    return NegativeModel(network=net, description={"npo_lora": path, "on": "the base model"})


class Validation:
    """The validation rounds of one run (built on every process; only the main process samples)."""

    def __init__(self, trainer: Trainer):
        cfg = trainer.cfg
        self.trainer = trainer
        self.cfg = cfg
        self.folder = trainer.output_dir / FOLDER
        self.prompts = read_prompts(cfg.validation_prompts)
        self.negatives = negative_prompts(cfg.validation_guidance.negative_prompt)
        self.scores_log = run_folder.MetricsLog(self.folder / SCORES_FILE)
        self.last_step: int | None = None
        self.last_scores: dict[str, float] = {}
        self._negative_model: NegativeModel | None = None
        self._scorer = None
        self.is_main = trainer.accelerator.is_main_process
        if self.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.scores_log.trim(trainer.state.step)  # the rows and grids of steps a resume undoes
            for grid in self.folder.glob("step-*.png"):
                if int(grid.stem.split("-")[1]) > trainer.state.step:
                    grid.unlink()
            rows = self.scores_log.rows()
            if rows:
                self.last_scores = {k: v for k, v in rows[-1].items() if k != "step"}
        if cfg.validation_scorer:
            from diffusion_po.eval.scorers import build_scorer

            options = dict(cfg.validation_scorer_options)
            models_root = options.pop("models_root", None)
            if self.is_main:  # load it now: a scorer that cannot load stops the run before the first step
                self._scorer = build_scorer(cfg.validation_scorer, models_root=models_root,
                                            device=str(trainer.accelerator.device), **options)

    # ------------------------------------------------------------------ when
    def due(self, step: int) -> bool:
        return step % self.cfg.validation_steps == 0 or step == self.cfg.max_train_steps

    def grids(self) -> tuple[Path | None, Path | None]:
        """(the base model's grid, the latest trained grid), where they exist."""
        base = self.folder / grid_name(0)
        trained = sorted(self.folder.glob("step-*.png"), key=lambda p: int(p.stem.split("-")[1]))
        latest = trained[-1] if trained and trained[-1] != base else None
        return (base if base.is_file() else None), latest

    def card_info(self) -> dict[str, Any]:
        """What the model card shows of validation: prompts, the grids (relative links), the last scores."""
        base, latest = self.grids()
        out = self.trainer.output_dir
        random = self._scorer is not None and bool(self._scorer.info().get("random_weights"))
        return {"prompts": [prompt for prompt, _ in self.prompts], "scores": dict(self.last_scores),
                "random_scorer": random,
                "base": base.relative_to(out).as_posix() if base else None,
                "latest": latest.relative_to(out).as_posix() if latest else None,
                "latest_step": int(latest.stem.split("-")[1]) if latest else None}

    # ------------------------------------------------------------------ a round
    def run(self, step: int) -> None:
        """One round at `step` (0: the base model: LoRA adapters off; a full fine-tune before training)."""
        if step == self.last_step:
            return
        self.last_step = step
        if not self.is_main:
            return
        trainer = self.trainer
        net = trainer.unwrapped
        was_training = net.training
        devices = [trainer.accelerator.device] if trainer.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self._weights(step):
            net.eval()
            try:
                images = self._sample()
            finally:
                net.train(was_training)
        scores = self._score(images)
        self._write(step, images, scores)
        model_card.write_for_run(trainer, self, finished=False)

    @contextlib.contextmanager
    def _weights(self, step: int):
        """The weights a round samples: the base at step 0 (LoRA adapters disabled), else the trained ones
        (the EMA weights when `use_ema`, put back afterwards)."""
        trainer = self.trainer
        if step == 0 and self.cfg.use_lora:
            with trainer.reference_network():
                yield
            return
        ema = trainer.ema
        if ema is None or step == 0:
            yield
            return
        params = [p for p in trainer.unwrapped.parameters() if p.requires_grad]
        ema.store(params)
        ema.copy_to(params)
        try:
            yield
        finally:
            ema.restore(params)

    def _sample(self) -> list[Any]:
        from diffusion_po.sampling import PromptSpec, generate

        cfg, g = self.cfg, self.cfg.validation_guidance
        specs = [PromptSpec(prompt, cfg.validation_seed + j, own or list(self.negatives))
                 for prompt, own in self.prompts for j in range(cfg.num_validation_images)]
        family = self.trainer.family
        scheduler = copy.deepcopy(family.pipe.scheduler)  # the pipeline's scheduler is left as it was
        try:
            with self.trainer.accelerator.autocast():
                return generate(family, specs, guidance=g.name, scale=g.scale, rescale=g.rescale,
                                negative_model=self._negative(), steps=g.steps, height=cfg.resolution,
                                width=cfg.resolution, scheduler=g.scheduler, progress=False)
        except ValueError as exc:  # a guidance the settings do not fit (weights, branches)
            raise ConfigError(f"validation_guidance: {exc}") from exc
        finally:
            family.pipe.scheduler = scheduler

    def _negative(self) -> NegativeModel | None:
        if not self.cfg.validation_guidance.negative_model:
            return None
        if self._negative_model is None:
            self._negative_model = load_negative_model(self.cfg, self.trainer.family)
        return self._negative_model

    def _score(self, images: list[Any]) -> dict[str, float]:
        if self._scorer is None:
            return {}
        prompts = [prompt for prompt, _ in self.prompts for _ in range(self.cfg.num_validation_images)]
        values = self._scorer.score(images, prompts)
        return {f"validation/{self.cfg.validation_scorer}": float(sum(values) / len(values))}

    def _write(self, step: int, images: list[Any], scores: dict[str, float]) -> None:
        from diffusion_po.sampling.io import make_grid

        make_grid(images, self.cfg.num_validation_images).save(self.folder / grid_name(step))
        acc = self.trainer.accelerator
        if scores:
            self.scores_log.append({"step": step, **scores})
            self.last_scores = scores
            if self.cfg.report_to != "none":
                acc.log(scores, step=step)
        captions = [f"{i}: {prompt}" for prompt, _ in self.prompts for i in range(self.cfg.num_validation_images)]
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                arrays = np.stack([np.asarray(im.convert("RGB")) for im in images])
                tracker.writer.add_images(TRACKER_KEY, arrays, step, dataformats="NHWC")
                tracker.writer.flush()
            elif tracker.name == "wandb":
                import wandb

                tracker.log({TRACKER_KEY: [wandb.Image(im, caption=c) for im, c in zip(images, captions)]},
                            step=step)


def start(trainer: Trainer) -> Validation | None:
    """The run's validation (None without `validation_prompts`); a fresh run samples the base model now."""
    if trainer.cfg.validation_prompts is None:
        return None
    validation = Validation(trainer)
    if trainer.state.step == 0:
        validation.run(0)
    return validation


__all__ = ["FOLDER", "TRACKER_KEY", "Validation", "grid_name", "load_negative_model", "negative_prompts",
           "read_prompts", "start"]

"""Shared pieces of the online preference methods (`curated`, `online_dpo`): rounds, a reward, and sampling
K images per prompt from the policy as it was at the start of the round.

A run is cut into rounds of `steps_per_round` optimizer steps. At the first micro-step of a round the
method copies the trained weights into a frozen *round snapshot*; every micro-step of the round then
samples the incoming batch's prompts K times each with that snapshot (`sampler`, `sampler_steps`,
`guidance_scale`) from the trainer's shared noise stream (`ctx.randn`), decodes the samples and scores
them with the reward. So a round's data is what the round-start model generates, drawn batch by batch
(the same distribution as generating the round's data set up front, without holding it).

The method's state (saved in every checkpoint) is the micro-step counter, the round's running metric sums
and the snapshot's trained weights (the LoRA weights, or the whole network for full fine-tuning): a run
resumed in the middle of a round samples with the same snapshot and the same noise, so it continues exactly.

The reward (`reward:` under `method_options`) is any scorer of `diffusion_po.eval.scorers` by name (`toy`:
the toy world's oracle, `pickscore`, `hps_v2.1`, ...), with its constructor options, or a `Scorer`
subclass by dotted path (`mypkg.rewards:MyScorer`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Literal

import torch

from diffusion_po.errors import ConfigError
from diffusion_po.families import Conditioning, cat_cond
from diffusion_po.families.networks import (
    copy_weights,
    frozen_copy,
    load_params_state,
    params_state,
    trained_names,
)
from diffusion_po.objectives.base import Metrics, TrainContext, check_option
from diffusion_po.objectives.unpaired import autocast, trainable_network
from diffusion_po.sampling.rollout import SOLVERS, jittered_timesteps, sample_trajectories


@dataclasses.dataclass
class RewardOptions:
    """`method_options.reward`: which scorer labels the policy's samples."""

    name: str = "toy"
    """A scorer of `diffusion_po.eval.scorers` (toy, pickscore, hps_v2.1, clip, aesthetic, ...) or
    `module:Class`, a `diffusion_po.eval.scorers.base.Scorer` subclass."""
    metric: str | None = None
    """Which of the scorer's metrics is the reward (default: its primary metric)."""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The scorer's constructor options (`checkpoint`, `processor`, ...)."""
    models_root: str | None = None
    """Folder of local scorer checkpoints (registry scorers only)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


@dataclasses.dataclass
class OnlineOptions:
    """The settings both online methods share."""

    steps_per_round: int = 10
    """Optimizer steps per round: the sampling snapshot (and a refreshed reference) is taken at each round start."""
    rounds: int | None = None
    """The number of rounds, if given: then max_train_steps must be rounds x steps_per_round."""
    samples_per_prompt: int = 4
    """K: images sampled per prompt each micro-step."""
    sampler: Literal["ddim", "dpmsolver++"] = "ddim"
    sampler_steps: int = 20
    guidance_scale: float = 1.0
    """CFG scale of the sampler (diffusers convention; 1 = no guidance)."""
    reward: RewardOptions = dataclasses.field(default_factory=RewardOptions)

    def __post_init__(self) -> None:
        for key in ("steps_per_round", "samples_per_prompt", "sampler_steps"):
            check_option(getattr(self, key) > 0, key, "be positive", getattr(self, key))
        check_option(self.rounds is None or self.rounds > 0, "rounds", "be positive", self.rounds)
        check_option(self.sampler in SOLVERS, "sampler", f"be one of {', '.join(SOLVERS)}", self.sampler)
        check_option(bool(self.reward.name), "reward.name", "name a scorer", self.reward.name)


def build_reward(options: RewardOptions, device: torch.device) -> Any:
    """The reward's `Scorer`: by registry name, or `module:Class`."""
    if ":" in options.name:
        module_name, _, attr = options.name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"method_options.reward.name '{options.name}': cannot load it ({exc}); "
                              "give a scorer name or module:Class on the Python path") from exc
        return cls(device=str(device), dtype=options.dtype, **options.options)
    from diffusion_po.eval.scorers import build_scorer

    return build_scorer(options.name, models_root=options.models_root, device=str(device), dtype=options.dtype,
                        **options.options)


class OnlineRounds:
    """Round bookkeeping, the round snapshot and the reward of an online method (a mix-in of `Method`)."""

    options: Any
    config: Any

    def init_online(self) -> None:
        o = self.options
        if o.rounds is not None and o.rounds * o.steps_per_round != self.config.max_train_steps:
            raise ConfigError(f"method_options.rounds x steps_per_round = {o.rounds * o.steps_per_round} must equal "
                              f"max_train_steps ({self.config.max_train_steps}); drop `rounds` or fix one of them")
        self.snapshot: torch.nn.Module | None = None
        self.reward_model: Any = None
        self.micro_step = 0
        self.round_sums: dict[str, float] = {}
        self._trainable: set[str] = set()
        self.reward_parts: dict[str, tuple[float, float]] = {}
        if self.config.data.format == "cache":
            raise ConfigError(f"method {self.config.method} samples and decodes images during training: it needs "
                              "the VAE and text encoders, so data.format cache is not supported; use the prompts "
                              "(or images) files")

    @property
    def round_length(self) -> int:
        """Micro-steps per round."""
        return self.options.steps_per_round * max(1, int(self.config.gradient_accumulation_steps))

    @property
    def round_index(self) -> int:
        """The round of the current micro-step (0-based)."""
        return self.micro_step // self.round_length

    # --- set-up and state
    def setup(self, ctx: TrainContext) -> None:
        student = trainable_network(ctx)
        self.snapshot = frozen_copy(student)
        ctx.speed_up(self.snapshot)
        self._trainable = trained_names(student)
        if self.reward_model is None:
            self.reward_model = build_reward(self.options.reward, ctx.device)
            metric = self.options.reward.metric
            if metric is not None and metric not in self.reward_model.metrics:
                raise ConfigError(f"method_options.reward.metric '{metric}' is not a metric of scorer "
                                  f"'{self.options.reward.name}' ({', '.join(self.reward_model.metrics)})")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"micro_step": self.micro_step, "round_sums": dict(self.round_sums)}
        if self.snapshot is not None:
            state["snapshot"] = params_state(self.snapshot, self._trainable)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro_step = int(state.get("micro_step", 0))
        self.round_sums = {k: float(v) for k, v in state.get("round_sums", {}).items()}
        if state.get("snapshot") and self.snapshot is not None:
            load_params_state(self.snapshot, state["snapshot"], "round snapshot")

    def start_micro_step(self, ctx: TrainContext) -> bool:
        """Called first in `compute_loss`: at a round start, the snapshot takes the trained weights and the
        round's sums restart. Returns whether a round starts."""
        if self.snapshot is None:
            self.setup(ctx)
        starts = self.micro_step % self.round_length == 0
        if starts:
            copy_weights(self.snapshot, trainable_network(ctx))
            self.round_sums = {}
        return starts

    def finish_micro_step(self, metrics: Metrics, sums: dict[str, tuple[float, float]]) -> Metrics:
        """Adds `round`, the reward's other parts of this micro-step (`reward/NAME`), and the round's running
        means `round/NAME` of `sums` (NAME -> (total, count)) and of those parts so far, to `metrics`;
        advances the micro-step."""
        sums = {**sums, **self.reward_parts}
        metrics.update({key: total / count for key, (total, count) in self.reward_parts.items()})
        self.reward_parts = {}
        for key, (total, count) in sums.items():
            self.round_sums[key] = self.round_sums.get(key, 0.0) + total
            self.round_sums[key + "#n"] = self.round_sums.get(key + "#n", 0.0) + count
        for key in sums:
            n = self.round_sums[key + "#n"]
            metrics[f"round/{key}"] = self.round_sums[key] / n if n else 0.0
        metrics["round"] = float(self.round_index + 1)
        self.micro_step += 1
        return metrics

    # --- sampling and scoring
    def snapshot_predict(self, ctx: TrainContext, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The round snapshot's prediction, without gradients."""
        with torch.no_grad(), autocast(ctx):
            return ctx.family.predict(self.snapshot, x_t, t, cond)

    @torch.no_grad()
    def sample(self, ctx: TrainContext, prompts: list[str]) -> torch.Tensor:
        """K samples per prompt from the round snapshot: latents (n, K, C, h, w). The noise of sample k is the
        k-th (n, C, h, w) draw of `ctx.randn` (so each process keeps its slice of every draw)."""
        o, fam = self.options, ctx.family
        n, k = len(prompts), o.samples_per_prompt
        res, f = ctx.config.resolution, fam.vae_scale_factor
        shape = (n, fam.latent_channels, res // f, res // f)
        if n == 0:  # every row of the batch is real data (curated)
            return torch.zeros(0, k, *shape[1:], device=ctx.device)
        x_T = torch.stack([ctx.randn(shape) for _ in range(k)], 1).flatten(0, 1)  # prompt-major: (n K, ...)
        text = [p for p in prompts for _ in range(k)]
        cond = {key: v.to(ctx.device) for key, v in fam.encode_prompts(text, resolution=res).items()}
        uncond = None
        if o.guidance_scale != 1.0:
            empty = fam.row_conditioning(fam.unconditional(n * k, res), None, None, res)
            uncond = {key: v.to(cond[key].device, cond[key].dtype) for key, v in empty.items()}
        scale = o.guidance_scale

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if uncond is None:
                return self.snapshot_predict(ctx, x, t, cond).float()
            both = self.snapshot_predict(ctx, torch.cat([x, x]), torch.cat([t, t]), cat_cond([cond, uncond])).float()
            c, u = both.chunk(2)
            return u + scale * (c - u)

        timesteps = jittered_timesteps(fam.num_train_timesteps, o.sampler_steps, torch.zeros(n * k, dtype=torch.long))
        x0 = sample_trajectories(fam, predict, x_T, timesteps, o.sampler, record_device="cpu").x0
        return x0.reshape(n, k, *x0.shape[1:])

    @torch.no_grad()
    def score(self, ctx: TrainContext, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Rewards (n, K), fp32 on the CPU, of latents (n, K, ...) for their prompts."""
        n, k = latents.shape[:2]
        if n == 0:
            return torch.zeros(0, k)
        images = ctx.family.decode(latents.flatten(0, 1).to(ctx.device), "pil")
        scores = self.reward_model.score_all(images, [p for p in prompts for _ in range(k)])
        metric = self.options.reward.metric or self.reward_model.primary
        # the scorer's other metrics (e.g. the toy oracle's parts), over all samples: reward/NAME
        self.reward_parts = {f"reward/{name}": (float(sum(values)), float(len(values)))
                             for name, values in scores.items() if name != metric and values}
        return torch.tensor(scores[metric], dtype=torch.float32).reshape(n, k)


def reward_sums(rewards: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(total, count) of all samples' rewards, for the round's running mean."""
    return {"reward_mean": (float(rewards.sum()), float(rewards.numel()))}


def reward_metrics(rewards: torch.Tensor) -> Metrics:
    """This micro-step's reward statistics over all K samples of every prompt."""
    if rewards.numel() == 0:
        return {}
    return {"reward_mean": float(rewards.mean()), "reward_max": float(rewards.max(1).values.mean()),
            "reward_spread": float((rewards.max(1).values - rewards.min(1).values).mean())}


__all__ = ["OnlineOptions", "OnlineRounds", "RewardOptions", "build_reward", "reward_metrics", "reward_sums"]

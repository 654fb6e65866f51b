"""Curated retraining: the self-consuming loop of Ferbach et al. 2024 ("Self-Consuming Generative Models
with Curated Data Provably Optimize Human Preferences", arXiv 2407.09499) on the shared trainer.

Each round (see `diffusion_po.objectives.online`): sample K images per prompt from the round-start model,
keep one per prompt by a Bradley-Terry choice on the reward,

    P(keep k) = softmax_k(r_k / temperature)      (temperature 0: the argmax, the first on ties),

and fine-tune on the kept images (the plain diffusion loss, as `sft`) mixed with a fraction lambda
(`real_data_fraction`) of real images: with `data.format: images`, each batch's first m rows keep their
real image and caption and the other rows' captions are the prompts sampled for, where
m = floor(lambda (s + n)) - floor(lambda s) for a batch of n rows after s rows seen, so the share of real
rows is lambda over the run whatever the batch size. With `data.format: prompts` lambda must be 0.

The paper's warning (curation amplifies the reward model's biases) needs a reward with a known bias: the toy
oracles take one (`reward.options` `bias_colour`, `bias_weight`; `diffusion-po toy online --bias`).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import torch

from diffusion_po.errors import ConfigError
from diffusion_po.objectives.base import Batch, Method, Metrics, TrainContext, check_option, register_method
from diffusion_po.objectives.online import OnlineOptions, OnlineRounds, reward_metrics, reward_sums
from diffusion_po.objectives.sft import loss as diffusion_loss
from diffusion_po.objectives.unpaired import image_errors


def bradley_terry_choice(rewards: torch.Tensor, temperature: float, u: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the kept sample per row of `rewards` (n, K): drawn with probabilities softmax(r / temperature)
    by inverting the CDF at `u` (n uniforms in [0, 1)); the argmax (first on ties) when temperature is 0."""
    rewards = rewards.float()
    if temperature == 0:
        return rewards.argmax(1)
    if u is None:
        raise ValueError("a Bradley-Terry draw with temperature > 0 needs one uniform per prompt")
    cdf = torch.softmax(rewards / temperature, 1).cumsum(1)
    index = (cdf <= u.float().reshape(-1, 1).to(cdf.device)).sum(1)
    return index.clamp(max=rewards.shape[1] - 1)


def real_rows(fraction: float, seen: int, n: int) -> int:
    """Rows of a batch of n that keep their real image, after `seen` rows: floor(l (s + n)) - floor(l s)."""
    frac = Fraction(fraction).limit_denominator(10**6)
    return math.floor(frac * (seen + n)) - math.floor(frac * seen)


@register_method
class Curated(OnlineRounds, Method):
    """Fine-tuning on the reward's pick among K of the model's own samples per prompt, plus real data."""

    name = "curated"
    data_formats = ("prompts", "images")
    needs_reference = False

    @dataclasses.dataclass
    class Options(OnlineOptions):
        temperature: float = 0.0
        """Of the Bradley-Terry choice among the K samples (0: keep the best)."""
        real_data_fraction: float = 0.0
        """lambda: the share of rows trained on real images (data.format images)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_option(self.temperature >= 0, "temperature", "be >= 0", self.temperature)
            check_option(0.0 <= self.real_data_fraction <= 1.0, "real_data_fraction", "be in [0, 1]",
                         self.real_data_fraction)

    def __init__(self, config):
        super().__init__(config)
        if self.options.real_data_fraction > 0 and config.data.format == "prompts":
            raise ConfigError("method_options.real_data_fraction > 0 needs real images: use data.format images "
                              "(rows with image and caption), or set it to 0")
        self.init_online()
        self.rows_seen = 0

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rows_seen": self.rows_seen}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rows_seen = int(state.get("rows_seen", 0))

    def curate(self, ctx: TrainContext, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample K per prompt, score, choose. Returns (kept latents (n, ...), rewards (n, K), kept index (n,))."""
        latents = self.sample(ctx, prompts)
        rewards = self.score(ctx, latents, prompts)
        n = len(prompts)
        u = ctx.rand(n).cpu() if self.options.temperature > 0 and n else None
        index = bradley_terry_choice(rewards, self.options.temperature, u)
        return latents[torch.arange(n), index], rewards, index

    def compute_loss(self, ctx: TrainContext, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        self.start_micro_step(ctx)
        captions = list(batch["captions"])
        n = len(captions)
        m = real_rows(self.options.real_data_fraction, self.rows_seen, n)
        self.rows_seen += n
        kept, rewards, index = self.curate(ctx, captions[m:])
        parts = [kept.to(ctx.device)]
        if m:
            parts.insert(0, ctx.latents(batch, "")[:m])
        x0 = torch.cat(parts).float()
        e = image_errors(ctx, x0, ctx.encode_prompts(captions), with_reference=False)
        total, metrics = diffusion_loss(e["err"])
        metrics.update(reward_metrics(rewards))
        metrics["real_fraction"] = m / n
        sums = reward_sums(rewards)
        if rewards.numel():
            kept_reward = rewards[torch.arange(rewards.shape[0]), index]
            metrics["reward_kept"] = float(kept_reward.mean())
            sums["reward_kept"] = (float(kept_reward.sum()), float(kept_reward.numel()))
        return total, self.finish_micro_step(metrics, sums)

"""Online Diffusion-DPO: pairs sampled from the current policy, labelled by a reward, then DPO steps.

Each round (see `diffusion_po.objectives.online`), every micro-step samples K >= 2 images per prompt of the
batch from the round-start model, scores them with the reward and makes one pair per prompt: the
highest-reward sample is the winner, the lowest the loser (K = 2: the two samples). The loss is
Diffusion-DPO's (`diffusion_po.objectives.dpo.loss`, same beta convention) against a reference that is

- `fixed`: the base model (the trainer's frozen reference, as offline DPO), or
- `refresh`: the policy as it was at the start of the round (the round snapshot), so every round starts
  at loss log 2.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from diffusion_po.families import Conditioning
from diffusion_po.objectives.base import Batch, Method, Metrics, TrainContext, check_option, register_method
from diffusion_po.objectives.dpo import BetaOptions
from diffusion_po.objectives.dpo import loss as dpo_loss
from diffusion_po.objectives.online import OnlineOptions, OnlineRounds, reward_metrics, reward_sums
from diffusion_po.objectives.paired import paired_errors


def best_and_worst(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of rewards (n, K): the index of the highest (winner) and of the lowest (loser) reward; on a
    complete tie the first and the last sample."""
    win = rewards.argmax(1)
    lose = (rewards.shape[1] - 1) - rewards.flip(1).argmin(1)
    return win, lose


class _RoundReference:
    """The trainer's context with `reference_predict` answered by the round snapshot."""

    def __init__(self, ctx: TrainContext, method: OnlineRounds):
        self._ctx, self._method = ctx, method

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def reference_predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self._method.snapshot_predict(self._ctx, x_t, t, cond)


@register_method
class OnlineDPO(OnlineRounds, Method):
    """Diffusion-DPO on reward-labelled pairs of the policy's own samples, round by round."""

    name = "online_dpo"
    data_formats = ("prompts",)

    @dataclasses.dataclass
    class Options(BetaOptions, OnlineOptions):
        samples_per_prompt: int = 2
        reference: Literal["fixed", "refresh"] = "fixed"
        """`fixed`: the base model; `refresh`: the policy at the start of each round."""

        def __post_init__(self) -> None:
            BetaOptions.__post_init__(self)
            OnlineOptions.__post_init__(self)
            check_option(self.samples_per_prompt >= 2, "samples_per_prompt", "be >= 2 (a pair per prompt)",
                         self.samples_per_prompt)
            check_option(self.reference in ("fixed", "refresh"), "reference", "be fixed or refresh", self.reference)

    def __init__(self, config):
        super().__init__(config)
        self.init_online()
        # the trainer keeps its frozen reference only for `fixed`; `refresh` uses the round snapshot
        self.needs_reference = self.options.reference == "fixed"

    def compute_loss(self, ctx: TrainContext, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        self.start_micro_step(ctx)
        prompts = list(batch["captions"])
        n = len(prompts)
        latents = self.sample(ctx, prompts)
        rewards = self.score(ctx, latents, prompts)
        win, lose = best_and_worst(rewards)
        rows = torch.arange(n)
        pairs = {"captions": prompts, "latents_w": latents[rows, win], "latents_l": latents[rows, lose]}
        loss_ctx = ctx if self.options.reference == "fixed" else _RoundReference(ctx, self)
        e = paired_errors(loss_ctx, pairs)
        total, metrics = dpo_loss(e["err_w"], e["err_l"], e["ref_err_w"], e["ref_err_l"], beta=self.options.beta_dpo)
        chosen, rejected = rewards[rows, win], rewards[rows, lose]
        metrics.update(reward_metrics(rewards))
        metrics.update({"reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()),
                        "tie_fraction": float((chosen == rejected).float().mean())})
        sums = reward_sums(rewards)
        sums["reward_gap"] = (float((chosen - rejected).sum()), float(n))
        return total, self.finish_micro_step(metrics, sums)

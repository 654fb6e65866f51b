"""Self-NPO (arXiv 2505.11777): truncated diffusion fine-tuning of a negative model, without preference data.

A student (the trained network) and its EMA teacher (decay 0.999, a copy of the student at the start).
One training step, per sample:

1. Start state at t_s = tau_k, k ~ U{0..N-1} on the DDIM grid tau_k = (k+1) T/N - 1 (N = 25: 39, 79, ..., 999):
   - from images (data.format `images`): x_{t_s} = alpha x0 + sigma eps, x0 the image latents;
   - from the model's own samples (data.format `prompts`, no images at all): the teacher's plain
     (conditional, `sample_guidance`) DDIM rollout from pure noise at tau_{N-1} down to tau_k.
2. Teacher rollout of `teacher_steps` (5) DDIM steps with *negatively guided* predictions
   pred = pred_c + w (pred_c - pred_u) (the "Imagen + 1" convention: w = -1 gives the unconditional
   prediction; SD1.x uses w = -1, SDXL w = -5 with all-zero unconditional embeddings). A trajectory that
   reaches t = 0 stops there. t_e = max(t_s - teacher_steps T/N, 0); the target is the guided x0-prediction
   at (x_e, t_e).
3. Truncated re-noising to t' ~ U{t_e + 1, ..., T - 1} with the exact forward kernel in noise-to-signal
   space: x_{t'} = alpha' (x_e / alpha_e + sqrt((sigma'/alpha')^2 - (sigma_e/alpha_e)^2) eps').
4. Student x0-prediction at (x_{t'}, t', c) (c the real prompt) and the pseudo-Huber loss
   mean(sqrt((x0_student - x0_target)^2 + c_h^2) - c_h), c_h = 0.001.

Deviations from the reference code (on purpose): x0 and eps are derived from the guided prediction through
the family, so v-prediction and flow-matching models get the right target (the reference uses the eps
formulas for the student and feeds a guided *v* as noise to the DDIM step); the target is always taken at
the final state, also when every trajectory of the batch reached t = 0 early (the reference then keeps the
x0-prediction of the previous state); t' is drawn vectorised.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from diffusion_po.errors import ConfigError
from diffusion_po.families import Conditioning
from diffusion_po.families.networks import (
    ema_update,
    frozen_copy,
    load_params_state,
    params_state,
    trained_names,
)
from diffusion_po.objectives.base import Batch, Method, Metrics, TrainContext, register_method
from diffusion_po.objectives.unpaired import autocast, trainable_network
from diffusion_po.sampling.rollout import alpha_sigma, eps_from_x0, timesteps_between

# ----------------------------------------------------------------------------- pure pieces


def ddim_grid(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """tau_k = (k + 1) * (T // N) - 1, k = 0..N-1 (T = 1000, N = 25: 39, 79, ..., 999)."""
    ratio = num_train_timesteps // num_steps
    return torch.arange(1, num_steps + 1) * ratio - 1


def guide(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """pred_c + w (pred_c - pred_u) (w = -1: the unconditional prediction; w = 0: the conditional one)."""
    return pred_cond + w * (pred_cond - pred_uncond)


def renoise(x_e: torch.Tensor, alpha_e, sigma_e, alpha_p, sigma_p, noise: torch.Tensor) -> torch.Tensor:
    """The exact forward kernel from t_e to t' > t_e, in noise-to-signal space:
    x' = alpha' (x_e / alpha_e + sqrt((sigma'/alpha')^2 - (sigma_e/alpha_e)^2) noise)."""
    var = ((sigma_p / alpha_p) ** 2 - (sigma_e / alpha_e) ** 2).clamp(min=0)
    return alpha_p * (x_e / alpha_e + var.sqrt() * noise)


def per_sample_distance(pred: torch.Tensor, target: torch.Tensor, huber_c: float = 0.001,
                        loss_type: str = "huber") -> torch.Tensor:
    """Per-sample mean over C,H,W (fp32) of the pseudo-Huber sqrt(d^2 + c^2) - c, or of d^2 (`l2`)."""
    d = pred.float() - target.float()
    dims = tuple(range(1, d.dim()))
    if loss_type == "huber":
        return (torch.sqrt(d.pow(2) + huber_c**2) - huber_c).mean(dim=dims)
    if loss_type == "l2":
        return d.pow(2).mean(dim=dims)
    raise ValueError(f"unknown loss_type '{loss_type}' (huber or l2)")


def loss(distances: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Self-NPO loss over 1-D per-sample distances (from `per_sample_distance`): their mean.

    With equal-sized samples this equals the reference's mean over all elements.
    """
    total = distances.float().mean()
    return total, {"loss": total.detach()}


# ----------------------------------------------------------------------------- method

FAMILY_GUIDANCE = {"sd": -1.0, "sdxl": -5.0, "sd3": -1.0}
"""The authors' teacher guidance w per family (others: -1)."""


@register_method
class SelfNPO(Method):
    """Truncated diffusion fine-tuning against an EMA teacher's negatively guided DDIM rollout."""

    name = "self_npo"
    data_formats = ("prompts", "images")
    needs_reference = False
    shared_error_path = False  # a distance to a teacher rollout's x0, not a denoising error

    @dataclasses.dataclass
    class Options:
        guidance: float | None = None
        """Teacher guidance w in pred_c + w (pred_c - pred_u); default -1 (SD1.x/2.x, SD3), -5 (SDXL)."""
        uncond: Literal["auto", "empty", "zeros"] = "auto"
        """Unconditional embeddings: `auto` = the family's (`Family.unconditional`: '' encoded for SD1.x/2.x and
        SD3, all zeros for SDXL with force_zeros_for_empty_prompt, the authors' choices); `empty` = '' encoded;
        `zeros` = all zeros. The image's own micro-conditioning (SDXL time ids) is kept in every case."""
        num_ddim_timesteps: int = 25
        teacher_steps: int = 5
        ema_decay: float = 0.999
        loss_type: Literal["huber", "l2"] = "huber"
        huber_c: float = 0.001
        sample_guidance: float = 0.0
        """Guidance (same convention) of the teacher rollout that makes starting states when the data
        has no images; 0 = the conditional prediction."""

        def __post_init__(self) -> None:
            if self.num_ddim_timesteps <= 0 or self.teacher_steps <= 0:
                raise ConfigError("method_options.num_ddim_timesteps and teacher_steps must be positive")
            if not 0.0 <= self.ema_decay <= 1.0:
                raise ConfigError(f"method_options.ema_decay must be in [0, 1], got {self.ema_decay!r}")

    def __init__(self, config):
        super().__init__(config)
        self.teacher: torch.nn.Module | None = None
        self._empty: Conditioning | None = None

    # --- set-up and state
    def setup(self, ctx: TrainContext) -> None:
        """Make the EMA teacher: a frozen copy of the network as training starts."""
        student = trainable_network(ctx)
        self.teacher = frozen_copy(student)
        ctx.speed_up(self.teacher)  # the run's speed switches (a deep copy is not compiled)
        # only these differ between teacher and student (all of them for full fine-tuning, the LoRA weights otherwise)
        self._trainable = trained_names(student)
        name = ctx.family.name
        w = FAMILY_GUIDANCE.get(name, -1.0)
        self.w = self.options.guidance if self.options.guidance is not None else w
        self.uncond_kind = self.options.uncond

    def on_optimizer_step(self, ctx: TrainContext, step: int) -> None:
        ema_update(self._teacher(ctx), trainable_network(ctx), self.options.ema_decay)

    def state_dict(self) -> dict:
        """The teacher's EMA weights (the trained subset: LoRA weights, or the whole network)."""
        if self.teacher is None:
            return {}
        return {"teacher": params_state(self.teacher, self._trainable)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("teacher") and self.teacher is not None:
            load_params_state(self.teacher, state["teacher"], "Self-NPO teacher")

    def _teacher(self, ctx: TrainContext) -> torch.nn.Module:
        if self.teacher is None:
            self.setup(ctx)
        return self.teacher

    # --- conditioning
    def _uncond(self, ctx: TrainContext, cond: Conditioning) -> Conditioning:
        n = next(iter(cond.values())).shape[0]
        fam, out = ctx.family, {}
        if self.uncond_kind != "zeros" and self._empty is None:
            res = ctx.config.resolution
            self._empty = (fam.unconditional(1, resolution=res) if self.uncond_kind == "auto"
                           else fam.encode_prompts([""], resolution=res))
        for key, value in cond.items():
            if key in fam.row_keys:  # micro-conditioning (SDXL time ids) stays the image's own
                out[key] = value
            elif self.uncond_kind == "zeros":
                out[key] = torch.zeros_like(value)
            else:
                e = self._empty[key].to(value.device, value.dtype)
                out[key] = e.expand(n, *e.shape[1:])
        return out

    @torch.no_grad()
    def _teacher_pred(self, ctx: TrainContext, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      uncond: Conditioning, w: float) -> torch.Tensor:
        """Guided teacher prediction (model space); one batched forward, or one branch when w is 0 or -1."""
        fam, teacher = ctx.family, self._teacher(ctx)
        with autocast(ctx):
            if w == 0.0:
                return fam.predict(teacher, x, t, cond).float()
            if w == -1.0:
                return fam.predict(teacher, x, t, uncond).float()
            both = fam.predict(teacher, torch.cat([x, x]), torch.cat([t, t]),
                               {k: torch.cat([cond[k], uncond[k]]) for k in cond}).float()
        pred_c, pred_u = both.chunk(2)
        return guide(pred_c, pred_u, w)

    @torch.no_grad()
    def rollout(self, ctx: TrainContext, x: torch.Tensor, t: torch.Tensor, stop: torch.Tensor,
                cond: Conditioning, uncond: Conditioning, w: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to `steps` guided DDIM steps of size T/N from (x, t); a sample stops at t == stop (>= 0).
        Returns (x_end, t_end)."""
        fam = ctx.family
        ratio = fam.num_train_timesteps // self.options.num_ddim_timesteps
        t = t.clone().long()
        stop = stop.long().to(t.device)
        for _ in range(steps):
            active = t > stop
            if not bool(active.any()):
                break
            pred = self._teacher_pred(ctx, x, t.to(x.device), cond, uncond, w)
            a, s = alpha_sigma(fam, t, x)
            x0 = fam.x0_from_prediction(x, pred, t.to(x.device)).float()
            t_next = torch.maximum(t - ratio, stop)
            a_n, s_n = alpha_sigma(fam, t_next, x)
            x_next = a_n * x0 + s_n * eps_from_x0(x, x0, a, s)
            keep = active.to(x.device).view(-1, *([1] * (x.dim() - 1)))
            x = torch.where(keep, x_next, x)
            t = torch.where(active, t_next, t)
        return x, t

    def compute_loss(self, ctx: TrainContext, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        fam, o = ctx.family, self.options
        teacher = self._teacher(ctx)  # noqa: F841  (makes sure the teacher exists)
        prompts = batch["captions"]
        n = len(prompts)
        cond = ctx.encode_prompts(prompts, batch)
        uncond = self._uncond(ctx, cond)
        T = fam.num_train_timesteps
        grid = ddim_grid(T, o.num_ddim_timesteps)
        ratio = T // o.num_ddim_timesteps
        k = (ctx.rand(n).cpu() * o.num_ddim_timesteps).long().clamp(max=o.num_ddim_timesteps - 1)
        t_s = grid[k]
        if ctx.has_images(batch, ""):
            x0 = ctx.latents(batch, "")
            x = fam.noisy_latents(x0, ctx.randn(tuple(x0.shape)), t_s.to(x0.device))
        else:  # the model's own samples: plain DDIM from pure noise at tau_{N-1} down to t_s
            f = fam.vae_scale_factor
            shape = (n, fam.latent_channels, ctx.config.resolution // f, ctx.config.resolution // f)
            x = ctx.randn(shape).float()
            t_top = torch.full((n,), int(grid[-1]))
            x, _ = self.rollout(ctx, x, t_top, t_s, cond, uncond, o.sample_guidance, o.num_ddim_timesteps)
        # negatively guided teacher rollout to t_e, then the target x0 there
        t_e_goal = (t_s - o.teacher_steps * ratio).clamp(min=0)
        x_e, t_e = self.rollout(ctx, x.float(), t_s, t_e_goal, cond, uncond, self.w, o.teacher_steps)
        pred_e = self._teacher_pred(ctx, x_e, t_e.to(x_e.device), cond, uncond, self.w)
        target = fam.x0_from_prediction(x_e, pred_e, t_e.to(x_e.device)).float().detach()
        # truncated re-noising to t' in (t_e, T-1] and the student's x0-prediction there
        t_p = timesteps_between(t_e, T - 1, ctx.rand(n))
        a_e, s_e = alpha_sigma(fam, t_e, x_e)
        a_p, s_p = alpha_sigma(fam, t_p, x_e)
        x_p = renoise(x_e, a_e, s_e, a_p, s_p, ctx.randn(tuple(x_e.shape)))
        t_p_dev = t_p.to(x_p.device)
        student_x0 = fam.x0_from_prediction(x_p, ctx.policy_predict(x_p, t_p_dev, cond), t_p_dev)
        dist = per_sample_distance(student_x0, target, o.huber_c, o.loss_type)
        total, metrics = loss(dist)
        metrics.update(t_start=t_s.float().mean(), t_end=t_e.float().mean(), t_prime=t_p.float().mean())
        return total, metrics

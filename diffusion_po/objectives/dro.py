"""Diffusion-DRO, Denoising Ranking Optimization (Wu et al., NeurIPS 2025, arXiv 2510.18353).

Offline expert images against the policy's own online samples, with a hinge ranking loss. Per sample,
with a shared prompt c and a shared timestep t:

    expert:  x_t = alpha x0_exp + sigma eps_bar (fresh eps_bar),  target = the family's target (eps, v, ...)
    policy:  (x_t, eps_pol) from the replay buffer: a state on a trajectory sampled by a stale snapshot of
             the policy, and that snapshot's own prediction at that state (the target)
    d = (err_phi^exp - err_ref^exp) - (err_phi^pol - err_ref^pol)
    loss = mean(max(0, d + m)),  m = 0.001

The buffer is filled inside the training loop (see `diffusion_po.sampling.rollout`): every
`buffer_sample_steps` micro-steps the snapshot samples the incoming batch's prompts from fresh noise with a
few-step solver (`sampler`, `sampler_steps`) on per-sample jittered timesteps, and each entry keeps
(conditioning, expert latents, trajectory). The snapshot is refreshed from the trained weights every
`policy_refresh_steps` micro-steps. Master weights stay fp32 (the reference trains bf16 masters).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F

from diffusion_po.errors import ConfigError
from diffusion_po.families import cat_cond, per_sample_error
from diffusion_po.families.networks import copy_weights, frozen_copy
from diffusion_po.objectives.base import Batch, Method, Metrics, TrainContext, register_method
from diffusion_po.objectives.unpaired import autocast, trainable_network
from diffusion_po.sampling.rollout import SOLVERS, ReplayBuffer, jittered_timesteps, sample_trajectories


def loss(
    err_exp: torch.Tensor,
    err_pol: torch.Tensor,
    ref_err_exp: torch.Tensor,
    ref_err_pol: torch.Tensor,
    margin: float = 0.001,
) -> tuple[torch.Tensor, Metrics]:
    """DRO hinge loss over 1-D per-sample errors: mean(max(0, d + margin)),
    d = (err_exp - ref_err_exp) - (err_pol - ref_err_pol)."""
    exp_diff = err_exp.float() - ref_err_exp.float()
    pol_diff = err_pol.float() - ref_err_pol.float()
    d = exp_diff - pol_diff
    per = F.relu(d + margin)
    total = per.mean()
    metrics = {
        "loss": total.detach(),
        "diff": d.mean().detach(),
        "active": (d + margin > 0).float().mean().detach(),
        "expert": err_exp.float().mean().detach(),
        "policy": err_pol.float().mean().detach(),
        "expert0": ref_err_exp.float().mean().detach(),
        "policy0": ref_err_pol.float().mean().detach(),
        "expert_diff": exp_diff.mean().detach(),
        "policy_diff": pol_diff.mean().detach(),
    }
    return total, metrics


@register_method
class DiffusionDRO(Method):
    """Expert images (data.format images) ranked above the policy's own samples from a replay buffer."""

    name = "dro"
    data_formats = ("images",)
    shared_error_path = False  # its errors mix expert targets and buffered trajectories

    @dataclasses.dataclass
    class Options:
        margin: float = 0.001
        buffer_size: int = 4
        """Entries (prompt, expert image, trajectory) kept, newest first out last (FIFO)."""
        buffer_sample_steps: int = 1
        """Sample the incoming batch's prompts into the buffer every this many micro-steps."""
        policy_refresh_steps: int = 16
        """Copy the trained weights into the sampling snapshot every this many micro-steps."""
        sampler: Literal["dpmsolver++", "ddim"] = "dpmsolver++"
        sampler_steps: int = 20
        perturb_timesteps: bool = True
        """Per-sample offset U{0..T/steps-1} added to the sampler's timestep grid."""
        buffer_guidance_scale: float = 1.0
        """CFG scale of the buffer sampler (diffusers convention; 1 = no guidance, as the reference)."""
        buffer_offload: bool = True
        """Keep the buffer on the CPU."""

        def __post_init__(self) -> None:
            for key in ("buffer_size", "buffer_sample_steps", "policy_refresh_steps", "sampler_steps"):
                if getattr(self, key) <= 0:
                    raise ConfigError(f"method_options.{key} must be positive, got {getattr(self, key)!r}")

    def __init__(self, config):
        super().__init__(config)
        o = self.options
        if o.sampler not in SOLVERS:
            raise ConfigError(f"method_options.sampler must be one of {', '.join(SOLVERS)}")
        self.buffer = ReplayBuffer(o.buffer_size, offload=o.buffer_offload)
        self.snapshot: torch.nn.Module | None = None
        self.micro_step = 0
        self.generator = torch.Generator().manual_seed(int(config.seed) * 7919 + 17)

    def setup(self, ctx: TrainContext) -> None:
        """The sampling snapshot: a frozen copy of the network as training starts."""
        self.snapshot = frozen_copy(trainable_network(ctx))
        ctx.speed_up(self.snapshot)  # the run's speed switches (a deep copy is not compiled)
        self.generator.manual_seed(int(ctx.config.seed) * 7919 + 17 + ctx.process_index)

    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step}

    def load_state_dict(self, state: dict) -> None:
        # the snapshot restarts from the resumed weights and the buffer refills (the reference does the same)
        self.micro_step = int(state.get("micro_step", 0))

    def refresh(self, ctx: TrainContext) -> None:
        if self.snapshot is None:
            self.setup(ctx)
        else:
            copy_weights(self.snapshot, trainable_network(ctx))

    @torch.no_grad()
    def fill(self, ctx: TrainContext, batch: Batch) -> None:
        """Sample the batch's prompts with the snapshot and add (cond, expert x0, trajectory) entries."""
        o, fam = self.options, ctx.family
        x0 = ctx.latents(batch, "")
        cond = ctx.encode_prompts(batch["captions"], batch)
        n = x0.shape[0]
        x_T = ctx.randn(tuple(x0.shape))
        ratio = fam.num_train_timesteps // o.sampler_steps
        u = ctx.rand(n).cpu()
        offsets = (u * ratio).long().clamp(max=ratio - 1) if o.perturb_timesteps else torch.zeros(n, dtype=torch.long)
        timesteps = jittered_timesteps(fam.num_train_timesteps, o.sampler_steps, offsets)
        uncond = None
        if o.buffer_guidance_scale != 1.0:
            empty = fam.row_conditioning(fam.unconditional(n, ctx.config.resolution), *ctx.image_sizes(batch),
                                         ctx.config.resolution)
            uncond = {k: v.to(cond[k].device, cond[k].dtype) for k, v in empty.items()}
        snapshot = self.snapshot

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast(ctx):
                if uncond is None:
                    return fam.predict(snapshot, x, t, cond).float()
                both = fam.predict(snapshot, torch.cat([x, x]), torch.cat([t, t]), cat_cond([cond, uncond])).float()
            c, u_ = both.chunk(2)
            return u_ + o.buffer_guidance_scale * (c - u_)

        record = "cpu" if o.buffer_offload else None
        traj = sample_trajectories(fam, predict, x_T, timesteps, o.sampler, record_device=record)
        self.buffer.add(cond, x0, traj)

    def compute_loss(self, ctx: TrainContext, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        o, fam = self.options, ctx.family
        if self.snapshot is None:
            self.setup(ctx)
        elif self.micro_step > 0 and self.micro_step % o.policy_refresh_steps == 0:
            self.refresh(ctx)
        if len(self.buffer) == 0 or self.micro_step % o.buffer_sample_steps == 0:
            self.fill(ctx, batch)
        self.micro_step += 1
        n = ctx.batch_size(batch)
        s = self.buffer.sample(n, self.generator, device=ctx.device)
        x0, t, cond = s["x0"].float(), s["t"], s["cond"]
        eps_bar = ctx.randn(tuple(x0.shape))
        x_exp = fam.noisy_latents(x0, eps_bar, t)
        target = torch.cat([fam.training_target(x0, eps_bar, t), s["pred"].float()])
        x_t = torch.cat([x_exp, s["x_t"].float()])
        t2 = torch.cat([t, t])
        cond2 = cat_cond([cond, cond])
        err = per_sample_error(ctx.policy_predict(x_t, t2, cond2), target)
        ref = per_sample_error(ctx.reference_predict(x_t, t2, cond2), target)
        total, metrics = loss(err[:n], err[n:], ref[:n], ref[n:], margin=o.margin)
        metrics["buffer_size"] = float(len(self.buffer))
        return total, metrics

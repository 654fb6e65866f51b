"""Online sampling inside the training loop (Diffusion-DRO's replay buffer, Self-NPO's teacher rollouts).

- `alpha_sigma(family, t)`: the family's own `Family.alpha_sigma` (the one schedule; DDPM: sqrt(abar),
  sqrt(1 - abar); flow matching: 1 - t/T, t/T).
- `sample_trajectories(...)`: a few-step deterministic solver (DDIM or DPM-Solver++(2M)) that runs with a
  **different timestep schedule per sample** and records, at every step, the state x_t, the timestep t
  and the network's prediction at (x_t, t): the three are aligned by construction (the prediction
  recorded at step i was evaluated on the state recorded at step i).
- `ReplayBuffer`: a FIFO of (conditioning, expert latents, trajectory) entries, optionally kept on the
  CPU, from which a training step draws entries and one random step per entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffusion_po.families import Family

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SOLVERS = ("ddim", "dpmsolver++")


def alpha_sigma(family: Family, t: torch.Tensor, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) per sample, fp32, shaped to broadcast against `like` (or 1-D without it):
    `family.alpha_sigma`."""
    return family.alpha_sigma(t, like)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise consistent with x_t = alpha x0 + sigma eps."""
    return (x_t.float() - alpha * x0.float()) / sigma


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_next: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): x_next = alpha_next x0 + sigma_next eps."""
    return alpha_next * x0 + sigma_next * eps


def dpmsolver_pp_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    x0_prev: torch.Tensor | None,
    alpha: torch.Tensor, sigma: torch.Tensor,
    alpha_next: torch.Tensor, sigma_next: torch.Tensor,
    h_prev: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++ step (2M multistep, first order without history). Returns (x_next, h).

    lambda = log(alpha / sigma); h = lambda_next - lambda. First order:
    x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) x0. Second order adds
    -0.5 alpha_next (e^{-h} - 1) (x0 - x0_prev) / r with r = h_prev / h. A step to sigma = 0 returns x0.
    """
    final = sigma_next <= 0
    sn = torch.where(final, torch.full_like(sigma_next, 1e-12), sigma_next)
    h = torch.log(alpha_next / sn) - torch.log(alpha / sigma)
    phi = torch.expm1(-h)  # e^{-h} - 1
    x_next = (sn / sigma) * x - alpha_next * phi * x0
    if x0_prev is not None and h_prev is not None:
        r = h_prev / h
        x_next = x_next - 0.5 * alpha_next * phi * (x0 - x0_prev) / r
    x_next = torch.where(final, x0, x_next)
    return x_next, h


@dataclass
class Trajectory:
    """A batch of recorded trajectories: `t` (B, S), `x_t` (B, S, ...), `pred` (B, S, ...), final `x0` (B, ...)."""

    t: torch.Tensor
    x_t: torch.Tensor
    pred: torch.Tensor
    x0: torch.Tensor


def jittered_timesteps(num_train_timesteps: int, steps: int, offsets: torch.Tensor) -> torch.Tensor:
    """Per-sample schedules (B, steps): the grid arange(steps) * (T // steps), descending, plus each
    sample's offset in [0, T // steps)."""
    ratio = num_train_timesteps // steps
    base = (torch.arange(steps) * ratio).flip(0)
    return base[None, :] + offsets.long().cpu()[:, None]


@torch.no_grad()
def sample_trajectories(
    family: Family,
    predict: Predict,
    x_T: torch.Tensor,
    timesteps: torch.Tensor,
    solver: str = "dpmsolver++",
    record_device: torch.device | str | None = None,
) -> Trajectory:
    """Run `predict(x, t)` (the model's raw output: eps, v or flow velocity) along per-sample schedules.

    `timesteps` is (B, S), descending along S. Step i records (t[:, i], x_i, predict(x_i, t[:, i])); the
    solver then moves x_i to the state at t[:, i + 1] (after the last step, to sigma = 0 via x0).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver '{solver}'; choose one of {', '.join(SOLVERS)}")
    b, steps = timesteps.shape
    if b != x_T.shape[0]:
        raise ValueError(f"timesteps has {b} rows but x_T has batch {x_T.shape[0]}")
    record_device = record_device or x_T.device
    x = x_T.float()
    ts, xs, preds = [], [], []
    x0_prev = h_prev = None
    x0 = x
    for i in range(steps):
        t = timesteps[:, i].to(x.device)
        pred = predict(x, t).float()
        ts.append(t.cpu())
        xs.append(x.to(record_device))
        preds.append(pred.to(record_device))
        alpha, sigma = alpha_sigma(family, t, x)
        x0 = family.x0_from_prediction(x, pred, t).float()
        if i == steps - 1:
            break
        t_next = timesteps[:, i + 1]
        alpha_next, sigma_next = alpha_sigma(family, t_next, x)
        if solver == "ddim":
            x = ddim_step(x0, eps_from_x0(x, x0, alpha, sigma), alpha_next, sigma_next)
        else:
            x, h = dpmsolver_pp_step(x, x0, x0_prev, alpha, sigma, alpha_next, sigma_next, h_prev)
            x0_prev, h_prev = x0, h
    return Trajectory(torch.stack(ts, 1), torch.stack(xs, 1), torch.stack(preds, 1), x0)


class ReplayBuffer:
    """FIFO of entries, each (conditioning, expert latents `x0`, trajectory `t`/`x_t`/`pred`).

    `add` appends a batch of entries and keeps the newest `capacity`; `sample(n)` draws n entries
    (without replacement when n <= len, else with) and one step index per entry, returning per entry
    `x0`, `t`, `x_t`, `pred`, `step` and the conditioning `cond` (a dict), all on `device`.
    """

    STEP_KEYS = ("t", "x_t", "pred")

    def __init__(self, capacity: int, offload: bool = True):
        if capacity <= 0:
            raise ValueError("buffer capacity must be positive")
        self.capacity = capacity
        self.offload = offload
        self.data: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return 0 if not self.data else int(next(iter(self.data.values())).shape[0])

    def add(self, cond: dict[str, torch.Tensor], x0: torch.Tensor, trajectory: Trajectory) -> None:
        entries = {"x0": x0, "t": trajectory.t, "x_t": trajectory.x_t, "pred": trajectory.pred}
        entries.update({f"cond.{k}": v for k, v in cond.items()})
        sizes = {k: v.shape[0] for k, v in entries.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"replay buffer entries disagree on batch size: {sizes}")
        for key, value in entries.items():
            value = value.detach()
            value = value.cpu() if self.offload else value
            old = self.data.get(key)
            self.data[key] = (value if old is None else torch.cat([old.to(value.device), value]))[-self.capacity:]

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> dict[str, Any]:
        size = len(self)
        if size == 0:
            raise RuntimeError("the replay buffer is empty")
        if n <= size:
            idx = torch.randperm(size, generator=generator)[:n]
        else:
            idx = torch.randint(0, size, (n,), generator=generator)
        steps = self.data["t"].shape[1]
        step = torch.randint(0, steps, (n,), generator=generator)
        out: dict[str, Any] = {"step": step, "index": idx, "cond": {}}
        for key, value in self.data.items():
            i = idx.to(value.device)
            picked = value[i, step.to(value.device)] if key in self.STEP_KEYS else value[i]
            picked = picked.to(device) if device is not None else picked
            if key.startswith("cond."):
                out["cond"][key[5:]] = picked
            else:
                out[key] = picked
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "data": {k: v.cpu() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state.get("capacity", self.capacity))
        self.data = dict(state.get("data", {}))


def timesteps_between(low_exclusive: torch.Tensor, high_inclusive: int, u: torch.Tensor) -> torch.Tensor:
    """Integer t uniform on {low+1, ..., high} per sample from uniforms u in [0, 1)."""
    low = low_exclusive.long().cpu()
    span = (high_inclusive - low).clamp(min=1)
    return low + 1 + torch.minimum((u.cpu() * span).long(), span - 1)


__all__ = [
    "ReplayBuffer", "SOLVERS", "Trajectory", "alpha_sigma", "ddim_step", "dpmsolver_pp_step", "eps_from_x0",
    "jittered_timesteps", "sample_trajectories", "timesteps_between",
]

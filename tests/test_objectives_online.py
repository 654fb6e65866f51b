"""The in-loop sampler and replay buffer of Diffusion-DRO (diffusion_po.sampling.rollout): per-sample
schedules, alignment of (x_t, t, eps_pol) recorded at the same step, FIFO capacity, and the solvers
against hand formulas and diffusers' DPM-Solver++."""

from __future__ import annotations

import pytest
import torch

from diffusion_po.families.networks import ema_update
from diffusion_po.sampling import rollout as online

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def family(tiny_sd):
    from diffusion_po.families import load_family

    return load_family(tiny_sd)


def fake_predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a network: depends on both the state and the timestep."""
    return 0.3 * x + (t.float() / 1000.0).view(-1, 1, 1, 1) - 0.1


def test_jittered_timesteps_grid_and_offsets():
    ts = online.jittered_timesteps(1000, 20, torch.tensor([0, 7, 49]))
    assert ts.shape == (3, 20)
    assert ts[0].tolist() == list(range(950, -1, -50))
    assert ts[1].tolist() == [v + 7 for v in range(950, -1, -50)]
    assert ts[2, 0].item() == 999 and ts[2, -1].item() == 49


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver++"])
def test_trajectory_alignment(family, solver):
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(3, 4, 8, 8, generator=gen)
    ts = online.jittered_timesteps(1000, 5, torch.tensor([0, 13, 40]))
    traj = online.sample_trajectories(family, fake_predict, x_T, ts, solver)
    assert traj.t.shape == (3, 5) and traj.x_t.shape == (3, 5, 4, 8, 8) and traj.pred.shape == (3, 5, 4, 8, 8)
    assert torch.equal(traj.t, ts)
    assert torch.equal(traj.x_t[:, 0], x_T)  # the first recorded state is x_T, at the first timestep
    for i in range(5):  # the prediction recorded at step i was made on the state recorded at step i, at t_i
        assert torch.allclose(traj.pred[:, i], fake_predict(traj.x_t[:, i], traj.t[:, i]))
    # the DDIM step from the recorded state i reproduces the recorded state i + 1 (hand formula)
    if solver == "ddim":
        abar = family.noise_scheduler.alphas_cumprod
        for i in range(4):
            a = abar[ts[:, i]].sqrt().view(-1, 1, 1, 1)
            s = (1 - abar[ts[:, i]]).sqrt().view(-1, 1, 1, 1)
            a2 = abar[ts[:, i + 1]].sqrt().view(-1, 1, 1, 1)
            s2 = (1 - abar[ts[:, i + 1]]).sqrt().view(-1, 1, 1, 1)
            eps = traj.pred[:, i]
            x0 = (traj.x_t[:, i] - s * eps) / a
            assert torch.allclose(traj.x_t[:, i + 1], a2 * x0 + s2 * eps, atol=1e-5)


def test_dpmsolver_matches_diffusers_on_a_shared_schedule(family):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler.from_config(
        family.noise_scheduler.config, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=False,
        final_sigmas_type="zero", prediction_type="epsilon",
    )
    steps = [957, 907, 807, 607, 307]
    sched.set_timesteps(timesteps=steps)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ours = online.sample_trajectories(family, fake_predict, x, torch.tensor([steps, steps]), "dpmsolver++")
    states = [x]
    for t in sched.timesteps:
        x = sched.step(fake_predict(x, t.repeat(2)), t, x).prev_sample
        states.append(x)
    for i in range(len(steps)):
        assert torch.allclose(ours.x_t[:, i], states[i], atol=1e-4), i


def test_buffer_fifo_and_aligned_samples(family):
    buf = online.ReplayBuffer(capacity=4)
    gen = torch.Generator().manual_seed(0)
    entries = []
    for round_ in range(3):  # 3 batches of 2 entries -> only the newest 4 stay
        x_T = torch.randn(2, 4, 8, 8, generator=gen)
        ts = online.jittered_timesteps(1000, 4, torch.randint(0, 250, (2,), generator=gen))
        traj = online.sample_trajectories(family, fake_predict, x_T, ts, "dpmsolver++")
        x0 = torch.full((2, 4, 8, 8), float(round_)) + torch.arange(2).view(2, 1, 1, 1) * 0.1
        cond = {"prompt_embeds": x0[:, :1, :2, :].reshape(2, 2, 8).clone()}
        buf.add(cond, x0, traj)
        entries.append(x0)
    assert len(buf) == 4
    kept = torch.cat(entries)[-4:]
    assert torch.equal(buf.data["x0"], kept)
    draw = buf.sample(3, torch.Generator().manual_seed(5))
    assert draw["x_t"].shape == (3, 4, 8, 8) and draw["t"].shape == (3,)
    assert len(set(draw["index"].tolist())) == 3  # without replacement when n <= size
    # each sampled (x_t, t, eps_pol) triple is aligned, and x0 / cond come from the same entry
    assert torch.allclose(draw["pred"], fake_predict(draw["x_t"], draw["t"]))
    assert torch.equal(draw["x0"], kept[draw["index"]])
    assert torch.equal(draw["cond"]["prompt_embeds"], draw["x0"][:, :1, :2, :].reshape(3, 2, 8))
    big = buf.sample(9, torch.Generator().manual_seed(5))  # with replacement beyond the size
    assert big["x_t"].shape[0] == 9
    with pytest.raises(RuntimeError):
        online.ReplayBuffer(2).sample(1)


def test_ema_update_and_timesteps_between():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    ema_update(a, b, decay=0.9)
    assert torch.allclose(a.weight, 0.9 * wa + 0.1 * wb)
    t = online.timesteps_between(torch.tensor([0, 500, 998]), 999, torch.tensor([0.0, 0.9999, 0.5]))
    assert t.tolist() == [1, 999, 999]
    lows = torch.randint(0, 999, (1000,))
    t = online.timesteps_between(lows, 999, torch.rand(1000))
    assert bool((t > lows).all()) and bool((t <= 999).all())

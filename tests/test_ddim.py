"""DDIM step math against diffusers' own scheduler and against algebra."""

from __future__ import annotations

import pytest
import torch

from nulltext import ddim
from nulltext.config import SchedulerConfig
from nulltext.ddim import Schedule, make_scheduler


@pytest.fixture
def scheduler():
    return make_scheduler()


def test_scheduler_is_the_release_configuration(scheduler):
    cfg = scheduler.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == (False, False, 1)
    s = Schedule.from_scheduler(scheduler, 50)
    assert s.timesteps == tuple(range(981, 0, -20))  # 981, 961, ..., 1
    assert s.step_size == 20
    # set_alpha_to_one=False: abar of the step below t=1 is abar(0)
    assert s.abar(1 - 20) == scheduler.alphas_cumprod[0]


@pytest.mark.parametrize("num_steps", [50, 10, 7])
def test_forward_step_equals_diffusers_ddim_step(scheduler, num_steps):
    """ddim.step is bit-identical to DDIMScheduler.step(eta=0) at every timestep."""
    s = Schedule.from_scheduler(scheduler, num_steps)
    g = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps:
        sample = torch.randn(2, 4, 8, 8, generator=g)
        eps = torch.randn(2, 4, 8, 8, generator=g)
        ours = ddim.step(s, sample, eps, int(t))
        theirs = scheduler.step(eps, t, sample, eta=0.0).prev_sample
        assert torch.equal(ours, theirs), f"t={int(t)}"


def test_inverse_step_uses_the_release_indices(scheduler):
    """z_t from z_{t-k}: x0 with abar(t-k) (final_alpha_cumprod below 0), then re-noise to abar(t)."""
    s = Schedule.from_scheduler(scheduler, 50)
    z = torch.full((1, 4, 2, 2), 0.7, dtype=torch.float64)
    e = torch.full((1, 4, 2, 2), -0.3, dtype=torch.float64)
    ac = scheduler.alphas_cumprod.double()
    for t, a_prev in [(1, ac[0]), (21, ac[1]), (981, ac[961])]:
        a_t = ac[t]
        x0 = (0.7 - (1 - a_prev).sqrt() * -0.3) / a_prev.sqrt()  # by hand
        expected = a_t.sqrt() * x0 + (1 - a_t).sqrt() * -0.3
        sched64 = Schedule(s.timesteps, ac, ac[0], s.step_size)
        got = ddim.inverse_step(sched64, z, e, t)
        torch.testing.assert_close(got, expected.expand_as(z), rtol=0, atol=1e-14)


def test_forward_and_inverse_steps_are_exact_inverses(scheduler):
    s = Schedule.from_scheduler(scheduler, 50)
    g = torch.Generator().manual_seed(1)
    s64 = Schedule(s.timesteps, s.alphas_cumprod.double(), s.final_alpha_cumprod.double(), s.step_size)
    for t in s.timesteps:
        z = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
        e = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
        # z_{t-k} -> z_t -> z_{t-k}, and z_t -> z_{t-k} -> z_t, with the same eps
        torch.testing.assert_close(ddim.step(s64, ddim.inverse_step(s64, z, e, t), e, t), z, rtol=0, atol=1e-10)
        torch.testing.assert_close(ddim.inverse_step(s64, ddim.step(s64, z, e, t), e, t), z, rtol=0, atol=1e-10)
        # and in float32 to float precision
        z32, e32 = z.float(), e.float()
        torch.testing.assert_close(ddim.step(s, ddim.inverse_step(s, z32, e32, t), e32, t), z32, rtol=0, atol=1e-4)


def test_invert_then_sample_with_constant_eps_returns_z0(scheduler):
    s = Schedule.from_scheduler(scheduler, 50)
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(1, 4, 8, 8, generator=g)
    const = torch.randn(1, 4, 8, 8, generator=g)
    calls = []

    def eps(z, t, emb):
        calls.append((t, z.shape[0]))
        return const.expand(z.shape[0], -1, -1, -1)

    emb = torch.zeros(1, 77, 8)
    pivots = ddim.invert(eps, z0, emb, s)
    assert len(pivots) == 51 and torch.equal(pivots[0], z0)
    # inversion walks the timesteps upwards: 1, 21, ..., 981
    assert [t for t, _ in calls] == list(range(1, 1000, 20))
    assert not torch.allclose(pivots[-1], z0, atol=1e-2)  # z_T really is elsewhere
    back = ddim.sample(eps, pivots[-1], emb, [emb] * 50, 1.0, s)
    torch.testing.assert_close(back, z0, rtol=0, atol=2e-5)


def test_guided_eps_is_classifier_free_guidance():
    def eps(z, t, emb):  # row-wise: depends on the embedding of each row
        return z * emb.mean(dim=(1, 2))[:, None, None, None]

    z = torch.ones(1, 4, 2, 2)
    uncond, cond = torch.full((1, 3, 2), 2.0), torch.full((1, 3, 2), 5.0)
    out = ddim.guided_eps(eps, z, 10, uncond, cond, 7.5)
    torch.testing.assert_close(out, torch.full_like(z, 2.0 + 7.5 * (5.0 - 2.0)))


def test_scheduler_config_is_a_parameter():
    s = make_scheduler(SchedulerConfig(steps_offset=0))
    s.set_timesteps(50)
    assert int(s.timesteps[0]) == 980


@pytest.mark.parametrize("num_steps", [50, 61, 103])
def test_trailing_spacing_gives_exactly_t_timesteps(num_steps):
    """diffusers' "trailing" spacing returns T + 1 timesteps, the last -1, for T that do not divide
    the training steps evenly (61, 103 of 1000); the schedule keeps the T valid ones."""
    scheduler = make_scheduler(SchedulerConfig(timestep_spacing="trailing", steps_offset=0))
    scheduler.set_timesteps(num_steps)
    raw = [int(t) for t in scheduler.timesteps]
    schedule = Schedule.from_scheduler(scheduler, num_steps)
    assert len(schedule.timesteps) == num_steps and min(schedule.timesteps) >= 0
    assert list(schedule.timesteps) == [t for t in raw if t >= 0][:num_steps]
    assert schedule.timesteps[0] == 999 and list(schedule.timesteps) == sorted(schedule.timesteps, reverse=True)

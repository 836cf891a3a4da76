"""The sampler seam: the loops, classifier-free guidance and the inversion methods run over any
schedule with the :class:`nulltext.samplers.Schedule` members. A fake flow-matching Euler schedule
(velocities, sigmas, the model evaluated at the current point when inverting) is plugged in
where DDIM runs, as the next family's sampler will be."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from nulltext import samplers
from nulltext.config import InversionConfig
from nulltext.errors import NonFiniteError
from nulltext.inversion import direct_inversion_corrections, optimize_global_null_text, optimize_null_text
from nulltext.samplers import ddim


@dataclass(frozen=True)
class EulerSchedule:
    """z_{i+1} = z_i + (sigma_{i+1} - sigma_i) v(z_i, sigma_i), times = 1000 sigma; inverted by the
    same step backwards with the velocity at the current point (docs/algorithm.md section 7)."""

    sigmas: tuple[float, ...]  # 1 > ... > 0, T + 1 of them
    name = "flow-matching Euler"

    @property
    def timesteps(self):
        return tuple(1000 * s for s in self.sigmas[:-1])

    @property
    def num_steps(self):
        return len(self.sigmas) - 1

    @property
    def inversion_timesteps(self):
        return tuple(1000 * s for s in reversed(self.sigmas[1:]))

    def step(self, sample, v, t):
        i = self.timesteps.index(t)
        return sample + (self.sigmas[i + 1] - self.sigmas[i]) * v

    def inverse_step(self, sample, v, t):
        i = self.sigmas.index(t / 1000)
        return sample + (self.sigmas[i - 1] - self.sigmas[i]) * v


SCHEDULE = EulerSchedule((1.0, 0.75, 0.5, 0.25, 0.0))


def test_guidance_is_the_one_formula():
    u, c = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(samplers.guidance(u, c, 7.5), u + 7.5 * (c - u))
    assert ddim.guidance is samplers.guidance and ddim.guided_eps is samplers.guided_eps


def test_a_flow_schedule_inverts_and_samples_back_through_the_same_loops():
    """A velocity field constant in z: the Euler inversion then sampling at guidance 1 is exact,
    and the model is evaluated at the schedule's own times (the current sigma when inverting)."""
    seen = []

    def velocity(z, t, emb):
        seen.append(t)
        return torch.full_like(z, 0.5) + 0 * emb.sum()

    z0 = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    emb = torch.zeros(1, 3, 2)
    pivots = samplers.invert(velocity, z0, emb, SCHEDULE)
    assert len(pivots) == 5 and seen == [0.0, 250.0, 500.0, 750.0]
    torch.testing.assert_close(pivots[-1], z0 + 0.5, rtol=0, atol=1e-6)  # z_1 = z_0 + (1 - 0) v
    seen.clear()
    back = samplers.sample(velocity, pivots[-1], emb, [emb] * 4, 1.0, SCHEDULE)
    assert seen == [1000.0, 750.0, 500.0, 250.0]
    torch.testing.assert_close(back, z0, rtol=0, atol=1e-6)


def test_a_non_finite_step_names_the_sampler():
    def broken(z, t, emb):
        return torch.full_like(z, float("nan"))

    with pytest.raises(NonFiniteError, match="the flow-matching Euler inversion produced a NaN"):
        samplers.invert(broken, torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 2), SCHEDULE)


def _linear_model(z, t, emb):
    """A toy model whose prediction depends on the conditioning, so the null text can steer it."""
    return 0.1 * z + emb.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_the_inversion_methods_run_on_any_schedule():
    """Null-text (per step and global) and Direct Inversion take their steps through the schedule:
    on the Euler schedule the optimisation lowers the loss and the corrections replay the pivots."""
    z0 = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    cond, null0 = torch.full((1, 3, 2), 0.3), torch.zeros(1, 3, 2)
    pivots = samplers.invert(_linear_model, z0, cond, SCHEDULE)
    config = InversionConfig(num_steps=4, num_inner_steps=20, early_stop_epsilon=0.0, early_stop_slope=0.0, lr=0.05)
    result = optimize_null_text(_linear_model, pivots, cond, null0, SCHEDULE, config)
    assert result.null_embeddings.shape == (4, 3, 2)
    assert all(after < first for after, first in zip(result.losses_after, result.losses_first))
    replay = samplers.sample(_linear_model, pivots[-1], cond, result.null_embeddings[:, None], 7.5, SCHEDULE)
    plain = samplers.sample(_linear_model, pivots[-1], cond, [null0] * 4, 7.5, SCHEDULE)
    assert (replay - z0).pow(2).mean() < (plain - z0).pow(2).mean()
    glob = optimize_global_null_text(_linear_model, pivots, cond, null0, SCHEDULE,
                                     InversionConfig(num_steps=4, num_inner_steps=3, lr=0.05))
    assert glob.null_embeddings.shape == (1, 3, 2) and len(glob.losses_after) == 4
    corrections = direct_inversion_corrections(_linear_model, pivots, cond, null0, SCHEDULE, 7.5)
    z = pivots[-1]
    for i, t in enumerate(SCHEDULE.timesteps):
        z = samplers.guided_step(_linear_model, SCHEDULE, z, t, null0, cond, 7.5, corrections[i])
        torch.testing.assert_close(z, pivots[3 - i], rtol=0, atol=1e-6)


def test_the_ddim_module_is_reachable_under_its_old_name():
    from nulltext import ddim as old

    assert old.Schedule is ddim.Schedule and old.step is ddim.step and old.invert is samplers.invert

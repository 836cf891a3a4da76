"""The paper's Section-4 ablations over a fake eps, exactly: what each optimises, its objective, its
seeded noise draws, and that the model's weights stay frozen (docs/algorithm.md section 5)."""

from __future__ import annotations

import math

import pytest
import torch

from nulltext import samplers
from nulltext.config import InversionConfig
from nulltext.inversion import optimize_global_null_text, optimize_null_text_batch
from nulltext.inversion.ablations import (
    draw_noise,
    generator,
    noise_seed,
    optimize_null_text_no_pivot,
    optimize_textual_inversion,
    random_trajectory,
)
from nulltext.inversion.optimise import GLOBAL_LR_FACTOR, trajectory_losses
from nulltext.samplers import ddim

T = 5
SCHEDULE = ddim.schedule(ddim.make_scheduler(), T)
W = 7.5


class LinearModel(torch.nn.Module):
    """eps(z, t, emb) = 0.1 (1 + t / 1000) z + mean over tokens of emb @ V, per channel: linear in the
    embedding, with a weight V that the optimisations must leave alone."""

    def __init__(self):
        super().__init__()
        self.v = torch.nn.Parameter(torch.randn(2, 4, generator=torch.Generator().manual_seed(3)))
        self.calls: list[tuple[int, bool]] = []  # (t, the embedding required grad)

    def forward(self, z, t, emb):
        self.calls.append((t, emb.requires_grad))
        return 0.1 * (1 + t / 1000) * z + (emb @ self.v).mean(1)[:, :, None, None]


@pytest.fixture
def model():
    return LinearModel()


Z0 = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
COND = torch.full((1, 3, 2), 0.3)
NULL0 = torch.zeros(1, 3, 2)
CONFIG = InversionConfig(num_steps=T, num_inner_steps=3, lr=0.05, early_stop_epsilon=0.0, early_stop_slope=0.0)


def forward_noise(z0, noise, t):
    """z_t by hand from the scheduler's alphas_cumprod."""
    abar = SCHEDULE.alphas_cumprod[t]
    return abar.sqrt() * z0 + (1 - abar).sqrt() * noise


def test_the_noise_seed_is_distinct_per_seed_and_image():
    assert noise_seed(0, 0) == 0 and noise_seed(5, 0) == 5 and noise_seed(0, 1) == 0x9E3779B9
    assert len({noise_seed(s, i) for s in range(100) for i in range(100)}) == 100 * 100
    assert all(0 <= noise_seed(2 ** 31 - 1, i) < 2 ** 32 for i in range(1000))
    draws = {tuple(draw_noise(Z0, generator(noise_seed(s, i))).flatten()[:4].tolist())
             for s in range(3) for i in range(3)}
    assert len(draws) == 9  # different noises: torch's generator keeps 32 bits of a seed, all of them count
    a = draw_noise(Z0, generator(noise_seed(2, 1)))
    assert torch.equal(a, torch.randn(Z0.shape, generator=torch.Generator().manual_seed(2 + 0x9E3779B9)))


def test_random_trajectory_is_the_schedulers_forward_noising_at_every_timestep():
    from diffusers import DDIMScheduler

    noise = draw_noise(Z0, generator(7))
    traj = random_trajectory(Z0, noise, SCHEDULE)
    reference = DDIMScheduler(**InversionConfig().scheduler.to_dict())
    assert len(traj) == T + 1 and torch.equal(traj[0], Z0)  # the same starting point z0
    for k, t in enumerate(SCHEDULE.inversion_timesteps, start=1):  # z^r_k at the k-th timestep, 981 last
        expected = reference.add_noise(Z0, noise, torch.tensor([t]))
        torch.testing.assert_close(traj[k], expected, rtol=0, atol=1e-7)
        torch.testing.assert_close(traj[k], forward_noise(Z0, noise, t), rtol=0, atol=1e-7)
    assert SCHEDULE.inversion_timesteps[-1] == SCHEDULE.timesteps[0]  # z^r_T is at the first denoising timestep


def test_textual_inversion_optimises_c_on_eq4_with_seeded_draws(model):
    before = model.v.detach().clone()
    result = optimize_textual_inversion(model, Z0, COND, SCHEDULE, CONFIG, seed=11)
    assert torch.equal(model.v.detach(), before)  # the model's weights are not stepped
    assert all(grad for _, grad in model.calls)  # every call is on the optimised C, no guidance
    assert len(model.calls) == T * CONFIG.num_inner_steps  # null-text inversion's budget
    # by hand: the same draws (timestep index, then noise), the conditional prediction's MSE, Adam at lr
    gen = torch.Generator().manual_seed(11)
    c = COND.clone().requires_grad_(True)
    opt = torch.optim.Adam([c], lr=CONFIG.lr)
    counts, drawn = [0] * T, []
    for _ in range(T * CONFIG.num_inner_steps):
        i = int(torch.randint(T, (1,), generator=gen))
        t = SCHEDULE.timesteps[i]
        noise = torch.randn(Z0.shape, generator=gen)
        loss = (model(forward_noise(Z0, noise, t), t, c) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        counts[i] += 1
        drawn.append(t)
    torch.testing.assert_close(result.null_embeddings, c.detach(), rtol=0, atol=1e-6)
    assert result.null_embeddings.shape == COND.shape and not torch.equal(result.null_embeddings, COND)
    assert result.iterations == counts and [t for t, _ in model.calls[:len(drawn)]] == drawn
    assert result.lrs == [CONFIG.lr] * T and all(math.isnan(v) for v in result.losses_after)
    again = optimize_textual_inversion(model, Z0, COND, SCHEDULE, CONFIG, seed=11)
    assert torch.equal(again.null_embeddings, result.null_embeddings)  # reproducible
    other = optimize_textual_inversion(model, Z0, COND, SCHEDULE, CONFIG, seed=12)
    assert not torch.equal(other.null_embeddings, result.null_embeddings)


def test_null_text_without_pivot_optimises_n_t_on_the_guided_eq4(model):
    before = model.v.detach().clone()
    result = optimize_null_text_no_pivot(model, Z0, COND, NULL0, SCHEDULE, CONFIG, seed=5)
    assert torch.equal(model.v.detach(), before)
    assert result.null_embeddings.shape == (T, 3, 2)
    # by hand: per timestep N_t from the previous one, a fresh noise per iteration, the guided
    # prediction's MSE to it, Adam at the release's decaying rate
    gen = torch.Generator().manual_seed(5)
    null, expected = NULL0.clone(), []
    for i, t in enumerate(SCHEDULE.timesteps):
        null = null.detach().clone().requires_grad_(True)
        lr = CONFIG.lr * (1 - i / max(CONFIG.lr_decay_steps, T))
        opt = torch.optim.Adam([null], lr=lr)
        for _ in range(CONFIG.num_inner_steps):
            noise = torch.randn(Z0.shape, generator=gen)
            z_t = forward_noise(Z0, noise, t)
            e_c = model(z_t, t, COND).detach()
            e_u = model(z_t, t, null)
            loss = (e_u + W * (e_c - e_u) - noise).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        expected.append(null.detach()[0])
        assert result.lrs[i] == pytest.approx(lr)
    torch.testing.assert_close(result.null_embeddings, torch.stack(expected), rtol=0, atol=1e-6)
    assert result.iterations == [CONFIG.num_inner_steps] * T
    again = optimize_null_text_no_pivot(model, Z0, COND, NULL0, SCHEDULE, CONFIG, seed=5)
    assert torch.equal(again.null_embeddings, result.null_embeddings)


def test_textual_inversion_with_a_pivot_optimises_c_t_against_the_pivot(model):
    with torch.no_grad():
        pivots = samplers.invert(model, Z0, COND, SCHEDULE)
    model.calls.clear()
    before = model.v.detach().clone()
    result = optimize_null_text_batch(model, pivots, COND, NULL0, SCHEDULE, CONFIG, optimise="cond")[0]
    assert torch.equal(model.v.detach(), before)
    calls = list(model.calls)
    # by hand: Algorithm 1 with C_t in N_t's place, the null text fixed at N0
    z_bar, c, expected = pivots[-1], COND, []
    for i, t in enumerate(SCHEDULE.timesteps):
        c = c.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([c], lr=CONFIG.lr * (1 - i / max(CONFIG.lr_decay_steps, T)))
        e_u = model(z_bar, t, NULL0).detach()
        for _ in range(CONFIG.num_inner_steps):
            z_prev = SCHEDULE.step(z_bar, e_u + W * (model(z_bar, t, c) - e_u), t)
            loss = (z_prev - pivots[T - i - 1]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        expected.append(c.detach()[0])
        with torch.no_grad():
            z_bar = SCHEDULE.step(z_bar, e_u + W * (model(z_bar, t, c) - e_u), t)
    torch.testing.assert_close(result.null_embeddings, torch.stack(expected), rtol=0, atol=1e-6)
    assert not torch.equal(result.null_embeddings[0], COND[0])
    # every call with a gradient is on the conditional embedding, never on the null text
    assert sum(grad for _, grad in calls) == T * CONFIG.num_inner_steps
    null_text = optimize_null_text_batch(model, pivots, COND, NULL0, SCHEDULE, CONFIG)[0]
    assert not torch.allclose(null_text.null_embeddings, result.null_embeddings)


def test_global_nti_keeps_the_best_embedding_and_never_ends_below_its_start(model):
    with torch.no_grad():
        pivots = samplers.invert(model, Z0, COND, SCHEDULE)
    start = trajectory_losses(model, pivots, COND, NULL0, SCHEDULE, W)[-1]
    errors = []
    for sweeps in range(6):
        config = InversionConfig(num_steps=T, num_inner_steps=sweeps, lr=0.05)
        result = optimize_global_null_text(model, pivots, COND, NULL0, SCHEDULE, config)
        assert result.lrs == [0.05 * GLOBAL_LR_FACTOR] * T
        final = trajectory_losses(model, pivots, COND, result.null_embeddings, SCHEDULE, W)
        assert final == result.losses_after  # what is recorded is the kept embedding's trajectory
        errors.append(final[-1])
    assert errors[0] == start and all(b <= a for a, b in zip(errors, errors[1:])) and errors[-1] < start
    # a rate that only makes things worse: the start N0 (the DDIM inversion's own null text) is kept
    wild = optimize_global_null_text(model, pivots, COND, NULL0, SCHEDULE,
                                     InversionConfig(num_steps=T, num_inner_steps=3, lr=1e4))
    assert wild.best_sweep == 0 and torch.equal(wild.null_embeddings, NULL0)

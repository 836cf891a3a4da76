"""The null-text optimisation rule, on a fake eps (docs/algorithm.md section 2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nulltext import ddim
from nulltext.config import InversionConfig
from nulltext.ddim import Schedule, make_scheduler
from nulltext.errors import NulltextError
from nulltext.inversion import optimize_null_text

L, D = 6, 5  # fake text embedding: 6 tokens x 5 dims


class FakeEps:
    """eps = 0.05 z + <emb, W> + 0.01 t/1000: linear in the embedding, so Adam's first update is
    exactly lr * sign(grad) per element, and gradients exist only through the embedding."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(L, D, 4, generator=g)  # each channel reads the embedding differently
        self.calls = 0

    def __call__(self, z, t, emb):
        self.calls += 1
        text = torch.einsum("bld,ldc->bc", emb, self.W)[:, :, None, None]  # (B, 4, 1, 1)
        return 0.05 * z + text + 0.01 * t / 1000


def _setup(T=8, seed=0):
    schedule = Schedule.from_scheduler(make_scheduler(), T)
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(1, 4, 4, 4, generator=g)
    cond = torch.randn(1, L, D, generator=g)
    null0 = torch.randn(1, L, D, generator=g) * 0.1
    eps = FakeEps(seed)
    pivots = ddim.invert(eps, z0, cond, schedule)
    return schedule, eps, pivots, cond, null0


def test_lr_schedule_and_reinitialisation_from_previous_timestep():
    """One Adam iteration per timestep moves every element by exactly lr_i = lr (1 - i/100) from
    the previous timestep's embedding (Adam's first step is lr * g / (|g| + 1e-8))."""
    schedule, eps, pivots, cond, null0 = _setup()
    cfg = InversionConfig(num_steps=8, num_inner_steps=1, early_stop_epsilon=0.0, early_stop_slope=0.0, lr=0.03)
    res = optimize_null_text(eps, pivots, cond, null0, schedule, cfg)
    prev = null0[0]
    for i in range(8):
        lr_i = 0.03 * (1 - i / 100)
        assert res.lrs[i] == pytest.approx(lr_i, rel=1e-12)
        step = (res.null_embeddings[i] - prev).abs()
        torch.testing.assert_close(step, torch.full_like(step, lr_i), rtol=2e-3, atol=0)
        prev = res.null_embeddings[i]
    assert res.iterations == [1] * 8


def test_early_stop_threshold_grows_with_the_timestep_index():
    """threshold_i = epsilon + i * slope: with epsilon 0 and a huge slope, timestep 0 can never
    stop early (loss > 0) and every later timestep stops after its first iteration."""
    schedule, eps, pivots, cond, null0 = _setup()
    cfg = InversionConfig(num_steps=8, num_inner_steps=5, early_stop_epsilon=0.0, early_stop_slope=1e12)
    res = optimize_null_text(eps, pivots, cond, null0, schedule, cfg)
    assert res.iterations == [5, 1, 1, 1, 1, 1, 1, 1]


def test_early_stop_rule_and_iteration_counts():
    schedule, eps, pivots, cond, null0 = _setup()
    # a dry run to pick an epsilon that some timesteps reach and some do not
    record = {}
    cfg0 = InversionConfig(num_steps=8, num_inner_steps=10, early_stop_epsilon=0.0, early_stop_slope=0.0)
    optimize_null_text(eps, pivots, cond, null0, schedule, cfg0,
                       callback=lambda i, j, loss, lr: record.setdefault(i, []).append(loss))
    epsilon = sorted(r[4] for r in record.values())[4]

    losses: dict[int, list[float]] = {}
    cfg = InversionConfig(num_steps=8, num_inner_steps=10, early_stop_epsilon=epsilon, early_stop_slope=1e-6)
    res = optimize_null_text(eps, pivots, cond, null0, schedule, cfg,
                             callback=lambda i, j, loss, lr: losses.setdefault(i, []).append(loss))
    for i in range(8):
        threshold = epsilon + i * 1e-6
        below = [j for j, loss in enumerate(losses[i]) if loss < threshold]
        expected = below[0] + 1 if below else 10
        assert res.iterations[i] == expected == len(losses[i])
        assert res.losses_first[i] == losses[i][0] and res.losses_last[i] == losses[i][-1]
    assert any(n < 10 for n in res.iterations) and any(n == 10 for n in res.iterations)


def test_the_step_that_reaches_the_threshold_is_applied():
    """Replay timestep 0 with a plain Adam loop: the stored N equals the embedding after exactly
    `iterations[0]` Adam steps, including the one whose loss was under the threshold."""
    schedule, eps, pivots, cond, null0 = _setup(T=4)
    w = 7.5
    t = schedule.timesteps[0]
    target = pivots[-2]
    eps_cond = eps(pivots[-1], t, cond)
    n = null0.clone().requires_grad_(True)
    opt = torch.optim.Adam([n], lr=0.01)
    states, losses = [], []
    for _ in range(10):
        e_u = eps(pivots[-1], t, n)
        loss = F.mse_loss(ddim.step(schedule, pivots[-1], e_u + w * (eps_cond - e_u), t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        states.append(n.detach().clone())
    epsilon = (losses[2] + losses[3]) / 2  # loss 3 (the 4th) is the first below it
    assert losses[3] < epsilon <= losses[2]
    cfg = InversionConfig(num_steps=4, early_stop_epsilon=epsilon)
    res = optimize_null_text(eps, pivots, cond, null0, schedule, cfg)
    assert res.iterations[0] == 4
    torch.testing.assert_close(res.null_embeddings[0], states[3][0], rtol=0, atol=0)


def test_guided_step_uses_the_stored_embedding_and_pivot_targets():
    """Replaying zbar with the stored N_t reproduces the recorded losses against z*_{T-i-1}."""
    schedule, eps, pivots, cond, null0 = _setup()
    cfg = InversionConfig(num_steps=8, num_inner_steps=3)
    res = optimize_null_text(eps, pivots, cond, null0, schedule, cfg)
    z = pivots[-1]
    for i, t in enumerate(schedule.timesteps):
        z = ddim.step(schedule, z, ddim.guided_eps(eps, z, t, res.null_embeddings[i][None], cond, 7.5), t)
        assert F.mse_loss(z, pivots[8 - i - 1]).item() == pytest.approx(res.losses_after[i], rel=1e-5, abs=1e-12)
    # and the optimisation helped: each step's loss after is below the loss before optimising
    assert all(after <= first for after, first in zip(res.losses_after, res.losses_first))


def test_zero_inner_steps_keeps_n0_and_costs_no_backward():
    schedule, eps, pivots, cond, null0 = _setup()
    eps.calls = 0
    res = optimize_null_text(eps, pivots, cond, null0, schedule,
                             InversionConfig(num_steps=8, num_inner_steps=0))
    assert torch.equal(res.null_embeddings, null0.expand(8, -1, -1))
    assert res.iterations == [0] * 8 and all(math.isnan(x) for x in res.losses_first)
    assert eps.calls == 2 * 8  # conditional once + final unconditional, per timestep


def test_forward_count_per_timestep():
    """T conditional forwards, one per iteration (with backward), T final unconditional ones."""
    schedule, eps, pivots, cond, null0 = _setup()
    eps.calls = 0
    res = optimize_null_text(eps, pivots, cond, null0, schedule, InversionConfig(num_steps=8))
    assert eps.calls == 8 + sum(res.iterations) + 8


@pytest.mark.parametrize("kwargs", [dict(num_steps=0), dict(num_steps=-1), dict(guidance_scale=0),
                                    dict(guidance_scale=-2.0), dict(num_inner_steps=-1), dict(lr=0),
                                    dict(crop=(1, 2, 3)), dict(method="magic"), dict(num_steps=1001)])
def test_invalid_configs_are_refused(kwargs):
    with pytest.raises(NulltextError):
        InversionConfig(**kwargs)


def test_defaults_are_the_release_values():
    c = InversionConfig()
    assert (c.num_steps, c.guidance_scale, c.num_inner_steps) == (50, 7.5, 10)
    assert (c.early_stop_epsilon, c.early_stop_slope, c.lr, c.lr_decay_steps) == (1e-5, 2e-5, 1e-2, 100.0)
    assert c.crop == (0, 0, 0, 0) and c.method == "nti"


def test_more_than_100_steps_keeps_the_learning_rate_positive():
    """The release's lr (1 - i/100) turns negative past 100 steps (Adam then refuses it, after the
    DDIM inversion's work); the denominator is max(100, T): the release's rule up to 100 steps,
    decaying to lr / T at the last step above."""
    T = 120
    schedule, eps, pivots, cond, null0 = _setup(T=T)
    cfg = InversionConfig(num_steps=T, num_inner_steps=1, early_stop_epsilon=0.0, early_stop_slope=0.0, lr=0.02)
    res = optimize_null_text(eps, pivots, cond, null0, schedule, cfg)
    assert len(res.lrs) == T and min(res.lrs) > 0
    for i in (0, 50, 119):
        assert res.lrs[i] == pytest.approx(0.02 * (1 - i / T), rel=1e-12)
    schedule, eps, pivots, cond, null0 = _setup(T=100)
    cfg = InversionConfig(num_steps=100, num_inner_steps=1, early_stop_epsilon=0.0, early_stop_slope=0.0, lr=0.02)
    lrs = optimize_null_text(eps, pivots, cond, null0, schedule, cfg).lrs
    assert lrs == [pytest.approx(0.02 * (1 - i / 100), rel=1e-12) for i in range(100)]


def test_invert_progressive_yields_each_batch_before_computing_the_next(tiny_pipe, monkeypatch):
    import nulltext.inversion.pipeline as pipeline
    from conftest import make_photo
    from nulltext.inversion import invert_many, invert_progressive

    started = []
    real = pipeline._invert_batch

    def recording(pipe, batch, *args):
        started.append([item.index for item in batch])
        return real(pipe, batch, *args)

    monkeypatch.setattr(pipeline, "_invert_batch", recording)
    photos = [make_photo(seed=s) for s in range(3)]
    config = InversionConfig(num_steps=2, num_inner_steps=1, size=64)
    results = invert_progressive(tiny_pipe, photos, "a photo", config, batch_size=2, progress=False)
    assert started == []  # nothing computed before the first result is asked for
    index, first = next(results)
    assert index == 0 and started == [[0, 1]]  # the first batch only
    assert next(results)[0] == 1 and started == [[0, 1]]  # the rest of that batch without new work
    index, last = next(results)
    assert index == 2 and started == [[0, 1], [2]] and last.run.batch_size == 1
    with pytest.raises(StopIteration):
        next(results)
    torch.testing.assert_close(first.null_embeddings,
                               invert_many(tiny_pipe, photos[:1], "a photo", config, progress=False)[0].null_embeddings,
                               rtol=0, atol=1e-4)


def test_invert_progressive_checks_its_arguments_at_the_call(tiny_pipe):
    from nulltext.inversion import invert_progressive

    with pytest.raises(NulltextError, match="no images to invert"):
        invert_progressive(tiny_pipe, [], "a photo")
    with pytest.raises(NulltextError, match="batch size must be a positive integer"):
        invert_progressive(tiny_pipe, ["x.png"], "a photo", batch_size=0)

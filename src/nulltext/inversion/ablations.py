"""The paper's ablations that draw random noise (Mokady et al. 2023, Section 4 and Appendix D;
docs/algorithm.md section 5), over an ``eps`` callable, as :mod:`.optimise`:

- the random pivot: one seeded Gaussian noise per image, z0 noised with it at every timestep of
  the schedule (the forward process), the trajectory null-text optimisation then fits;
- textual inversion (after Gal et al.): the conditional embedding C optimised on the noise
  prediction objective (the paper's Eq. 4) at random timesteps and noises;
- null-text optimisation without a pivot: the per-step null embeddings optimised on Eq. 4 with the
  guided prediction.

Every draw comes from a CPU generator seeded with :func:`noise_seed`, so a run is reproducible on
any device and a test can draw the same numbers."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import samplers
from ..config import InversionConfig
from ..samplers import EpsFn, Schedule
from .optimise import NullTextResult

# the odd 32-bit constant that spreads the images of a run over the generator's seeds
_SPREAD = 0x9E3779B9


def noise_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a run with ``InversionConfig.seed`` = ``seed``:
    ``(seed + index * 0x9E3779B9) mod 2^32`` (torch's CPU generator keeps 32 bits of a seed). The
    first image draws with ``seed`` itself; the images of one run have distinct seeds (the constant
    is odd). Inversion files record it."""
    return (seed + index * _SPREAD) % 2 ** 32


def generator(seed: int) -> torch.Generator:
    """The CPU generator the random methods draw from."""
    return torch.Generator().manual_seed(seed)


def draw_noise(like: Tensor, gen: torch.Generator) -> Tensor:
    """A standard Gaussian of ``like``'s shape drawn on the CPU from ``gen``, on ``like``'s device."""
    return torch.randn(like.shape, generator=gen).to(like)


def random_trajectory(z0: Tensor, noise: Tensor, schedule: Schedule) -> list[Tensor]:
    """The random pivot [z0, z^r_1, ..., z^r_T]: z0 noised with the one ``noise`` by the forward
    process at each timestep, least noisy first (z^r_k = sqrt(abar) z0 + sqrt(1 - abar) noise at the k-th,
    1, 21, ..., 981 for T = 50), in the layout of the DDIM pivots, so that null-text optimisation
    starts at z^r_T and targets z^r_(T-1) ... z^r_1, z0."""
    return [z0, *(schedule.add_noise(z0, noise, t) for t in reversed(schedule.timesteps))]


def _result(T: int, embedding: Tensor, iterations, first, last, lrs) -> NullTextResult:
    # the noise objective has no guided step to score: losses_after is NaN (no divergence check)
    return NullTextResult(null_embeddings=embedding, iterations=iterations, losses_first=first, losses_last=last,
                          losses_after=[math.nan] * T, lrs=lrs)


def optimize_textual_inversion(eps_fn: EpsFn, z0: Tensor, cond: Tensor, schedule: Schedule,
                               config: InversionConfig, seed: int, progress: bool = False) -> NullTextResult:
    """Textual inversion of one image (the paper's ablation after Gal et al., Eq. 4): C, starting
    at ``cond`` (psi(P)), minimises ``mean((noise - eps(z_t, t, C))^2)`` with
    ``z_t = schedule.add_noise(z0, noise, t)``; the conditional prediction alone, no guidance.
    (On a flow model the target is the velocity ``noise - z0``: ``schedule.training_target``.)

    ``T x num_inner_steps`` Adam iterations (null-text inversion's budget) at the constant rate
    ``config.lr``; each draws, from ``generator(seed)``, first the timestep index
    (``torch.randint(T, (1,))``: a timestep of the schedule, the only ones the reconstruction
    evaluates C at), then the noise (:func:`draw_noise`). Per timestep the result records the
    iterations that drew it and their first and last losses; its embedding is C, (1, L, d)."""
    T = schedule.num_steps
    gen = generator(seed)
    c = cond.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([c], lr=config.lr)
    iterations, first, last = [0] * T, [math.nan] * T, [math.nan] * T
    for _ in tqdm(range(T * config.num_inner_steps), desc="textual inversion", unit="it", disable=not progress,
                  leave=False):
        i = int(torch.randint(T, (1,), generator=gen))
        t = schedule.timesteps[i]
        noise = draw_noise(z0, gen)
        z_t = schedule.add_noise(z0, noise, t)
        loss = (eps_fn(z_t, t, c) - schedule.training_target(z0, noise)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        samplers.check_finite(c.grad, "the textual inversion's gradient", t, i, T)
        optimizer.step()
        value = loss.item()
        iterations[i] += 1
        first[i] = value if iterations[i] == 1 else first[i]
        last[i] = value
    return _result(T, c.detach(), iterations, first, last, [config.lr] * T)


def optimize_null_text_no_pivot(eps_fn: EpsFn, z0: Tensor, cond: Tensor, null0: Tensor, schedule: Schedule,
                                config: InversionConfig, seed: int, progress: bool = False) -> NullTextResult:
    """Null-text optimisation without a pivot (the paper's ablation): per timestep, as null-text
    inversion, N_t starts from the previous step's and takes ``num_inner_steps`` Adam steps at
    ``lr * (1 - i / max(D_lr, T))``, but on Eq. 4 with the guided prediction,
    ``mean((noise - eps_w(z_t, t, C, N_t))^2)``, ``z_t = schedule.add_noise(z0, noise, t)`` with a
    fresh noise (:func:`draw_noise` from ``generator(seed)``) at every iteration. No early stop
    (the threshold is on the pivot's latent error, which this objective does not compute).
    Embeddings: (T, L, d)."""
    T, w = schedule.num_steps, config.guidance_scale
    gen = generator(seed)
    null = null0.detach()
    stored, iterations, first, last, lrs = [], [], [], [], []
    bar = tqdm(total=T * config.num_inner_steps, desc="null-text without pivot", unit="it", disable=not progress,
               leave=False)
    for i, t in enumerate(schedule.timesteps):
        null = null.detach().clone().requires_grad_(True)
        lr = config.lr * (1.0 - i / max(config.lr_decay_steps, T))
        optimizer = torch.optim.Adam([null], lr=lr)
        values = []
        for _ in range(config.num_inner_steps):
            noise = draw_noise(z0, gen)
            z_t = schedule.add_noise(z0, noise, t)
            with torch.no_grad():
                eps_cond = eps_fn(z_t, t, cond)
            target = schedule.training_target(z0, noise)
            loss = (samplers.guidance(eps_fn(z_t, t, null), eps_cond, w) - target).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            samplers.check_finite(null.grad, "the null-text (no pivot) gradient", t, i, T)
            optimizer.step()
            values.append(loss.item())
            bar.update()
        stored.append(null.detach()[0].clone())
        iterations.append(len(values))
        first.append(values[0] if values else math.nan)
        last.append(values[-1] if values else math.nan)
        lrs.append(lr)
    bar.close()
    return _result(T, torch.stack(stored), iterations, first, last, lrs)

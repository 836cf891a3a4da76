"""Inversions that reconstruct exactly without optimisation (docs/algorithm.md sections 8 to 10):
edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024), EDICT (Wallace et al.,
CVPR 2023), and ProxEdit's proximal guidance (Han et al. 2023) for negative-prompt inversion.

Everything here runs over a model callable ``eps_fn(z, t, emb)`` (the sampler's quantity: DDIM's
noise eps, flow matching's velocity) and a schedule that states its steps (DDIM's,
:class:`nulltext.samplers.ddim.Schedule`, or SD3's flow matching, :class:`nulltext.samplers.flow.Schedule`:
``stochastic_step`` and ``noise_scale`` for ddpm, ``affine_step`` for edict): no model code."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .. import samplers
from ..config import PROX_KINDS
from ..errors import NulltextError

# EDICT's mixing weight p (the authors' mix_weight default)
EDICT_MIX = 0.93


# --- edit-friendly DDPM inversion ---------------------------------------------------------------

def ddpm_noisy_latents(z0: Tensor, schedule, generators: Sequence[torch.Generator]) -> list[Tensor]:
    """x_1, ..., x_T (least noisy first): z0 noised to each sampling timestep, x_i at
    ``timesteps[T - i]`` (x_T at the first), with its own fresh Gaussian noise (the schedule's
    ``add_noise``: DDIM's ``sqrt(abar_t) z0 + sqrt(1 - abar_t) eps_t``, flow matching's
    ``(1 - sigma) z0 + sigma eps_t``). Image b draws from ``generators[b]``, one (1, C, h, w) draw
    per timestep, least noisy first (the authors' and LEDITS++'s order)."""
    out = []
    for t in reversed(schedule.timesteps):
        noise = torch.cat([torch.randn(z0[:1].shape, generator=g) for g in generators]).to(z0)
        out.append(schedule.add_noise(z0, noise, t))
    return out


@torch.no_grad()
def ddpm_noise_maps(eps_fn, z0: Tensor, cond: Tensor, uncond: Tensor, schedule, guidance_scale: float,
                    generators: Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Edit-friendly DDPM inversion: ``(x_T, z)`` with z the (T, B, C, h, w) noise maps, index i
    for the i-th denoising step (t_1 = 981 first for T = 50).

    Going down from x_T: the guided prediction at the source prompt (``guidance_scale``, the
    authors' cfg_src) at the current x_t, mu_t the DDPM mean, ``z_t = (x_{t-1} - mu_t) / sigma_t``,
    and x_{t-1} replaced by ``mu_t + sigma_t z_t`` (the schedule's ``stochastic_step``, which
    reconstruction runs): the replayed trajectory lands on z0 to float rounding. sigma_t is the
    schedule's ``noise_scale``: the posterior's standard deviation, and on flow matching 1 at the
    last step, which lands on sigma = 0 with no variance (its map is the residual ``z0 - mu``)."""
    xs = [z0, *ddpm_noisy_latents(z0, schedule, generators)]  # x_0 .. x_T
    T = schedule.num_steps
    maps = []
    x = xs[T]
    for i, t in enumerate(schedule.timesteps):
        eps = samplers.guided_eps(eps_fn, x, t, uncond, cond, guidance_scale)
        mu = schedule.stochastic_step(x, eps, t, torch.zeros_like(x))
        sigma = schedule.noise_scale(t).to(x)
        z = (xs[T - 1 - i] - mu) / sigma
        maps.append(z)
        x = schedule.stochastic_step(x, eps, t, z)  # the corrected x_{t-1}, as reconstruction computes it
        samplers.check_finite(x, "the DDPM inversion", t, i, T)
    return xs[T], torch.stack(maps)


# --- EDICT --------------------------------------------------------------------------------------

def edict_forward(x: Tensor, eps: Tensor, coef) -> Tensor:
    """The step written as an affine map of the latent, ``x / a - b / a eps + c eps`` (the authors'
    DDIM step; with ``(1, 0, dt)`` the Euler step ``x + dt v``)."""
    a, b, c = coef
    return x / a - (b / a) * eps + c * eps


def edict_reverse(x: Tensor, eps: Tensor, coef) -> Tensor:
    """Its exact inverse: ``a x + b eps - a c eps`` (the Euler step's: ``x - dt v``)."""
    a, b, c = coef
    return a * x + b * eps - a * c * eps


def edict_order(i: int) -> tuple[int, int]:
    """Which latent of the pair the i-th denoising step updates first (leapfrog: alternating)."""
    return (0, 1) if i % 2 == 0 else (1, 0)


def edict_mix(x: list[Tensor], mix: float = EDICT_MIX) -> None:
    """The mixing layer, in place on the pair [x, y]: ``x' = p x + (1 - p) y``, ``y' = (1 - p) x' + p y``."""
    x[0] = mix * x[0] + (1 - mix) * x[1]
    x[1] = (1 - mix) * x[0] + mix * x[1]


def guided64(eps_fn, z: Tensor, t, uncond: Tensor, cond: Tensor, w: float) -> Tensor:
    """The guided prediction at a float64 latent (the model runs in float32), as float64."""
    return samplers.guided_eps(eps_fn, z.float(), t, uncond, cond, w).double()


@torch.no_grad()
def edict_sample_progressive(eps_fn, pair: Tensor, cond, uncond, guidance_scale: float, schedule,
                             mix: float = EDICT_MIX) -> Iterator[Tensor]:
    """EDICT's coupled sampling from the pair (x_T, y_T), ``pair`` (2, B, C, h, w) float64; yields
    the pair after each step. cond and uncond: (B, L, d) or one per step, (T, B, L, d). Each step
    updates one latent with the guided prediction at the other (alternating which goes first),
    then mixes: ``x' = p x + (1 - p) y``, ``y' = (1 - p) x' + p y``."""
    x = [pair[0].double(), pair[1].double()]
    for i, t in enumerate(schedule.timesteps):
        coef = schedule.affine_step(t)  # the step as an affine map of the latent, float64
        c = cond[i] if cond.ndim == 4 else cond
        u = uncond[i] if uncond.ndim == 4 else uncond
        for k in edict_order(i):
            x[k] = edict_forward(x[k], guided64(eps_fn, x[1 - k], t, u, c, guidance_scale), coef)
        edict_mix(x, mix)
        samplers.check_finite(x[0], "EDICT sampling", t, i, schedule.num_steps)
        yield torch.stack(x)


@torch.no_grad()
def edict_invert(eps_fn, z0: Tensor, cond: Tensor, uncond: Tensor, guidance_scale: float, schedule,
                 mix: float = EDICT_MIX) -> Tensor:
    """EDICT inversion: the pair (x_T, y_T), (2, B, C, h, w) float64, from x_0 = y_0 = z0, each
    step of :func:`edict_sample_progressive` undone in reverse order (unmix, then the two updates
    inverted, the later first); sampling it returns z0 to float64 rounding."""
    x = [z0.double().clone(), z0.double().clone()]
    T = schedule.num_steps
    for i in reversed(range(T)):
        t = schedule.timesteps[i]
        coef = schedule.affine_step(t)  # the step as an affine map of the latent, float64
        x[1] = (x[1] - (1 - mix) * x[0]) / mix
        x[0] = (x[0] - (1 - mix) * x[1]) / mix
        for k in reversed(edict_order(i)):
            x[k] = edict_reverse(x[k], guided64(eps_fn, x[1 - k], t, uncond, cond, guidance_scale), coef)
        samplers.check_finite(x[0], "the EDICT inversion", t, T - 1 - i, T)
    return torch.stack(x)


# --- ProxEdit's proximal guidance ---------------------------------------------------------------

def proximal_delta(delta: Tensor, prox: str, quantile: float) -> Tensor:
    """The guidance difference ``eps_cond - eps_uncond`` thresholded as ProxEdit's code does, the
    threshold ``lam`` the ``quantile`` of ``|delta|`` over the tensor given (a non-positive
    ``quantile`` is the fixed threshold ``-quantile``). "l0": ``delta - clamp(delta, -lam, lam)``
    (zero where ``|delta| <= lam``, shrunk by lam elsewhere); "l1": that, then lam subtracted
    again from the positive entries and lam added to the negative ones afterwards (sequentially,
    as the authors' code has it: see docs/algorithm.md section 10)."""
    if prox not in PROX_KINDS:
        raise NulltextError(f"unknown proximal kind {prox!r}; choose one of {', '.join(PROX_KINDS)}")
    mag = delta.abs()
    lam = torch.quantile(mag.float().flatten(), quantile).to(delta) if quantile > 0 else delta.new_tensor(-quantile)
    out = delta - delta.clamp(-lam, lam)
    if prox == "l1":
        out = torch.where(out > 0, out - lam, out)
        out = torch.where(out < 0, out + lam, out)
    return out


def proximal_guidance(prox: str, quantile: float):
    """A guidance rule for :func:`nulltext.samplers.guided_eps`: ``uncond + w * prox(cond - uncond)``,
    the threshold computed per row (per target prompt)."""
    def guide(uncond: Tensor, cond: Tensor, w: float) -> Tensor:
        delta = cond - uncond
        rows = [proximal_delta(delta[b:b + 1], prox, quantile) for b in range(delta.shape[0])]
        return uncond + w * torch.cat(rows)
    return guide

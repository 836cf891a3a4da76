"""Samplers: how a latent moves between noise levels, given the model's prediction.

A sampler is a module (``samplers/ddim.py`` today; a flow-matching Euler sampler over sigmas,
``samplers/flow.py``, is the next) that a model family names as its ``sampler``. It implements:

- ``NAME``: how messages name it ("DDIM");
- ``make_scheduler(config)``: the diffusers scheduler configured from the family's scheduler
  config (its noise levels);
- ``schedule(scheduler, num_steps)``: a :class:`Schedule` of ``num_steps`` steps;
- ``model_quantity(scheduler, out, z, t)``: the denoiser's raw output at ``(z, t)`` as the quantity
  its steps take (DDIM: the noise eps, converting v- and x0-predictions exactly; flow matching:
  the velocity, as the transformer predicts it).

The loops below (inversion, guided sampling, classifier-free guidance) run over a model callable
and a :class:`Schedule` only, so the inversion methods, the edit loop and the controllers work
with any sampler unchanged, and a test can pass a fake callable or a fake schedule (k-diffusion's
``sample(model, x, sigmas)`` shape).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from ..errors import NonFiniteError

# model(z, t, emb) -> the sampler's quantity (DDIM: the noise eps). z: (B, C, h, w) float32, t: a
# timestep of the schedule, emb: (B, L, d) conditioning. Loops never look inside it.
ModelFn = Callable[[Tensor, int, Tensor], Tensor]
EpsFn = ModelFn  # the name the DDIM code and its callers grew up with


class Schedule(Protocol):
    """The steps of one run of a sampler: ``num_steps`` model evaluations and the step rule."""

    name: str  # the sampler's name, for messages ("DDIM")

    @property
    def timesteps(self) -> Sequence:
        """The times the model is evaluated at while sampling, noisiest first."""

    @property
    def num_steps(self) -> int: ...

    @property
    def inversion_timesteps(self) -> Sequence:
        """The times the model is evaluated at while inverting, least noisy first (DDIM: the
        target timestep of each inverse step; flow matching: the current sigma of each)."""

    def step(self, sample: Tensor, out: Tensor, t) -> Tensor:
        """One denoising step from ``t`` to the next entry of ``timesteps`` (or past the last)."""

    def inverse_step(self, sample: Tensor, out: Tensor, t) -> Tensor:
        """One inversion step with the model's output at ``t``, an entry of ``inversion_timesteps``."""

    def add_noise(self, sample: Tensor, noise: Tensor, t) -> Tensor:
        """The forward process: a clean ``sample`` (z0) noised to ``t``, a timestep of the schedule,
        with ``noise`` (DDIM: ``sqrt(abar(t)) z0 + sqrt(1 - abar(t)) noise``)."""

    def training_target(self, sample: Tensor, noise: Tensor) -> Tensor:
        """What the model's quantity is trained to predict at ``add_noise(sample, noise, t)``
        (DDIM: the noise; flow matching: the velocity ``noise - sample``): the objective of the
        ablations that fit embeddings to the denoising loss."""

    # The exact inversions (nulltext.inversion.exact) use three more; a schedule without them
    # serves every other method.

    def stochastic_step(self, sample: Tensor, out: Tensor, t, noise: Tensor) -> Tensor:
        """The DDPM posterior step from ``t`` with the given ``noise``, ``mu + noise_scale(t) * noise``
        (edit-friendly DDPM inversion)."""

    def noise_scale(self, t) -> Tensor:
        """What :meth:`stochastic_step` multiplies its noise by."""

    def affine_step(self, t) -> tuple[Tensor, Tensor, Tensor]:
        """The float64 ``(a, b, c)`` of the step from ``t`` as the affine map
        ``x / a - (b / a) out + c out`` of the latent (EDICT)."""


def check_finite(x: Tensor, what: str, t, i: int, T: int) -> None:
    """Raise :class:`NonFiniteError` naming the step where a NaN or infinity first appears
    (in half precision: an overflow in the model), instead of carrying it on into a black image."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} produced a NaN or infinity at timestep {t} (step {i + 1} of {T}); in fp16 "
                             f"this is an overflow in the model: use dtype bf16 or fp32 (--dtype on the command line)")


def guidance(uncond: Tensor, cond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance: ``uncond + w * (cond - uncond)``, the one place it is written.
    Affine in the predictions, so it is the same on eps, v or a velocity."""
    return uncond + w * (cond - uncond)


# guide(uncond, cond, w) -> the guided prediction: :func:`guidance`, or another rule of the same
# shape (ProxEdit's proximal guidance, nulltext.inversion.exact.proximal_guidance)
GuideFn = Callable[[Tensor, Tensor, float], Tensor]


def guided_eps(model: ModelFn, z: Tensor, t, uncond: Tensor, cond: Tensor, guidance_scale: float,
               guide: GuideFn | None = None) -> Tensor:
    """Classifier-free guidance with one batched forward: rows [uncond..., cond...].

    z: (B, C, h, w); uncond, cond: (B, L, d). Returns the guided prediction, (B, C, h, w).
    ``guide`` replaces :func:`guidance`'s rule where given.
    """
    out = model(torch.cat([z, z]), t, torch.cat([uncond, cond]))  # (2B, C, h, w)
    out_uncond, out_cond = out.chunk(2)
    return (guide or guidance)(out_uncond, out_cond, guidance_scale)


def guided_step(model: ModelFn, schedule: Schedule, z: Tensor, t, uncond: Tensor, cond: Tensor,
                guidance_scale: float, correction: Tensor | None = None, noise: Tensor | None = None,
                guide: GuideFn | None = None) -> Tensor:
    """One guided step from ``t``, plus an optional correction (Direct Inversion); with ``noise``
    the stochastic step (eta = 1) with that noise instead of the deterministic one (edit-friendly
    DDPM inversion's stored noise maps: the schedule's ``stochastic_step``, DDIM's eta = 1 step or
    flow matching's posterior step); with
    ``guide`` another guidance rule (ProxEdit).

    The one place reconstruction and the edit loops take a step, so the source row of an edit is
    the reconstruction bit for bit."""
    eps = guided_eps(model, z, t, uncond, cond, guidance_scale, guide)
    z = schedule.step(z, eps, t) if noise is None else schedule.stochastic_step(z, eps, t, noise)
    return z if correction is None else z + correction


@torch.no_grad()
def invert_progressive(model: ModelFn, z0: Tensor, cond: Tensor, schedule: Schedule, uncond: Tensor | None = None,
                       guidance_scale: float = 1.0) -> Iterator[Tensor]:
    """Inversion (docs/algorithm.md section 1): yields z*_1, ..., z*_T.

    Walks the schedule from the least noisy step (DDIM: timesteps 1, 21, ..., 981). At guidance 1
    (the pivot) the prediction is the conditional one alone; at another ``guidance_scale`` it is
    guided, ``uncond`` (B, L, d) being the unconditional embedding (the paper's Fig. 9).
    """
    z = z0.clone()
    T = schedule.num_steps
    guided = guidance_scale != 1.0
    if guided and uncond is None:
        raise ValueError("a guided inversion needs the unconditional embedding")
    for k, t in enumerate(schedule.inversion_timesteps):
        out = guided_eps(model, z, t, uncond, cond, guidance_scale) if guided else model(z, t, cond)
        z = schedule.inverse_step(z, out, t)
        check_finite(z, f"the {schedule.name} inversion", t, k, T)
        yield z


def invert(model: ModelFn, z0: Tensor, cond: Tensor, schedule: Schedule, uncond: Tensor | None = None,
           guidance_scale: float = 1.0) -> list[Tensor]:
    """The pivot trajectory [z*_0, z*_1, ..., z*_T] (T + 1 latents); z*_T is the inverted noise."""
    return [z0.clone(), *invert_progressive(model, z0, cond, schedule, uncond, guidance_scale)]


@torch.no_grad()
def sample_progressive(
    model: ModelFn,
    z_T: Tensor,
    cond: Tensor,
    uncond: Sequence[Tensor] | Tensor,
    guidance_scale: float,
    schedule: Schedule,
    corrections: Tensor | None = None,
    noise: Tensor | None = None,
) -> Iterator[Tensor]:
    """Guided sampling from z_T; yields the latent after each of the T steps.

    cond: (B, L, d), or one (B, L, d) embedding per step as a (T, B, L, d) tensor (the per-step
    C_t of textual inversion with a pivot). uncond: one (B, L, d) embedding per step (a sequence
    or a (T, B, L, d) tensor), e.g. the optimised null-text embeddings N_t. corrections: optional
    (T, C, h, w) latents added after each step (Direct Inversion's z*_{t-1} - zbar_{t-1}).
    noise: optional (T, C, h, w) noise maps of stochastic steps (edit-friendly DDPM inversion).
    """
    z = z_T
    per_step = cond.ndim == 4
    for i, t in enumerate(schedule.timesteps):
        z = guided_step(model, schedule, z, t, uncond[i], cond[i] if per_step else cond, guidance_scale,
                        None if corrections is None else corrections[i], None if noise is None else noise[i])
        check_finite(z, "sampling", t, i, schedule.num_steps)
        yield z


def sample(model: ModelFn, z_T: Tensor, cond: Tensor, uncond, guidance_scale: float, schedule: Schedule) -> Tensor:
    """Run :func:`sample_progressive` to the end and return z_0."""
    z = z_T
    for z in sample_progressive(model, z_T, cond, uncond, guidance_scale, schedule):
        pass
    return z

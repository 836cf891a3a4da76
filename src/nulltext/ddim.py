"""Deterministic DDIM (Song et al. 2021, eta = 0): the forward and inverse steps, and the loops
over an ``eps`` callable that invert an image latent and sample it back.

Symbols follow docs/algorithm.md: ``abar(t)`` is ``alphas_cumprod[t]``, ``k`` the spacing between
consecutive inference timesteps. The arithmetic is written in the same order as diffusers'
``DDIMScheduler.step`` so that the forward step is bit-identical to it (a test checks this).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import SchedulerConfig
from .errors import NonFiniteError

# eps(z, t, emb) -> noise prediction. z: (B, 4, h, w) float32, t: the integer timestep,
# emb: (B, L, d) text embeddings. Loops never look inside it, so tests can pass a fake.
EpsFn = Callable[[Tensor, int, Tensor], Tensor]


@dataclass(frozen=True)
class Schedule:
    """The inference timesteps and cumulative alphas of a configured DDIM scheduler."""

    timesteps: tuple[int, ...]  # t_1 > t_2 > ... > t_T  (981, 961, ..., 1 for T = 50)
    alphas_cumprod: Tensor  # (num_train_timesteps,) float32, abar(t)
    final_alpha_cumprod: Tensor  # () float32, abar(t) for t < 0
    step_size: int  # k = num_train_timesteps // T: the step below the last timestep is t_T - k

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int) -> "Schedule":
        """Read the schedule from a diffusers DDIMScheduler (calls its ``set_timesteps``)."""
        scheduler.set_timesteps(num_steps)
        # diffusers' "trailing" spacing yields T + 1 timesteps, the last -1, for some T (61, 103, ...
        # of 1000): the T valid ones are the schedule
        timesteps = tuple(int(t) for t in scheduler.timesteps if int(t) >= 0)[:num_steps]
        if len(timesteps) != num_steps:
            from .errors import NulltextError

            raise NulltextError(f"the scheduler gives {len(timesteps)} timesteps for {num_steps} steps")
        return cls(
            timesteps=timesteps,
            alphas_cumprod=scheduler.alphas_cumprod,
            final_alpha_cumprod=scheduler.final_alpha_cumprod,
            step_size=scheduler.config.num_train_timesteps // num_steps,
        )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def abar(self, t: int) -> Tensor:
        """abar(t), with ``final_alpha_cumprod`` for t < 0 (the step below the first timestep)."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def prev_timestep(self, t: int) -> int:
        """The timestep a denoising step from ``t`` lands on: the next one of the schedule, and
        ``t - k`` after the last (negative for SD's schedules: abar is ``final_alpha_cumprod``).
        With "leading" spacing, and "trailing" when T divides the training steps, this is always
        ``t - k``, the release's rule (and diffusers' DDIMScheduler.step's, which uses it for every
        spacing); otherwise the timesteps are unevenly spaced and the schedule's own one is right.
        A ``t`` outside the schedule steps by ``t - k``."""
        i = self.timesteps.index(t) if t in self.timesteps else len(self.timesteps)
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else t - self.step_size


def check_finite(x: Tensor, what: str, t: int, i: int, T: int) -> None:
    """Raise :class:`NonFiniteError` naming the step where a NaN or infinity first appears
    (in half precision: an overflow in the model), instead of carrying it on into a black image."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} produced a NaN or infinity at timestep {t} (step {i + 1} of {T}); in fp16 "
                             f"this is an overflow in the model: use --dtype bf16 or fp32")


def ddim_step(sample: Tensor, eps: Tensor, abar_t: Tensor, abar_prev: Tensor) -> Tensor:
    """One denoising step z_t -> z_{t-k} (DDIM formula (12) with sigma_t = 0)."""
    # 1. beta_t = 1 - abar(t)
    beta_prod_t = 1 - abar_t
    # 2. predicted x_0 ("predicted x_0" of formula (12))
    pred_original_sample = (sample - beta_prod_t ** (0.5) * eps) / abar_t ** (0.5)
    # 3. direction pointing to x_t of formula (12)
    pred_sample_direction = (1 - abar_prev) ** (0.5) * eps
    # 4. x_{t-1} without random noise of formula (12)
    return abar_prev ** (0.5) * pred_original_sample + pred_sample_direction


def ddim_inverse_step(sample: Tensor, eps: Tensor, abar_t: Tensor, abar_prev: Tensor) -> Tensor:
    """One inversion step z_{t-k} -> z_t: formula (12) run backwards under the approximation
    eps(z_t) ~ eps(z_{t-k}) (the caller evaluates eps at z_{t-k} and timestep t)."""
    # 1. x_0 predicted from the less noisy latent, with abar of the previous timestep
    beta_prod_prev = 1 - abar_prev
    pred_original_sample = (sample - beta_prod_prev ** 0.5 * eps) / abar_prev ** 0.5
    # 2. direction pointing to x_t, now at the noisier timestep
    next_sample_direction = (1 - abar_t) ** 0.5 * eps
    # 3. z_t
    return abar_t ** 0.5 * pred_original_sample + next_sample_direction


def step(schedule: Schedule, sample: Tensor, eps: Tensor, t: int) -> Tensor:
    """Forward DDIM step from timestep ``t`` to ``t - k``."""
    return ddim_step(sample, eps, schedule.abar(t), schedule.abar(schedule.prev_timestep(t)))


def inverse_step(schedule: Schedule, sample: Tensor, eps: Tensor, t: int) -> Tensor:
    """Inverse DDIM step to timestep ``t`` from the one below it in the schedule (``t - k`` with
    the release's leading spacing, its next_step), capped at ``T_train - 1``."""
    t_prev = min(schedule.prev_timestep(t), len(schedule.alphas_cumprod) - 1)
    return ddim_inverse_step(sample, eps, schedule.abar(t), schedule.abar(t_prev))


def guided_eps(eps_fn: EpsFn, z: Tensor, t: int, uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance with one batched forward: rows [uncond..., cond...].

    z: (B, 4, h, w); uncond, cond: (B, L, d). Returns eps_u + w * (eps_c - eps_u), (B, 4, h, w).
    """
    eps = eps_fn(torch.cat([z, z]), t, torch.cat([uncond, cond]))  # (2B, 4, h, w)
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def guided_step(eps_fn: EpsFn, schedule: Schedule, z: Tensor, t: int, uncond: Tensor, cond: Tensor,
                guidance_scale: float, correction: Tensor | None = None) -> Tensor:
    """One guided DDIM step from timestep ``t``, plus an optional correction (Direct Inversion).

    The one place reconstruction and the edit loops take a step, so the source row of an edit is
    the reconstruction bit for bit."""
    z = step(schedule, z, guided_eps(eps_fn, z, t, uncond, cond, guidance_scale), t)
    return z if correction is None else z + correction


@torch.no_grad()
def invert_progressive(eps_fn: EpsFn, z0: Tensor, cond: Tensor, schedule: Schedule) -> Iterator[Tensor]:
    """DDIM inversion at guidance 1 (docs/algorithm.md section 1): yields z*_1, ..., z*_T.

    Walks the timesteps from small to large (1, 21, ..., 981), each step conditional only.
    """
    z = z0.clone()
    T = schedule.num_steps
    for k, t in enumerate(reversed(schedule.timesteps)):
        e = eps_fn(z, t, cond)
        z = inverse_step(schedule, z, e, t)
        check_finite(z, "the DDIM inversion", t, k, T)
        yield z


def invert(eps_fn: EpsFn, z0: Tensor, cond: Tensor, schedule: Schedule) -> list[Tensor]:
    """The pivot trajectory [z*_0, z*_1, ..., z*_T] (T + 1 latents); z*_T is the inverted noise."""
    return [z0.clone(), *invert_progressive(eps_fn, z0, cond, schedule)]


@torch.no_grad()
def sample_progressive(
    eps_fn: EpsFn,
    z_T: Tensor,
    cond: Tensor,
    uncond: Sequence[Tensor] | Tensor,
    guidance_scale: float,
    schedule: Schedule,
    corrections: Tensor | None = None,
) -> Iterator[Tensor]:
    """Guided DDIM sampling from z_T; yields the latent after each of the T steps.

    cond: (B, L, d). uncond: one (B, L, d) embedding per step (a sequence or a (T, B, L, d)
    tensor), e.g. the optimised null-text embeddings N_t. corrections: optional (T, C, h, w)
    latents added after each step (Direct Inversion's z*_{t-1} - zbar_{t-1}).
    """
    z = z_T
    for i, t in enumerate(schedule.timesteps):
        z = guided_step(eps_fn, schedule, z, t, uncond[i], cond, guidance_scale,
                        None if corrections is None else corrections[i])
        check_finite(z, "sampling", t, i, schedule.num_steps)
        yield z


def sample(eps_fn: EpsFn, z_T: Tensor, cond: Tensor, uncond, guidance_scale: float, schedule: Schedule) -> Tensor:
    """Run :func:`sample_progressive` to the end and return z_0."""
    z = z_T
    for z in sample_progressive(eps_fn, z_T, cond, uncond, guidance_scale, schedule):
        pass
    return z


def make_scheduler(config: SchedulerConfig | None = None):
    """diffusers' DDIMScheduler with ``config`` (default: the release's)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**(config or SchedulerConfig()).to_dict())

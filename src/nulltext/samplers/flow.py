"""Flow matching with Euler steps (the sampler of Stable Diffusion 3 / 3.5, diffusers'
``FlowMatchEulerDiscreteScheduler``). Its quantity is the velocity v of the rectified flow
``z_sigma = (1 - sigma) z0 + sigma * noise``; a step from sigma to the next, smaller sigma is
``z + (sigma_next - sigma) * v`` (written in the order of the scheduler's ``step``, so it is
bit-identical to it: a test checks this), and the inversion runs the same Euler step backwards
with the velocity at the current point (docs/algorithm.md, flow matching). The timesteps the
model sees are ``sigma * num_train_timesteps``, as diffusers passes them. The exact inversions
get their steps here too: EDICT the Euler step as an affine map (``affine_step``), edit-friendly
DDPM inversion the posterior of the interpolation with ``alpha = 1 - sigma`` (``stochastic_step``;
docs/algorithm.md sections 8 and 9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NulltextError
from ..schedules import FlowMatchConfig

NAME = "flow-matching Euler"


@dataclass(frozen=True)
class Schedule:
    """The sigmas of a configured scheduler for ``num_steps`` steps: ``sigmas`` (T + 1,) float32,
    noisiest first, ending in 0; ``timesteps`` the model's times ``sigma * num_train_timesteps``
    of the first T (a :class:`nulltext.samplers.Schedule`)."""

    timesteps: tuple[float, ...]
    sigmas: Tensor
    num_train_timesteps: int = 1000
    name = NAME

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, image_seq_len: int | None = None) -> "Schedule":
        """``image_seq_len``: the image's token count, for a dynamically shifted schedule."""
        mu = FlowMatchConfig.of_scheduler(dict(scheduler.config)).mu(image_seq_len)
        scheduler.set_timesteps(num_steps, **({} if mu is None else {"mu": mu}))
        sigmas = scheduler.sigmas.float().cpu()
        timesteps = tuple(float(t) for t in scheduler.timesteps)
        if len(timesteps) != num_steps or len(sigmas) != num_steps + 1:
            raise NulltextError(f"the scheduler gives {len(timesteps)} timesteps for {num_steps} steps")
        return cls(timesteps, sigmas, scheduler.config.num_train_timesteps)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def inversion_timesteps(self) -> tuple[float, ...]:
        """The time of the current point of each inverse step, least noisy first: 0 (the photo's
        latent), then the sampling timesteps from the last to the second."""
        return (0.0, *reversed(self.timesteps[1:]))

    def _index(self, t) -> int:
        try:
            return self.timesteps.index(float(t))
        except ValueError:
            raise NulltextError(f"timestep {t} is not one of this {self.num_steps}-step schedule's") from None

    def step(self, sample: Tensor, out: Tensor, t) -> Tensor:
        """Euler step from ``t`` to the next sigma: ``sample + (sigma_next - sigma) * v``."""
        i = self._index(t)
        dt = (self.sigmas[i + 1] - self.sigmas[i]).to(sample.device)
        return sample + dt * out

    def inverse_step(self, sample: Tensor, out: Tensor, t) -> Tensor:
        """The Euler step backwards, from the sigma of ``t`` (an entry of ``inversion_timesteps``)
        to the next larger one, with the velocity ``out`` at the current point."""
        i = self.num_steps if float(t) == 0.0 else self._index(t)
        dt = (self.sigmas[i - 1] - self.sigmas[i]).to(sample.device)
        return sample + dt * out

    def affine_step(self, t) -> tuple[Tensor, Tensor, Tensor]:
        """The step from ``t`` as EDICT's affine map ``x / a - (b / a) v + c v`` of the latent, its
        float64 ``(a, b, c)``: the Euler step is ``(1, 0, sigma_next - sigma)``."""
        i = self._index(t)
        sigmas = self.sigmas.double()
        one = torch.ones((), dtype=torch.float64)
        return one, torch.zeros_like(one), sigmas[i + 1] - sigmas[i]

    def _posterior(self, t) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """float64 ``(sigma_t, alpha_s, d, s2)`` of the step from ``t`` to the next sigma ``s``, with
        ``alpha = 1 - sigma``: the DDPM posterior variance ``s2 = sigma_s^2 (sigma_t^2 -
        (alpha_t / alpha_s)^2 sigma_s^2) / sigma_t^2`` and the weight of the noise estimate in its
        mean, ``d = sqrt(sigma_s^2 - s2) = (alpha_t / alpha_s) sigma_s^2 / sigma_t``."""
        i = self._index(t)
        sigma_t, sigma_s = self.sigmas[i].double(), self.sigmas[i + 1].double()
        alpha_t, alpha_s = 1 - sigma_t, 1 - sigma_s
        ratio = alpha_t / alpha_s
        s2 = (sigma_s ** 2 * (sigma_t ** 2 - ratio ** 2 * sigma_s ** 2) / sigma_t ** 2).clamp(min=0)
        return sigma_t, alpha_s, ratio * sigma_s ** 2 / sigma_t, s2

    def variance(self, t) -> Tensor:
        """The DDPM posterior variance of the step from ``t`` (float64): positive at every step but
        the last, which lands on sigma = 0 and has none."""
        return self._posterior(t)[3]

    def noise_scale(self, t) -> Tensor:
        """What :meth:`stochastic_step` multiplies its noise by (float64): the posterior standard
        deviation, and 1 at the last step (sigma = 0), where there is none: the last noise map of
        an edit-friendly DDPM inversion is then the residual ``z0 - mu`` itself (docs/algorithm.md
        section 8)."""
        i = self._index(t)
        return torch.ones((), dtype=torch.float64) if i + 1 == self.num_steps else self._posterior(t)[3].sqrt()

    def stochastic_step(self, sample: Tensor, out: Tensor, t, noise: Tensor) -> Tensor:
        """The DDPM step from ``t`` to the next sigma ``s`` with the given ``noise``: the posterior of
        the interpolation ``x = alpha x0 + sigma n`` (``alpha = 1 - sigma``) given ``x0_hat = x -
        sigma_t v``, written as DDIM's eta = 1 step: ``mu = alpha_s x0_hat + sqrt(sigma_s^2 - s2)
        n_hat`` with ``n_hat = x + (1 - sigma_t) v``, plus ``noise_scale(t) * noise`` (zero noise:
        the mean alone).

        The last step lands on sigma = 0: its posterior has no variance and ``mu = x0_hat`` (the
        Euler step). The rule there is a unit scale, ``x_0 = x0_hat + noise``: a DDPM inversion
        stores the residual ``z0 - x0_hat`` as its last map, so the replay still ends on z0 to
        float rounding, and an edit's rows add the source's residual to their own ``x0_hat``, as
        DDIM's last step (a small sigma times its map) does."""
        sigma_t, alpha_s, d, _ = self._posterior(t)
        x0_hat = sample - sigma_t.to(sample) * out
        n_hat = sample + (1 - sigma_t).to(sample) * out
        mu = alpha_s.to(sample) * x0_hat + d.to(sample) * n_hat
        return mu + self.noise_scale(t).to(sample) * noise

    def add_noise(self, sample: Tensor, noise: Tensor, t) -> Tensor:
        """``(1 - sigma) z0 + sigma * noise`` at timestep ``t``, as the scheduler's ``scale_noise``."""
        sigma = self.sigmas[self._index(t)].to(sample)
        return sigma * noise + (1.0 - sigma) * sample

    def training_target(self, sample: Tensor, noise: Tensor) -> Tensor:
        """The velocity of the straight path from ``sample`` to ``noise``: ``noise - sample``."""
        return noise - sample


CONFIG = FlowMatchConfig  # the configuration inversion files record


def schedule(scheduler, num_steps: int, image_seq_len: int | None = None) -> Schedule:
    return Schedule.from_scheduler(scheduler, num_steps, image_seq_len)


def model_quantity(scheduler, out: Tensor, z: Tensor, t) -> Tensor:
    """The transformer's output is the velocity already."""
    return out


def make_scheduler(config: FlowMatchConfig | None = None):
    """diffusers' FlowMatchEulerDiscreteScheduler with ``config`` (default: SD3's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**(config or FlowMatchConfig()).to_dict())


def timestep_tensor(t, batch: int, device) -> Tensor:
    """The timestep as the SD3 pipeline passes it: float32, one per row."""
    return torch.full((batch,), float(t), dtype=torch.float32, device=device)

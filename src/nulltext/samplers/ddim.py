"""Deterministic DDIM (Song et al. 2021, eta = 0): the forward and inverse steps over a schedule
of timesteps, the sampler of the Stable Diffusion families. Its quantity is the noise eps.

Symbols follow docs/algorithm.md: ``abar(t)`` is ``alphas_cumprod[t]``, ``k`` the spacing between
consecutive inference timesteps. The arithmetic is written in the same order as diffusers'
``DDIMScheduler.step`` so that the forward step is bit-identical to it (a test checks this).
The loops over a model callable are the samplers' own (:mod:`nulltext.samplers`), re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..config import SchedulerConfig
from ..errors import NulltextError
from . import (
    EpsFn,
    ModelFn,
    check_finite,
    guidance,
    guided_eps,
    guided_step,
    invert,
    invert_progressive,
    sample,
    sample_progressive,
)

__all__ = ["CONFIG", "NAME", "EpsFn", "ModelFn", "Schedule", "check_finite", "ddim_inverse_step", "ddim_step", "ddpm_step", "ddpm_variance",
           "guidance",
           "guided_eps", "guided_step", "inverse_step", "invert", "invert_progressive", "make_scheduler",
           "model_quantity", "sample", "sample_progressive", "schedule", "step", "to_eps"]

NAME = "DDIM"
CONFIG = SchedulerConfig  # the configuration inversion files record


@dataclass(frozen=True)
class Schedule:
    """The inference timesteps and cumulative alphas of a configured DDIM scheduler
    (a :class:`nulltext.samplers.Schedule`)."""

    timesteps: tuple[int, ...]  # t_1 > t_2 > ... > t_T  (981, 961, ..., 1 for T = 50)
    alphas_cumprod: Tensor  # (num_train_timesteps,) float32, abar(t)
    final_alpha_cumprod: Tensor  # () float32, abar(t) for t < 0
    step_size: int  # k = num_train_timesteps // T: the step below the last timestep is t_T - k
    name = NAME

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int) -> "Schedule":
        """Read the schedule from a diffusers DDIMScheduler (calls its ``set_timesteps``)."""
        scheduler.set_timesteps(num_steps)
        # diffusers' "trailing" spacing yields T + 1 timesteps, the last -1, for some T (61, 103, ...
        # of 1000): the T valid ones are the schedule
        timesteps = tuple(int(t) for t in scheduler.timesteps if int(t) >= 0)[:num_steps]
        if len(timesteps) != num_steps:
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

    @property
    def inversion_timesteps(self) -> tuple[int, ...]:
        """1, 21, ..., 981 for T = 50: each inverse step evaluates eps at the timestep it goes to."""
        return tuple(reversed(self.timesteps))

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

    def step(self, sample: Tensor, eps: Tensor, t: int) -> Tensor:
        """Forward DDIM step from timestep ``t`` to ``t - k``."""
        return ddim_step(sample, eps, self.abar(t), self.abar(self.prev_timestep(t)))

    def variance(self, t: int) -> Tensor:
        """sigma_t^2 of the step from ``t`` at eta = 1 (DDIM formula (16), diffusers'
        ``DDIMScheduler._get_variance``): the DDPM posterior variance over the step."""
        return ddpm_variance(self.abar(t), self.abar(self.prev_timestep(t)))

    def noise_scale(self, t: int) -> Tensor:
        """What :meth:`stochastic_step` multiplies its noise by: sigma_t, the root of :meth:`variance`."""
        return self.variance(t) ** 0.5

    def affine_step(self, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """The step from ``t`` as EDICT's affine map ``x / a - (b / a) eps + c eps`` of the latent,
        its float64 ``(a, b, c)``: ``a = sqrt(abar_t / abar_prev)``, ``b = sqrt(1 - abar_t)``,
        ``c = sqrt(1 - abar_prev)``."""
        abar_t = self.abar(t).double()
        abar_prev = self.abar(self.prev_timestep(t)).double()
        return (abar_t / abar_prev) ** 0.5, (1 - abar_t) ** 0.5, (1 - abar_prev) ** 0.5

    def stochastic_step(self, sample: Tensor, eps: Tensor, t: int, noise: Tensor) -> Tensor:
        """The DDPM step (DDIM's eta = 1) from ``t`` with the given ``noise``: ``mu_t + sigma_t noise``
        (zero noise: the mean mu_t alone)."""
        return ddpm_step(sample, eps, self.abar(t), self.abar(self.prev_timestep(t)), noise)

    def add_noise(self, original: Tensor, noise: Tensor, t: int) -> Tensor:
        """The forward process at timestep ``t``: ``sqrt(abar(t)) z0 + sqrt(1 - abar(t)) noise``,
        in the order of operations of diffusers' ``DDIMScheduler.add_noise``."""
        abar_t = self.alphas_cumprod[t].to(original)  # on the sample's device and dtype, as diffusers has it
        return abar_t ** 0.5 * original + (1 - abar_t) ** 0.5 * noise

    def training_target(self, sample: Tensor, noise: Tensor) -> Tensor:
        """eps is trained to predict the noise."""
        return noise

    def inverse_step(self, sample: Tensor, eps: Tensor, t: int) -> Tensor:
        """Inverse DDIM step to timestep ``t`` from the one below it in the schedule (``t - k`` with
        the release's leading spacing, its next_step), capped at ``T_train - 1``."""
        t_prev = min(self.prev_timestep(t), len(self.alphas_cumprod) - 1)
        return ddim_inverse_step(sample, eps, self.abar(t), self.abar(t_prev))


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


def ddpm_variance(abar_t: Tensor, abar_prev: Tensor) -> Tensor:
    """sigma_t^2 = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev), diffusers' order."""
    beta_prod_t = 1 - abar_t
    beta_prod_t_prev = 1 - abar_prev
    return (beta_prod_t_prev / beta_prod_t) * (1 - abar_t / abar_prev)


def ddpm_step(sample: Tensor, eps: Tensor, abar_t: Tensor, abar_prev: Tensor, noise: Tensor) -> Tensor:
    """One stochastic step z_t -> z_{t-k} (DDIM formula (12) with eta = 1, the DDPM posterior):
    ``mu_t + sigma_t noise``, in the order of operations of diffusers' ``DDIMScheduler.step`` with
    ``eta=1`` and ``variance_noise=noise`` (bit for bit; a test checks this)."""
    beta_prod_t = 1 - abar_t
    pred_original_sample = (sample - beta_prod_t ** (0.5) * eps) / abar_t ** (0.5)
    std_dev_t = ddpm_variance(abar_t, abar_prev) ** (0.5)
    pred_sample_direction = (1 - abar_prev - std_dev_t ** 2) ** (0.5) * eps
    prev_sample = abar_prev ** (0.5) * pred_original_sample + pred_sample_direction
    return prev_sample + std_dev_t * noise


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
    """Forward DDIM step from timestep ``t`` to ``t - k`` (:meth:`Schedule.step`)."""
    return schedule.step(sample, eps, t)


def inverse_step(schedule: Schedule, sample: Tensor, eps: Tensor, t: int) -> Tensor:
    """Inverse DDIM step to timestep ``t`` (:meth:`Schedule.inverse_step`)."""
    return schedule.inverse_step(sample, eps, t)


def to_eps(out: Tensor, z: Tensor, abar_t: Tensor, prediction_type: str) -> Tensor:
    """The noise prediction from a UNet output of any prediction type, exactly: with
    ``z = sqrt(abar) x0 + sqrt(1 - abar) eps`` and ``v = sqrt(abar) eps - sqrt(1 - abar) x0``,
    ``eps = sqrt(abar) v + sqrt(1 - abar) z`` and ``eps = (z - sqrt(abar) x0) / sqrt(1 - abar)``.
    Affine in ``out``, so guidance on the converted predictions equals guidance on the raw ones,
    and every loop downstream (inversion, loss, Prompt-to-Prompt) runs on eps unchanged."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return abar_t ** 0.5 * out + (1 - abar_t) ** 0.5 * z
    if prediction_type == "sample":
        return (z - abar_t ** 0.5 * out) / (1 - abar_t) ** 0.5
    raise NulltextError(f"unknown prediction type {prediction_type!r}")


def model_quantity(scheduler, out: Tensor, z: Tensor, t: int) -> Tensor:
    """The denoiser's float32 output at ``(z, t)`` as eps, by the scheduler's prediction type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return out
    return to_eps(out, z.float(), scheduler.alphas_cumprod[int(t)].to(out.device), prediction_type)


def schedule(scheduler, num_steps: int, image_seq_len: int | None = None) -> Schedule:
    """``image_seq_len`` is for samplers whose schedule depends on the image's size: not DDIM."""
    return Schedule.from_scheduler(scheduler, num_steps)


def make_scheduler(config: SchedulerConfig | None = None):
    """diffusers' DDIMScheduler with ``config`` (default: the release's)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**(config or SchedulerConfig()).to_dict())

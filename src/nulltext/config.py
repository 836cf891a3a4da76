"""Frozen configuration dataclasses. Every default is the value of the authors' public release
(Mokady et al., "Null-text Inversion", CVPR 2023; see ALGORITHM.md) unless its comment says otherwise."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import NulltextError

METHODS = ("nti",)  # inversion methods this version implements


@dataclass(frozen=True)
class SchedulerConfig:
    """The DDIM scheduler the release builds for Stable Diffusion 1.x."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085  # release: DDIMScheduler(beta_start=0.00085, ...)
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    clip_sample: bool = False
    set_alpha_to_one: bool = False  # so abar(t < 0) = final_alpha_cumprod = abar(0)
    steps_offset: int = 1  # timesteps 981, 961, ..., 1 for 50 steps
    timestep_spacing: str = "leading"  # diffusers' DDIM default, the one the release ran with
    prediction_type: str = "epsilon"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class InversionConfig:
    """How an image is inverted (ALGORITHM.md sections Preprocessing, 1 and 2)."""

    num_steps: int = 50  # T, DDIM steps
    guidance_scale: float = 7.5  # w, classifier-free guidance of the optimisation and sampling
    num_inner_steps: int = 10  # Adam iterations per timestep at most
    early_stop_epsilon: float = 1e-5  # epsilon: stop when loss < epsilon + i * early_stop_slope
    early_stop_slope: float = 2e-5  # the release's per-timestep growth of the threshold
    lr: float = 1e-2  # Adam learning rate at the first timestep
    lr_decay_steps: float = 100.0  # lr_i = lr * (1 - i / lr_decay_steps)
    # Output size (width, height) in pixels; None = the model's native size
    # (unet.config.sample_size * VAE scale factor: 512 for SD 1.x, as the release hard-codes).
    size: tuple[int, int] | None = None
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # pixels cut from left, right, top, bottom first
    method: str = "nti"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.num_steps, int) or self.num_steps <= 0:
            raise NulltextError(f"steps must be a positive integer, got {self.num_steps!r}")
        if self.num_steps > self.scheduler.num_train_timesteps:
            raise NulltextError(
                f"steps must be at most {self.scheduler.num_train_timesteps} (the scheduler's "
                f"training timesteps), got {self.num_steps}"
            )
        if not self.guidance_scale > 0:
            raise NulltextError(f"guidance must be positive, got {self.guidance_scale!r}")
        if not isinstance(self.num_inner_steps, int) or self.num_inner_steps < 0:
            raise NulltextError(f"inner-steps must be a non-negative integer, got {self.num_inner_steps!r}")
        if self.early_stop_epsilon < 0:
            raise NulltextError(f"early-stop must be non-negative, got {self.early_stop_epsilon!r}")
        if not self.lr > 0:
            raise NulltextError(f"lr must be positive, got {self.lr!r}")
        if not self.lr_decay_steps > 0:
            raise NulltextError(f"lr-decay-steps must be positive, got {self.lr_decay_steps!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0):
            raise NulltextError(f"size must be positive, got {self.size!r}")
        if len(self.crop) != 4 or min(self.crop) < 0:
            raise NulltextError(f"crop must be four non-negative integers L,R,T,B, got {self.crop!r}")
        if self.method not in METHODS:
            raise NulltextError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["size"] = list(self.size) if self.size is not None else None
        d["crop"] = list(self.crop)
        return d

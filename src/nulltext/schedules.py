"""The scheduler configurations nulltext samples with and inversion files record: DDIM's over a
checkpoint's noise schedule (:class:`SchedulerConfig`, SD 1.x, 2.x and XL) and flow matching's
(:class:`FlowMatchConfig`, SD3). Plain data, checked when made; the samplers
(:mod:`nulltext.samplers`) build diffusers schedulers from them."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from .errors import NulltextError


def check_train_timesteps(n) -> None:
    if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 100_000):
        raise NulltextError(f"scheduler num_train_timesteps must be a positive integer, got {n!r}")


def finite(v) -> bool:
    """A finite real number (a Python or numpy int or float; not a bool)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class SchedulerConfig:
    """The DDIM scheduler nulltext samples with. The defaults are the release's, for Stable
    Diffusion 1.x; a checkpoint's own noise schedule is read with :meth:`from_checkpoint`."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085  # release: DDIMScheduler(beta_start=0.00085, ...)
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    clip_sample: bool = False
    set_alpha_to_one: bool = False  # so abar(t < 0) = final_alpha_cumprod = abar(0)
    steps_offset: int = 1  # timesteps 981, 961, ..., 1 for 50 steps
    timestep_spacing: str = "leading"  # diffusers' DDIM default, the one the release ran with
    prediction_type: str = "epsilon"  # what the UNet predicts: epsilon (SD 1.x), v_prediction (SD 2.x 768)
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        check_train_timesteps(self.num_train_timesteps)
        if not (finite(self.beta_start) and finite(self.beta_end) and 0 < self.beta_start <= self.beta_end < 1):
            raise NulltextError(f"scheduler betas must satisfy 0 < beta_start <= beta_end < 1, got "
                                f"{self.beta_start!r} and {self.beta_end!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise NulltextError(f"scheduler beta_schedule {self.beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
        if not all(isinstance(v, bool) for v in (self.clip_sample, self.set_alpha_to_one, self.rescale_betas_zero_snr)):
            raise NulltextError("scheduler clip_sample, set_alpha_to_one and rescale_betas_zero_snr must be true or false")
        if not (isinstance(self.steps_offset, int) and not isinstance(self.steps_offset, bool)
                and 0 <= self.steps_offset < self.num_train_timesteps):
            raise NulltextError(f"scheduler steps_offset must be a small non-negative integer, got {self.steps_offset!r}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise NulltextError(f"scheduler timestep spacing {self.timestep_spacing!r} is not one of "
                                f"{', '.join(TIMESTEP_SPACINGS)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise NulltextError(f"scheduler prediction type {self.prediction_type!r} is not one of "
                                f"{', '.join(PREDICTION_TYPES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of_scheduler(cls, config: dict) -> "SchedulerConfig":
        """The fields of a configured DDIM scheduler's config, as they are."""
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})

    @classmethod
    def from_checkpoint(cls, config: dict) -> "SchedulerConfig":
        """The DDIM scheduler for a checkpoint whose scheduler config (any diffusers scheduler's:
        PNDM for SD 1.x, DDIM or Euler for others) is ``config``: its noise schedule, timestep
        spacing, offset and prediction type, with the release's ``clip_sample=False,
        set_alpha_to_one=False``. For SD 1.x this is exactly the default configuration."""
        kind = str(config.get("_class_name", ""))
        if kind.startswith(("EDM", "FlowMatch")) or (kind and "beta_schedule" not in config):
            raise NulltextError(f"the checkpoint's scheduler is a {kind}, without a DDPM noise schedule; nulltext "
                                f"inverts checkpoints trained with beta schedules (SD 1.x, 2.x, XL)")
        if config.get("rescale_betas_zero_snr"):
            raise NulltextError("the checkpoint's scheduler has a zero terminal SNR (rescale_betas_zero_snr): DDIM "
                                "inversion cannot reach abar = 0, which nulltext does not support")
        names = {f.name for f in dataclasses.fields(cls)} - {"clip_sample", "set_alpha_to_one"}
        known = {k: config[k] for k in names if config.get(k) is not None}
        if config.get("trained_betas") is not None:
            raise NulltextError("the checkpoint's scheduler has trained_betas, which nulltext does not support")
        prediction = known.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise NulltextError(f"the checkpoint's scheduler predicts {prediction!r}; nulltext supports "
                                f"{', '.join(PREDICTION_TYPES)}")
        spacing = known.get("timestep_spacing", "leading")
        if spacing not in TIMESTEP_SPACINGS:
            raise NulltextError(f"the checkpoint's scheduler uses timestep spacing {spacing!r}; "
                                f"nulltext supports {', '.join(TIMESTEP_SPACINGS)}")
        return cls(**known)


@dataclass(frozen=True)
class FlowMatchConfig:
    """The ``FlowMatchEulerDiscreteScheduler`` configuration nulltext steps with: the
    checkpoint's own (SD3 and SD3.5: ``shift=3.0``), recorded in inversion files. With
    ``use_dynamic_shifting`` the sigmas are shifted by the image's token count, as diffusers'
    StableDiffusion3Pipeline computes it (``mu`` from ``base_shift``, ``max_shift`` and the
    sequence lengths). Stochastic sampling and inverted sigmas are refused: they have no
    deterministic inverse."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    stochastic_sampling: bool = False

    def __post_init__(self) -> None:
        check_train_timesteps(self.num_train_timesteps)
        if not (finite(self.shift) and self.shift > 0):
            raise NulltextError(f"scheduler shift must be a positive number, got {self.shift!r}")
        if self.use_dynamic_shifting and not (finite(self.base_shift) and finite(self.max_shift)
                                              and 0 < self.base_image_seq_len < self.max_image_seq_len):
            raise NulltextError("the checkpoint's flow-matching scheduler shifts its sigmas by the image size with "
                                "base_shift, max_shift, base_image_seq_len and max_image_seq_len that nulltext cannot "
                                "read")
        if self.stochastic_sampling or self.invert_sigmas:
            raise NulltextError("the checkpoint's flow-matching scheduler samples stochastically or inverts its sigmas; "
                                "nulltext inverts the deterministic flow of SD3 and SD3.5")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def mu(self, image_seq_len: int | None) -> float | None:
        """The dynamic shift for an image of ``image_seq_len`` tokens, diffusers' ``calculate_shift``
        (a line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift));
        None without dynamic shifting."""
        if not self.use_dynamic_shifting:
            return None
        if image_seq_len is None:
            raise NulltextError("a dynamically shifted flow schedule needs the image's size")
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        b = self.base_shift - m * self.base_image_seq_len
        return image_seq_len * m + b

    @classmethod
    def of_scheduler(cls, config: dict) -> "FlowMatchConfig":
        """The fields of a configured scheduler's config, as they are."""
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})

    @classmethod
    def from_checkpoint(cls, config: dict) -> "FlowMatchConfig":
        """The configuration for a checkpoint whose scheduler config is ``config``."""
        kind = str(config.get("_class_name", ""))
        if kind and not kind.startswith("FlowMatch"):
            raise NulltextError(f"the checkpoint's scheduler is a {kind}; an SD3 checkpoint steps with "
                                f"FlowMatchEulerDiscreteScheduler")
        return cls.of_scheduler({k: v for k, v in config.items() if v is not None})

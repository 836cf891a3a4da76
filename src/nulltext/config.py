"""Frozen configuration dataclasses. Every default is the value of the authors' public release
(Mokady et al., "Null-text Inversion", CVPR 2023; see docs/algorithm.md) unless its comment says otherwise."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field

from .errors import NulltextError

# the checkpoint nulltext loads when none is named (a Hugging Face hub id)
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"

# inversion methods: null-text inversion (the paper), its ablations (global null-text, random
# pivot, plain DDIM inversion), Negative-Prompt Inversion (Miyake et al. 2023) and Direct
# Inversion (Ju et al. 2024)
METHODS = ("nti", "npi", "direct", "global-nti", "random-pivot", "ddim")
OPTIMISED = ("nti", "global-nti", "random-pivot")  # methods that run the null-text optimisation


def _finite(v) -> bool:
    """A finite real number (a Python or numpy int or float; not a bool)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


# the largest side nulltext inverts at, in pixels (SDXL's native side is 1024; 4096 needs a 512x512
# latent, far past what any of these models was trained for)
MAX_SIZE = 4096

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
        if not (isinstance(self.num_train_timesteps, int) and not isinstance(self.num_train_timesteps, bool)
                and 1 <= self.num_train_timesteps <= 100_000):
            raise NulltextError(f"scheduler num_train_timesteps must be a positive integer, got {self.num_train_timesteps!r}")
        if not (_finite(self.beta_start) and _finite(self.beta_end) and 0 < self.beta_start <= self.beta_end < 1):
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
        from .errors import NulltextError

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
class InversionConfig:
    """How an image is inverted (docs/algorithm.md sections Preprocessing, 1 and 2)."""

    num_steps: int = 50  # T, DDIM steps
    guidance_scale: float = 7.5  # w, classifier-free guidance of the optimisation and sampling
    num_inner_steps: int = 10  # Adam iterations per timestep at most
    early_stop_epsilon: float = 1e-5  # epsilon: stop when loss < epsilon + i * early_stop_slope
    early_stop_slope: float = 2e-5  # the release's per-timestep growth of the threshold
    lr: float = 1e-2  # Adam learning rate at the first timestep
    lr_decay_steps: float = 100.0  # lr_i = lr * (1 - i / max(lr_decay_steps, T)): the release's for T <= 100
    # Output size (width, height) in pixels, or one number: the long side, the short one following
    # the image's aspect (both rounded to the model's size multiple); None = the model's native size
    # (unet.config.sample_size * VAE scale factor: 512x512 for SD 1.x, as the release hard-codes).
    size: tuple[int, int] | int | None = None
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # pixels cut from left, right, top, bottom first
    method: str = "nti"  # see METHODS
    seed: int = 0  # random-pivot: seed of the Gaussian z_T it starts from
    # SDXL: optimise the unconditional pooled embedding too (ours; off: only the token embeddings)
    optimize_pooled: bool = False
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
        for name, value in (("guidance", self.guidance_scale), ("lr", self.lr), ("early-stop", self.early_stop_epsilon),
                            ("early-stop-slope", self.early_stop_slope), ("lr-decay-steps", self.lr_decay_steps)):
            if not _finite(value):
                raise NulltextError(f"{name} must be a finite number, got {value!r}")
        if not self.guidance_scale > 0:
            raise NulltextError(f"guidance must be positive, got {self.guidance_scale!r}")
        if not isinstance(self.num_inner_steps, int) or self.num_inner_steps < 0:
            raise NulltextError(f"inner-steps must be a non-negative integer, got {self.num_inner_steps!r}")
        if self.early_stop_epsilon < 0 or self.early_stop_slope < 0:
            raise NulltextError(f"early-stop and early-stop-slope must be non-negative, got "
                                f"{self.early_stop_epsilon!r} and {self.early_stop_slope!r}")
        if not self.lr > 0:
            raise NulltextError(f"lr must be positive, got {self.lr!r}")
        if not self.lr_decay_steps > 0:
            raise NulltextError(f"lr-decay-steps must be positive, got {self.lr_decay_steps!r}")
        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        sizes = [self.size] if whole(self.size) else list(self.size) if isinstance(self.size, (tuple, list)) else []
        if self.size is not None and not (whole(self.size) or (len(sizes) == 2 and all(whole(v) for v in sizes))):
            raise NulltextError(f"size must be N or (W, H) in pixels, positive integers, got {self.size!r}")
        if self.size is not None and max(sizes) > MAX_SIZE:
            raise NulltextError(f"size {self.size!r} is too large: at most {MAX_SIZE} pixels a side")
        if len(self.crop) != 4 or min(self.crop) < 0:
            raise NulltextError(f"crop must be four non-negative integers L,R,T,B, got {self.crop!r}")
        if self.method not in METHODS:
            raise NulltextError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["size"] = self.size if self.size is None or isinstance(self.size, int) else list(self.size)
        d["crop"] = list(self.crop)
        return d


EDIT_MODES = ("auto", "replace", "refine")
MASK_MODES = ("intersect", "replace")
EDIT_METHODS = ("p2p", "sdedit")


def _check_fraction_spec(spec, what: str) -> None:
    """A fraction f in [0, 1] (= the range (0, f)) or a range (a, b) with 0 <= a <= b <= 1."""
    if isinstance(spec, bool):
        raise NulltextError(f"{what} must be a fraction or a range, got {spec!r}")
    if isinstance(spec, (int, float)):
        values = (0.0, float(spec))
    else:
        try:
            values = tuple(float(v) for v in spec)
        except (TypeError, ValueError):
            raise NulltextError(f"{what} must be a fraction or a range (a, b), got {spec!r}") from None
        if len(values) != 2:
            raise NulltextError(f"{what} range must have two ends (a, b), got {spec!r}")
    a, b = values
    if not (0.0 <= a <= 1.0 and 0.0 <= b <= 1.0):
        raise NulltextError(f"{what} must lie in [0, 1] (a fraction of the steps), got {spec!r}")
    if a > b:
        raise NulltextError(f"{what} range must have start <= end, got {spec!r}")


@dataclass(frozen=True)
class EditConfig:
    """How the target prompts edit an inversion (docs/algorithm.md sections 3 and 4).

    Fractions are of the T denoising steps: a number f means the steps in [0, f), a pair (a, b)
    the steps in [a, b). Cross-attention ranges map to steps [int(a*(T+1)), int(b*(T+1))),
    self-attention ranges to [int(a*T), int(b*T)), exactly as the release computes them."""

    method: str = "p2p"  # "p2p" (Prompt-to-Prompt) or "sdedit" (paper 5.2; ours: offered as a baseline)
    mode: str = "auto"  # "replace" (word swap), "refine" (add/remove words), "auto": replace when
    #                     source and target have the same number of tokens, refine otherwise
    cross_replace: object = 0.8  # release default; a fraction, a range, or {word: fraction|range,
    #                              "default": fraction|range} (words missing -> default (0, 1))
    self_replace: object = 0.4  # release default (its word-swap examples also use 0.6)
    self_max_keys: int = 32 * 32  # self replacement only in layers with at most this many keys
    reweight: tuple = ()  # ((word, factor), ...): equalizer on target words (release: 2, 5, -2, 0.5)
    blend_source: tuple = ()  # local blend: words of the source prompt ...
    blend_target: tuple = ()  # ... and of the target prompts whose region may change
    blend_subtract: tuple = ()  # optional: words whose region is removed from the blend mask
    blend_start: float = 0.2  # blend after each step once steps done > int(blend_start * T)
    blend_threshold: float = 0.3  # of the mask normalised by its maximum (release th=(.3, .3))
    blend_subtract_threshold: float = 0.3
    # blend mask from the cross-attention layers at latent/blend_factor (release: 16x16 of a 64x64
    # latent); when the UNet has none at that size, the nearest size it has
    blend_factor: int = 4
    sdedit_strength: float = 0.6  # ours: fraction of the steps SDEdit re-denoises with the target
    # a user mask (edit(..., mask=...)) "intersect"s the local blend's word mask or "replace"s it;
    # without blend words the mask alone is the blend
    mask_mode: str = "intersect"

    def __post_init__(self) -> None:
        if isinstance(self.reweight, dict):
            object.__setattr__(self, "reweight", tuple(self.reweight.items()))
        for name in ("blend_source", "blend_target", "blend_subtract"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, tuple(value.split()))
            else:
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.cross_replace, list):
            object.__setattr__(self, "cross_replace", tuple(self.cross_replace))
        if isinstance(self.self_replace, list):
            object.__setattr__(self, "self_replace", tuple(self.self_replace))
        self.validate()

    def validate(self) -> None:
        if self.method not in EDIT_METHODS:
            raise NulltextError(f"unknown edit method {self.method!r}; choose one of {', '.join(EDIT_METHODS)}")
        if self.mask_mode not in MASK_MODES:
            raise NulltextError(f"unknown mask mode {self.mask_mode!r}; choose one of {', '.join(MASK_MODES)}")
        if self.mode not in EDIT_MODES:
            raise NulltextError(f"unknown mode {self.mode!r}; choose one of {', '.join(EDIT_MODES)}")
        if isinstance(self.cross_replace, dict):
            if not self.cross_replace:
                raise NulltextError("cross-replace needs at least one word=fraction or default=fraction")
            for word, spec in self.cross_replace.items():
                _check_fraction_spec(spec, f"cross-replace for {word!r}")
        else:
            _check_fraction_spec(self.cross_replace, "cross-replace")
        _check_fraction_spec(self.self_replace, "self-replace")
        for word, factor in self.reweight:
            if not isinstance(word, str) or not word.strip():
                raise NulltextError(f"reweight needs word=factor pairs, got {word!r}")
            if not isinstance(factor, (int, float)) or factor != factor or factor in (float("inf"), float("-inf")):
                raise NulltextError(f"reweight factor for {word!r} must be a finite number, got {factor!r}")
        if bool(self.blend_source) != bool(self.blend_target):
            raise NulltextError("local blend needs words of the source and of the target prompt")
        if self.blend_subtract and not self.blend_source:
            raise NulltextError("blend-subtract needs a local blend (--blend WORDS_SRC WORDS_TGT)")
        for name in ("blend_start", "blend_threshold", "blend_subtract_threshold", "sdedit_strength"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise NulltextError(f"{name.replace('_', '-')} must lie in [0, 1], got {v!r}")
        if not isinstance(self.self_max_keys, int) or self.self_max_keys < 0:
            raise NulltextError(f"self-max-keys must be a non-negative integer, got {self.self_max_keys!r}")
        if not isinstance(self.blend_factor, int) or self.blend_factor < 1:
            raise NulltextError(f"blend-factor must be a positive integer, got {self.blend_factor!r}")

    @property
    def blend(self) -> bool:
        return bool(self.blend_source)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["reweight"] = {w: f for w, f in self.reweight}
        return d


def parse_size(text: str) -> tuple[int, int] | int:
    """'768x512' -> (768, 512) (width x height); '512' -> 512, the long side (the short one follows
    the image's aspect)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise NulltextError(f"size must be N or WxH in pixels, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise NulltextError(f"size must be N or WxH with positive numbers, got {text!r}")
    if max(parts) > MAX_SIZE:
        raise NulltextError(f"size {text!r} is too large: at most {MAX_SIZE} pixels a side")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def parse_reweight(text: str | None) -> tuple[tuple[str, float], ...]:
    """'fluffy=2 smiling=5' or 'fluffy=2, smiling=5' -> (("fluffy", 2.0), ("smiling", 5.0)): the
    reweight pairs of the web UI and of batch manifests (the command line's --reweight takes
    comma-separated phrases)."""
    pairs = []
    for item in re.split(r"[\s,]+", text or ""):
        if not item:
            continue
        word, sep, factor = item.partition("=")
        try:
            value = float(factor)
        except ValueError:
            value = None
        if not sep or not word or value is None:
            raise NulltextError(f"reweight takes word=factor pairs (e.g. fluffy=2), got {item!r}")
        pairs.append((word, value))
    return tuple(pairs)

"""The typed records of an inversion file (format 6) and the format's name and version: what
:mod:`nulltext.storage.format` writes into the header, and what
:mod:`nulltext.storage.checks` builds, field by field, from a file's header."""

from __future__ import annotations

from dataclasses import dataclass, field

FORMAT = "nulltext-inversion"
# 2: methods, shared (1, L, d) null embeddings, Direct Inversion corrections; 3: model families
# (family, prediction type, the checkpoint's scheduler, SDXL's packed conditioning), size N;
# 4: typed records (model, image, preprocessing, run, optimisation, timings), each fact once:
# steps, guidance, method and crop only in the config; 5: the Section-4 ablations (the source's
# optimised conditional embedding, the noise seed), random-pivot redefined (the earlier one reads as
# random-start); 6: the exact inversions (ddpm's noise maps, edict's coupled latent in float64,
# proxnpi's prox and prox_quantile in the config)
FORMAT_VERSION = 6
REQUIRED_META = ("prompt", "config", "model", "image", "preprocessing")


# --- the records --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelRecord:
    """The model an inversion was made with: what :func:`check_fits` compares with a pipeline."""

    id: str  # as given to load_pipeline: a hub id, a folder or "tiny"
    fingerprint: dict  # fingerprint.model_fingerprint: configs, names and shapes, weight statistics
    scheduler: dict  # the checkpoint's scheduler config the pipeline ran with
    family: str = "stable-diffusion"  # files of format 1 knew no other
    prediction_type: str = "epsilon"


@dataclass(frozen=True)
class ImageRecord:
    """The photo that was inverted, as it was read (before crop and resize)."""

    name: str = ""  # the file's name, or "<PIL image>" and the like for images passed in memory
    sha256: str = ""  # of the file's bytes
    original_size: tuple[int, int] | None = None  # (width, height)
    original_mode: str = ""  # PIL mode before conversion to RGB


@dataclass(frozen=True)
class Preprocessing:
    """How the photo became the image that was inverted (the crop is the config's)."""

    size: tuple[int, int]  # (width, height) in pixels after crop and resize
    resample: str = "bicubic"


@dataclass(frozen=True)
class OptimisationRecord:
    """Per-timestep diagnostics of the null-text optimisation (index i: t_1 = 981 ... t_T)."""

    iterations: list[int]  # Adam iterations used
    lrs: list[float]  # learning rate
    losses_first: list[float]  # loss at the first iteration (NaN without iterations)
    losses_last: list[float]  # loss of the last iteration
    losses_after: list[float]  # loss of the guided step taken with the stored N_t
    loss_scales: list[float] = field(default_factory=list)  # fp16 loss scaling's factors (else empty)
    retries: list[int] = field(default_factory=list)  # fp16: iterations computed again after overflows
    # steps whose loss rose (see inversion.diverged_steps); files before format 3 did not record them
    diverged_steps: list[int] = field(default_factory=list)
    # the seed (below 2^32) of the Gaussian noise the method drew (random-pivot, textual-inversion, nti-no-pivot)
    noise_seed: int | None = None


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds; the DDIM inversion and the optimisation are the whole batch's."""

    encode_s: float = 0.0
    ddim_inversion_s: float = 0.0
    optimisation_s: float = 0.0

    @property
    def total(self) -> float:
        return self.encode_s + self.ddim_inversion_s + self.optimisation_s


@dataclass(frozen=True)
class RunRecord:
    """Where and how the inversion ran."""

    dtype: str = ""  # "fp32", "fp16", "bf16" ("" in files that did not record it)
    device: str = ""
    batch_size: int = 1  # images inverted together (files before format 3: 1)


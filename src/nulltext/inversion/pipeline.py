"""Image -> :class:`Inversion` on a loaded pipeline (docs/algorithm.md sections Preprocessing, 1
and 2): preprocess and encode, DDIM-invert, run the method's computation from
:mod:`nulltext.inversion.optimise`, and record the result; and the reconstruction of an inversion.

:func:`invert_progressive` yields each image's inversion as soon as its batch is done (a CLI
writes files, a web UI shows results, as they come); :func:`invert_many` and
:func:`invert_image` collect it."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import image as image_mod
from .. import samplers
from ..config import OPTIMISED, SEEDED, InversionConfig
from ..errors import NonFiniteError, NulltextError, NulltextWarning
from ..image import probe
from ..storage import ImageRecord, Inversion, ModelRecord, OptimisationRecord, Preprocessing, RunRecord, Timings
from ..text import check_prompt, encode_null, encode_prompt, warn_split_words
from .ablations import (
    draw_noise,
    generator,
    noise_seed,
    optimize_null_text_no_pivot,
    optimize_textual_inversion,
    random_trajectory,
)
from .exact import ddpm_noise_maps, edict_invert, edict_sample_progressive
from .optimise import direct_inversion_corrections, diverged_steps, optimize_global_null_text, optimize_null_text_batch


def invert_image(
    pipe,
    image,
    prompt: str,
    config: InversionConfig | None = None,
    progress: bool = True,
    loss_scaling: bool | None = None,
) -> Inversion:
    """Invert ``image`` (a path or PIL image) described by ``prompt`` with null-text inversion.

    Returns an :class:`Inversion` whose reconstruction (:func:`reconstruct`) reproduces the
    preprocessed image almost exactly. ``loss_scaling``: see :func:`invert_many`.
    """
    return invert_many(pipe, [image], [prompt], config, batch_size=1, progress=progress,
                       loss_scaling=loss_scaling)[0]


def invert_many(
    pipe,
    images,
    prompts,
    config: InversionConfig | None = None,
    batch_size: int = 4,
    progress: bool = True,
    loss_scaling: bool | None = None,
    on_result: Callable[[int, Inversion], None] | None = None,
) -> list[Inversion]:
    """Invert several images (paths or PIL images), each described by its prompt (one string for
    all, or one per image), ``batch_size`` at a time: one :class:`Inversion` per image, in order.
    ``on_result(i, inversion)`` is called for image i as soon as its batch is done (e.g. to save
    it). See :func:`invert_progressive`, which this collects."""
    images = list(images)
    out: list[Inversion | None] = [None] * len(images)
    for index, inv in invert_progressive(pipe, images, prompts, config, batch_size, progress, loss_scaling):
        out[index] = inv
        if on_result is not None:
            on_result(index, inv)
    return out


@dataclass
class _Prepared:
    """One image ready to invert: what its file records of the photo, its latent and prompt
    embedding (the decoded photo itself is not kept: many photos can be queued; its preprocessed
    copy, a fraction of its size, where the caller wants it)."""

    index: int
    image: ImageRecord
    size: tuple[int, int]  # preprocessed (width, height)
    photo: object  # the preprocessed photo (PIL) where the caller asked for it, else None
    z0: Tensor
    prompt: str
    cond: Tensor
    encode_s: float


@dataclass(frozen=True)
class InversionRequest:
    """Photos to invert with their prompts and settings, checked without a model (:func:`request`)."""

    images: tuple  # paths, PIL images or ImageSources
    prompts: tuple[str, ...]  # one per image
    config: InversionConfig
    batch_size: int


def request(images, prompts, config: InversionConfig | None = None, batch_size: int = 4,
            what: str = "prompt") -> InversionRequest:
    """The checks of an inversion that need no model, run once: at least one image, one prompt per
    image (or one for all), each prompt text without control characters (an empty one inverts
    unconditionally, with a warning), a positive batch size, each photo file's header (it is
    decoded once, when it is inverted). ``what`` names a prompt in messages (the command line
    says ``--prompt``)."""
    images = list(images)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) == 1 and len(images) > 1:  # one caption for all
        prompts = prompts * len(images)
    if not images:
        raise NulltextError("no images to invert")
    if len(prompts) != len(images):
        raise NulltextError(f"{len(images)} images need one {what} each (or one for all), got {len(prompts)}"
                            + ("" if what.startswith("-") else " prompts"))
    for prompt in dict.fromkeys(prompts):
        check_prompt(prompt, empty="warn")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise NulltextError(f"batch size must be a positive integer, got {batch_size!r}")
    for image in images:
        if isinstance(image, (str, os.PathLike)):
            probe(image)
    return InversionRequest(tuple(images), tuple(prompts), config or InversionConfig(), batch_size)


def invert_progressive(
    pipe,
    images,
    prompts=None,
    config: InversionConfig | None = None,
    batch_size: int = 4,
    progress: bool = True,
    loss_scaling: bool | None = None,
    photos: bool = False,
) -> Iterator[tuple]:
    """Invert several images as :func:`invert_many` does, yielding ``(i, inversion)`` for image i
    as soon as its batch is done (batches in order of first appearance of their image size); with
    ``photos``, ``(i, inversion, photo)``: the preprocessed photo it inverted (PIL), so that a
    caller compares the reconstruction with it without decoding the file again. ``images`` may be
    an :class:`InversionRequest` (checked by :func:`request` beforehand; ``prompts``, ``config``
    and ``batch_size`` are then its own).

    The images of a batch run through the UNet together, one call per DDIM step and per Adam
    iteration, with their own null embeddings, Adam state and early stop: each image gets the
    inversion :func:`invert_image` gives it alone (to float rounding). A batch holds images whose
    preprocessed sizes match; images of other sizes go to other batches. ``loss_scaling`` (None:
    on for fp16 models) scales the optimisation's loss by a power of two so its gradient survives
    fp16 (see :func:`optimize_null_text_batch`).

    The arguments are checked at the call (a bad one raises before any work); the images are
    encoded and inverted as the iterator is consumed."""
    req = images if isinstance(images, InversionRequest) else request(images, prompts, config, batch_size)
    # the file records the schedule the pipeline really samples with (the checkpoint's own)
    config = dataclasses.replace(req.config, scheduler=pipe.sampler.CONFIG.of_scheduler(pipe.scheduler_config))
    if (config.guidance_scale == 1.0 and config.num_inner_steps > 0 and config.method in OPTIMISED
            and not config.method.startswith("textual-inversion")):
        warnings.warn("guidance 1 makes the null-text optimisation have no effect (the unconditional "
                      "prediction gets weight 0); use a guidance above 1, e.g. the default 7.5",
                      NulltextWarning, stacklevel=2)
    for prompt in dict.fromkeys(req.prompts):
        warn_split_words(pipe, prompt)
    if config.optimize_pooled and getattr(pipe, "text_encoder_2", None) is None:
        warnings.warn("optimize_pooled applies to SDXL and SD3 only; this model has no pooled text embedding",
                      NulltextWarning, stacklevel=2)
    if loss_scaling is None:
        loss_scaling = pipe.dtype == torch.float16
    return _progressive(pipe, list(req.images), list(req.prompts), config, req.batch_size, progress, loss_scaling,
                        photos)


def _progressive(pipe, images: list, prompts: list[str], config: InversionConfig, batch_size: int, progress: bool,
                 loss_scaling: bool, photos: bool) -> Iterator[tuple]:
    null0 = encode_null(pipe)
    groups: dict[tuple, list[_Prepared]] = {}
    outer = tqdm(total=len(images), desc="images", unit="image", disable=not progress or len(images) == 1)
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        t0 = time.perf_counter()
        source = image_mod.as_source(image)
        size = image_mod.output_size(config.size, source.image.size, config.crop, pipe.native_size,
                                     pipe.size_multiple)
        pixels = image_mod.preprocess(source.image, size=size, crop=config.crop, multiple=pipe.size_multiple)
        pipe.check_photo(pixels, source.image.size, source.name)
        z0 = image_mod.encode(pipe, pixels)  # (1, 4, h, w) float32
        record = ImageRecord(name=source.name, sha256=source.sha256, original_size=tuple(source.image.size),
                             original_mode=source.original_mode)
        item = _Prepared(index, record, tuple(pixels.size), pixels if photos else None, z0, prompt,
                         encode_prompt(pipe, prompt), time.perf_counter() - t0)
        del source, pixels
        groups.setdefault(tuple(z0.shape), []).append(item)
    try:
        with pipe.compiled():
            for items in groups.values():
                for start in range(0, len(items), batch_size):
                    batch = items[start:start + batch_size]
                    for item, inv in zip(batch, _invert_batch(pipe, batch, null0, config, progress, loss_scaling)):
                        yield (item.index, inv, item.photo) if photos else (item.index, inv)
                    outer.update(len(batch))
    finally:
        outer.close()


def _invert_batch(pipe, batch: list[_Prepared], null0: Tensor, config: InversionConfig, progress: bool,
                  loss_scaling: bool) -> list[Inversion]:
    """Invert the images of one batch (same latent size) together."""
    try:
        return _invert_batch_unchecked(pipe, batch, null0, config, progress, loss_scaling)
    except NonFiniteError as e:
        names = ", ".join(item.image.name or f"image {item.index + 1}" for item in batch)
        raise NonFiniteError(f"{e} (inverting {names})") from None


def _invert_batch_unchecked(pipe, batch: list[_Prepared], null0: Tensor, config: InversionConfig, progress: bool,
                            loss_scaling: bool) -> list[Inversion]:
    B = len(batch)
    z0 = torch.cat([item.z0 for item in batch])
    cond = torch.cat([item.cond for item in batch])  # (B, L, d)
    schedule = pipe.schedule(config.num_steps, tuple(z0.shape[-2:]))
    eps_fn = functools.partial(pipe.eps, optimize_pooled=config.optimize_pooled)
    T = schedule.num_steps

    method = config.method
    seeds = [noise_seed(config.seed, item.index) for item in batch]
    results, conds, optimisation_s = None, None, 0.0
    inversion_cond = cond
    if method == "textual-inversion":  # C first, on random noise; the pivot is then inverted under it
        t0 = time.perf_counter()
        results = [optimize_textual_inversion(eps_fn, z0[b:b + 1], cond[b:b + 1], schedule, config, seeds[b],
                                              progress=progress) for b in range(B)]
        conds = [r.null_embeddings for r in results]  # each (1, L, d)
        inversion_cond = torch.cat(conds)
        optimisation_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    noise_maps = coupled = None
    if method == "ddpm":  # edit-friendly DDPM inversion: fresh noise per step (seeded per image), noise maps
        gens = [generator(s) for s in seeds]
        latent_T, noise_maps = ddpm_noise_maps(eps_fn, z0, cond, null0.expand(B, -1, -1), schedule,
                                               config.guidance_scale, gens)
        pivots = None
    elif method == "edict":  # EDICT: the coupled pair, inverted exactly in float64
        coupled = edict_invert(eps_fn, z0, cond, null0.expand(B, -1, -1), config.guidance_scale, schedule)
        latent_T, pivots = coupled[0].float(), None
    elif method == "random-pivot":  # the paper's random pivot: z0 noised with one noise per image
        noise = torch.cat([draw_noise(z0[b:b + 1], generator(seeds[b])) for b in range(B)])
        pivots = random_trajectory(z0, noise, schedule)
    else:  # at inversion guidance 1 (the default) the conditional prediction alone: the pivot
        walk = samplers.invert_progressive(eps_fn, z0, inversion_cond, schedule, null0.expand(B, -1, -1),
                                           config.inversion_guidance)
        pivots = [z0, *tqdm(walk, total=T, desc=f"{schedule.name} inversion", unit="step", disable=not progress, leave=False)]
    ddim_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    corrections = None
    if pivots is not None:
        latent_T = pivots[-1]
    if method in ("nti", "random-pivot", "random-start", "textual-inversion-pivot"):
        if method == "random-start":
            # the random pivot of files before format 5: the same optimisation towards the DDIM
            # pivots, from Gaussian noise (the same noise for every image)
            g = torch.Generator().manual_seed(config.seed)
            noise = torch.randn(pivots[-1][:1].shape, generator=g).to(pivots[-1])
            latent_T = noise.expand_as(pivots[-1]).clone()
            pivots = [*pivots[:-1], latent_T]
        optimise = "cond" if method == "textual-inversion-pivot" else "null"
        results = optimize_null_text_batch(eps_fn, pivots, cond, null0, schedule, config, progress=progress,
                                           loss_scaling=loss_scaling, optimise=optimise)
        if optimise == "cond":  # C_t per step, the null text stays N0
            conds = [r.null_embeddings for r in results]
            nulls = [null0] * B
        else:
            nulls = [r.null_embeddings for r in results]
    elif method == "global-nti":  # one embedding per image: the images are optimised one after another
        results = [optimize_global_null_text(eps_fn, [p[b:b + 1] for p in pivots], cond[b:b + 1], null0, schedule,
                                             config, progress=progress, loss_scaling=loss_scaling) for b in range(B)]
        nulls = [r.null_embeddings for r in results]  # each (1, L, d)
    elif method == "nti-no-pivot":  # N_t on random noise (Eq. 4); the reconstruction starts at z*_T
        results = [optimize_null_text_no_pivot(eps_fn, z0[b:b + 1], cond[b:b + 1], null0, schedule, config, seeds[b],
                                               progress=progress) for b in range(B)]
        nulls = [r.null_embeddings for r in results]
    elif method in ("npi", "proxnpi", "textual-inversion"):
        # Negative-Prompt Inversion: N_t = C, no optimisation (proxnpi: the same, its edits proximal);
        # textual inversion: N0 (C is the file's)
        nulls = [item.cond for item in batch] if method != "textual-inversion" else [null0] * B
    elif method in ("ddim", "ddpm", "edict"):  # the plain empty-prompt embedding
        nulls = [null0] * B
    elif method == "direct":  # Direct Inversion: N0 plus per-step corrections of the source branch
        nulls = [null0] * B
        corrections = direct_inversion_corrections(eps_fn, pivots, cond, null0, schedule, config.guidance_scale)
    else:  # pragma: no cover - InversionConfig.validate refuses unknown methods
        raise ValueError(method)
    optimisation_s += time.perf_counter() - t0

    model = ModelRecord(id=pipe.model_id, fingerprint=pipe.fingerprint, scheduler=dict(pipe.scheduler_config),
                        family=pipe.family, prediction_type=pipe.prediction_type)
    run = RunRecord(dtype=pipe.dtype_name, device=str(pipe.device), batch_size=B)
    out = []
    for b, item in enumerate(batch):
        optimisation = None
        if results is not None:
            r = results[b]
            bad = diverged_steps(r.losses_first, r.losses_after, config)
            optimisation = OptimisationRecord(iterations=r.iterations, lrs=r.lrs, losses_first=r.losses_first,
                                              losses_last=r.losses_last, losses_after=r.losses_after,
                                              loss_scales=r.loss_scales, retries=r.retries if r.loss_scales else [],
                                              diverged_steps=bad, noise_seed=seeds[b] if method in SEEDED else None)
            if bad:
                i = bad[0]
                name = item.image.name
                name = "the image" if name.startswith("<") or not name else name
                warnings.warn(f"the null-text optimisation of {name} diverged at "
                              f"{len(bad)} of {config.num_steps} steps (first at step {i + 1}: the loss rose from "
                              f"{r.losses_first[i]:.3g} to {r.losses_after[i]:.3g}); the reconstruction may be poor: "
                              f"try a lower learning rate (--lr on the command line)", NulltextWarning, stacklevel=2)
        out.append(Inversion(
            latent_T=latent_T[b:b + 1].detach().float().cpu(), null_embeddings=nulls[b].detach().float().cpu(),
            prompt=item.prompt, config=config, preprocessing=Preprocessing(size=item.size), model=model,
            image=item.image, optimisation=optimisation, run=run,
            # the DDIM inversion and optimisation times are the whole batch's
            timings=Timings(encode_s=item.encode_s, ddim_inversion_s=ddim_s, optimisation_s=optimisation_s),
            corrections=None if corrections is None else corrections[:, b].detach().float().cpu(),
            noise_maps=None if noise_maps is None else noise_maps[:, b].detach().float().cpu(),
            coupled_latent=None if coupled is None else coupled[:, b].detach().double().cpu(),
            cond_embeddings=None if conds is None else conds[b].detach().float().cpu()))
    return out


def reconstruct_latent(pipe, inversion: Inversion, progress: bool = True) -> Tensor:
    """Sample from z_T with C (the file's optimised one where the method has it) and the stored N_t
    at every step: z_0 of the reconstruction."""
    schedule = pipe.schedule(inversion.num_steps, tuple(inversion.latent_T.shape[-2:]))
    cond = inversion.step_conds(pipe.device)  # (T, 1, L, d), or None: the prompt's encoding
    cond = encode_prompt(pipe, inversion.prompt) if cond is None else cond
    nulls = inversion.step_nulls(pipe.device)  # (T, 1, L, d)
    w = inversion.config.guidance_scale
    if inversion.coupled_latent is not None:  # EDICT: the coupled sampling, in float64; z_0 is x_0
        walk = edict_sample_progressive(pipe.eps, inversion.coupled_latent.to(pipe.device)[:, None], cond, nulls, w,
                                        schedule)
    else:
        walk = samplers.sample_progressive(pipe.eps, inversion.latent_T.to(pipe.device), cond, nulls, w, schedule,
                                           inversion.step_corrections(pipe.device), inversion.step_noise(pipe.device))
    z = None
    for z in tqdm(walk, total=schedule.num_steps, desc="reconstruction", unit="step", disable=not progress,
                  leave=False):
        pass
    return z[0].float() if inversion.coupled_latent is not None else z


def reconstruct(pipe, inversion: Inversion, progress: bool = True):
    """The reconstructed image (PIL) of an inversion."""
    return image_mod.decode(pipe, reconstruct_latent(pipe, inversion, progress=progress))[0]


def summary(inversion: Inversion, psnr: float | None = None) -> str:
    """What an inversion did, in words: its method, size, time, optimisation iterations and final
    loss, and the reconstruction's PSNR where given (against the photo as inverted, as ``--check``
    measures it). The command line prints it after "inverted NAME"; the web UI shows it."""
    opt, (w, h) = inversion.optimisation, inversion.image_size
    seconds = inversion.timings.total if inversion.timings else 0.0
    line = f"({inversion.method}) at {w}x{h} in {seconds:.1f}s"
    if inversion.run.batch_size > 1:
        line = f"({inversion.method}) at {w}x{h} in a batch of {inversion.run.batch_size} ({seconds:.1f}s)"
    if opt:
        line += (f": {sum(opt.iterations)} optimisation iterations over {inversion.num_steps} steps, "
                 f"final loss {opt.losses_after[-1]:.3g}")
    else:
        line += f": {inversion.num_steps} steps, no optimisation"
    if psnr is not None:
        line += f", reconstruction PSNR {psnr:.2f} dB"
    return line

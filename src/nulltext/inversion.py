"""Null-text inversion (Mokady et al. 2023, docs/algorithm.md sections 1 and 2).

:func:`optimize_null_text` is the pure algorithm over an ``eps`` callable; :func:`invert_image`
runs the whole chain on a loaded pipeline and returns an :class:`Inversion`, the object users
save to a file and edit many times.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from . import ddim
from .config import InversionConfig, SchedulerConfig
from .ddim import EpsFn, Schedule
from .errors import NulltextWarning
from .storage import FORMAT_VERSION, Inversion  # noqa: F401  (Inversion: part of this module's API)


@dataclass
class NullTextResult:
    """Output of the optimisation: one null embedding per timestep plus diagnostics."""

    null_embeddings: Tensor  # (T, L, d), N_t for t = t_1 (981) ... t_T (1)
    iterations: list[int]  # Adam iterations used at each timestep
    losses_first: list[float]  # loss at the first iteration (before any update at that timestep)
    losses_last: list[float]  # loss of the last iteration (computed before its Adam step)
    losses_after: list[float]  # loss of the guided step actually taken with the stored N_t
    lrs: list[float]  # learning rate used at each timestep


# callback(i, j, loss, lr) after each Adam iteration j of timestep i
IterCallback = Callable[[int, int, float, float], None]


def optimize_null_text(
    eps_fn: EpsFn,
    pivots: list[Tensor],
    cond: Tensor,
    null0: Tensor,
    schedule: Schedule,
    config: InversionConfig,
    callback: IterCallback | None = None,
    progress: bool = False,
) -> NullTextResult:
    """Per-timestep null-text optimisation around the pivot trajectory (docs/algorithm.md section 2).

    pivots: [z*_0, ..., z*_T] from :func:`ddim.invert`, each (1, 4, h, w).
    cond: C, (1, L, d); null0: N0 = text_encoder(""), (1, L, d).
    """
    T = schedule.num_steps
    assert len(pivots) == T + 1, "pivots must hold z*_0 ... z*_T"
    w = config.guidance_scale
    z_bar = pivots[-1]  # zbar_T = z*_T
    null = null0.detach()
    result = NullTextResult(null_embeddings=torch.empty(0), iterations=[], losses_first=[],
                            losses_last=[], losses_after=[], lrs=[])
    stored: list[Tensor] = []
    bar = tqdm(total=T * config.num_inner_steps, desc="null-text optimisation", unit="it",
               disable=not progress, leave=False)
    for i, t in enumerate(schedule.timesteps):
        target = pivots[T - i - 1]  # z*_{T-i-1}
        # 1. start from the previous timestep's optimised embedding (the first from N0)
        null = null.detach().clone().requires_grad_(True)
        # 2. Adam on N only; lr decays linearly with the timestep index (the release's
        #    lr*(1 - i/100); past 100 steps the denominator is T, so lr stays positive)
        lr = config.lr * (1.0 - i / max(config.lr_decay_steps, T))
        optimizer = torch.optim.Adam([null], lr=lr)
        # 3. the conditional prediction once, without gradient (reused for the final step below)
        with torch.no_grad():
            eps_cond = eps_fn(z_bar, t, cond)
        threshold = config.early_stop_epsilon + i * config.early_stop_slope
        iterations, loss_first, loss_item = 0, float("nan"), float("nan")
        # 4. up to num_inner_steps Adam iterations
        for j in range(config.num_inner_steps):
            eps_uncond = eps_fn(z_bar, t, null)
            eps = eps_uncond + w * (eps_cond - eps_uncond)
            z_prev = ddim.step(schedule, z_bar, eps, t)
            loss = F.mse_loss(z_prev, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_item = loss.item()
            iterations = j + 1
            if j == 0:
                loss_first = loss_item
            if callback is not None:
                callback(i, j, loss_item, lr)
            bar.update()
            # early stop on the loss computed before this Adam step (the step is still applied)
            if loss_item < threshold:
                break
        bar.update(config.num_inner_steps - iterations)
        # 5. store N_t and take the guided step with it, reusing eps_cond (the release runs a
        #    second, batched forward here; the conditional half of it equals eps_cond)
        null = null.detach()
        stored.append(null[0].clone())
        with torch.no_grad():
            eps_uncond = eps_fn(z_bar, t, null)
            z_bar = ddim.step(schedule, z_bar, eps_uncond + w * (eps_cond - eps_uncond), t)
            loss_after = F.mse_loss(z_bar, target).item()
        result.iterations.append(iterations)
        result.losses_first.append(loss_first)
        result.losses_last.append(loss_item)
        result.losses_after.append(loss_after)
        result.lrs.append(lr)
        bar.set_postfix(t=t, loss=f"{loss_after:.2e}")
    bar.close()
    result.null_embeddings = torch.stack(stored)  # (T, L, d)
    return result


def optimize_global_null_text(
    eps_fn: EpsFn,
    pivots: list[Tensor],
    cond: Tensor,
    null0: Tensor,
    schedule: Schedule,
    config: InversionConfig,
    progress: bool = False,
) -> NullTextResult:
    """The paper's "global null-text" ablation: one embedding N shared by all timesteps.

    The release has no code for it; ours: ``num_inner_steps`` sweeps over the T timesteps, each
    timestep one Adam step (learning rate ``config.lr``) on the guided step from zbar_t to its
    pivot, zbar following the current N. Same iteration budget as null-text inversion (T x inner
    steps). Diagnostics: per timestep, the loss of the first and of the last sweep."""
    T = schedule.num_steps
    w = config.guidance_scale
    null = null0.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([null], lr=config.lr)
    first: list[float] = [float("nan")] * T  # stay NaN with 0 sweeps, as optimize_null_text's
    last: list[float] = [float("nan")] * T
    bar = tqdm(total=T * config.num_inner_steps, desc="global null-text optimisation", unit="it",
               disable=not progress, leave=False)
    for sweep in range(config.num_inner_steps):
        z_bar = pivots[-1]
        losses = []
        for i, t in enumerate(schedule.timesteps):
            with torch.no_grad():
                eps_cond = eps_fn(z_bar, t, cond)
            eps_uncond = eps_fn(z_bar, t, null)
            z_prev = ddim.step(schedule, z_bar, eps_uncond + w * (eps_cond - eps_uncond), t)
            loss = F.mse_loss(z_prev, pivots[T - i - 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            z_bar = z_prev.detach()
            bar.update()
        if sweep == 0:
            first = losses
        last = losses
    bar.close()
    null = null.detach()
    # the loss of the steps actually taken with the final N
    after = []
    with torch.no_grad():
        z_bar = pivots[-1]
        for i, t in enumerate(schedule.timesteps):
            z_bar = ddim.guided_step(eps_fn, schedule, z_bar, t, null, cond, w)
            after.append(F.mse_loss(z_bar, pivots[T - i - 1]).item())
    return NullTextResult(null_embeddings=null, iterations=[config.num_inner_steps] * T, losses_first=first,
                          losses_last=last, losses_after=after, lrs=[config.lr] * T)


def direct_inversion_corrections(eps_fn: EpsFn, pivots: list[Tensor], cond: Tensor, null0: Tensor,
                                 schedule: Schedule, guidance_scale: float) -> Tensor:
    """Direct Inversion (Ju et al. 2024): for each step i, the guided step from the pivot z*_t
    lands at zbar_{t-1}; the correction z*_{t-1} - zbar_{t-1}, added back to the source branch
    after its step, keeps it on the pivot trajectory. Returns (T, C, h, w)."""
    T = schedule.num_steps
    out = []
    z = pivots[-1]
    with torch.no_grad():
        for i, t in enumerate(schedule.timesteps):
            z_bar = ddim.step(schedule, z, ddim.guided_eps(eps_fn, z, t, null0, cond, guidance_scale), t)
            corr = pivots[T - i - 1] - z_bar
            out.append(corr[0])
            # continue from z_bar + corr (= z*_{t-1} up to rounding), as the replay will: the source
            # branch of an edit then reproduces these latents bit for bit (Ju et al.'s reference does
            # the same)
            z = z_bar + corr
    return torch.stack(out)


def invert_image(
    pipe,
    image,
    prompt: str,
    config: InversionConfig | None = None,
    progress: bool = True,
) -> Inversion:
    """Invert ``image`` (a path or PIL image) described by ``prompt`` with null-text inversion.

    Returns an :class:`Inversion` whose reconstruction (:func:`reconstruct`) reproduces the
    preprocessed image almost exactly.
    """
    from . import image as image_mod
    from .text import encode_null, encode_prompt, warn_split_words

    config = config or InversionConfig()
    # the file records the schedule the pipeline really samples with (the checkpoint's own)
    config = dataclasses.replace(config, scheduler=SchedulerConfig.of_scheduler(pipe.scheduler_config))
    from .config import OPTIMISED

    if config.guidance_scale == 1.0 and config.num_inner_steps > 0 and config.method in OPTIMISED:
        warnings.warn("guidance 1 makes the null-text optimisation have no effect (the unconditional "
                      "prediction gets weight 0); use a guidance above 1, e.g. the default 7.5",
                      NulltextWarning, stacklevel=2)
    warn_split_words(pipe, prompt)
    if config.optimize_pooled and getattr(pipe, "text_encoder_2", None) is None:
        warnings.warn("optimize_pooled applies to SDXL only; this model has no pooled text embedding",
                      NulltextWarning, stacklevel=2)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = image_mod.as_source(image)
    size = image_mod.output_size(config.size, source.image.size, config.crop, pipe.native_size, pipe.size_multiple)
    pixels = image_mod.preprocess(source.image, size=size, crop=config.crop,
                                  multiple=pipe.size_multiple)
    z0 = image_mod.encode(pipe, pixels)  # (1, 4, h, w) float32
    cond = encode_prompt(pipe, prompt)  # (1, L, d)
    null0 = encode_null(pipe)
    schedule = pipe.schedule(config.num_steps)
    eps_fn = functools.partial(pipe.eps, optimize_pooled=config.optimize_pooled)
    timings["encode_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pivots = []
    for z in tqdm(ddim.invert_progressive(eps_fn, z0, cond, schedule), total=schedule.num_steps,
                  desc="DDIM inversion", unit="step", disable=not progress, leave=False):
        pivots.append(z)
    pivots = [z0, *pivots]
    timings["ddim_inversion_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    latent_T, corrections, result = pivots[-1], None, None
    method = config.method
    if method == "nti":
        result = optimize_null_text(eps_fn, pivots, cond, null0, schedule, config, progress=progress)
        nulls = result.null_embeddings
    elif method == "random-pivot":
        # the ablation: the same optimisation towards the same pivots, from Gaussian noise
        g = torch.Generator().manual_seed(config.seed)
        latent_T = torch.randn(pivots[-1].shape, generator=g).to(pivots[-1])
        result = optimize_null_text(eps_fn, [*pivots[:-1], latent_T], cond, null0, schedule, config,
                                    progress=progress)
        nulls = result.null_embeddings
    elif method == "global-nti":
        result = optimize_global_null_text(eps_fn, pivots, cond, null0, schedule, config, progress=progress)
        nulls = result.null_embeddings  # (1, L, d)
    elif method == "npi":  # Negative-Prompt Inversion: N_t = C, no optimisation
        nulls = cond
    elif method == "ddim":  # DDIM inversion alone: the plain empty-prompt embedding
        nulls = null0
    elif method == "direct":  # Direct Inversion: N0 plus per-step corrections of the source branch
        nulls = null0
        corrections = direct_inversion_corrections(eps_fn, pivots, cond, null0, schedule, config.guidance_scale)
    else:  # pragma: no cover - InversionConfig.validate refuses unknown methods
        raise ValueError(method)
    timings["optimisation_s"] = time.perf_counter() - t0

    meta = {
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "model": pipe.model_id,
        "family": pipe.family,
        "prediction_type": pipe.prediction_type,
        "model_fingerprint": pipe.fingerprint,
        "scheduler": dict(pipe.scheduler_config),
        "num_steps": config.num_steps,
        "guidance_scale": config.guidance_scale,
        "prompt": prompt,
        "image": {"sha256": source.sha256, "name": source.name, "original_size": list(source.image.size),
                  "original_mode": source.original_mode},
        "preprocessing": {"size": list(pixels.size), "crop": list(config.crop), "resample": "bicubic"},
        "config": config.to_dict(),
        "timings": timings,
        "dtype": pipe.dtype_name,
        "device": str(pipe.device),
    }
    if result is not None:
        meta["optimisation"] = {
            "iterations": result.iterations,
            "losses_first": result.losses_first,
            "losses_last": result.losses_last,
            "losses_after": result.losses_after,
            "lrs": result.lrs,
        }
    return Inversion(latent_T=latent_T.detach().float().cpu(), null_embeddings=nulls.detach().float().cpu(),
                     prompt=prompt, config=config, meta=meta,
                     corrections=corrections.detach().float().cpu() if corrections is not None else None)


def reconstruct_latent(pipe, inversion: Inversion, progress: bool = True) -> Tensor:
    """Sample from z_T with C and the stored N_t at every step: z_0 of the reconstruction."""
    from .text import encode_prompt

    schedule = pipe.schedule(inversion.num_steps)
    cond = encode_prompt(pipe, inversion.prompt)
    nulls = inversion.step_nulls(pipe.device)  # (T, 1, L, d)
    z = inversion.latent_T.to(pipe.device)
    for z in tqdm(ddim.sample_progressive(pipe.eps, z, cond, nulls, inversion.config.guidance_scale, schedule,
                                          inversion.step_corrections(pipe.device)),
                  total=schedule.num_steps, desc="reconstruction", unit="step", disable=not progress, leave=False):
        pass
    return z


def reconstruct(pipe, inversion: Inversion, progress: bool = True):
    """The reconstructed image (PIL) of an inversion."""
    from .image import decode

    return decode(pipe, reconstruct_latent(pipe, inversion, progress=progress))[0]

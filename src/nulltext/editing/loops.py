"""Editing an inversion with text: the explicit loop over the denoising steps, running a checked
:class:`~nulltext.editing.planning.EditPlan`.

Every step runs two UNet passes, each a classifier-free-guidance batch [uncond..., cond...]:

1. the **source** row, exactly as :func:`nulltext.inversion.reconstruct_latent` computes it (same
   function, same batch shape, the layers' own processors producing the output), so the source
   row *is* the reconstruction whatever the number of targets; its attention probabilities are
   computed beside it for the controller;
2. all **target** rows in one batch, with the controller replacing their attention maps.

Then the local blend, if any. All rows start from z_T and use the inversion's N_t.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import samplers
from ..config import EditConfig
from ..controllers import SOURCE, TARGET, AttentionStore, Controller
from ..errors import NulltextError
from ..image import composite, load_mask
from ..image import decode as decode_latents
from ..inversion import exact
from ..processors import installed
from ..text import encode_null, encode_prompt
from .planning import EditPlan, PhotoLatent, latent_size, original_size, plan_for, request


@dataclass
class EditStep:
    """What the loop yields after each denoising step."""

    index: int  # step index i, 0..T-1
    timestep: int  # t_i (981 first for T = 50)
    source: Tensor  # (1, C, h, w): the reconstruction's latent after this step
    targets: Tensor  # (n, C, h, w): the edited latents after this step (after the local blend)
    mask: Tensor | None = None  # (n, 1, h, w) local-blend mask used at this step, if any


@dataclass
class EditResult:
    prompts: list[str]  # [source, *targets]
    modes: list[str]  # the P2P mode used for each target ("replace" | "refine" | "sdedit")
    latents: Tensor  # (1+n, C, h, w): z_0 of the reconstruction, then of each target
    images: list = field(default_factory=list)  # PIL images, same order

    @property
    def reconstruction(self):
        return self.images[0]

    @property
    def edits(self) -> list:
        return self.images[1:]




def _setup(pipe, inversion, targets):
    schedule = pipe.schedule(inversion.num_steps, tuple(inversion.latent_T.shape[-2:]))
    # (T, 1, L, d), as reconstruct_latent: the file's optimised C (textual inversions) or the prompt's
    cond_src = inversion.step_conds(pipe.device)
    if cond_src is None:
        cond_src = encode_prompt(pipe, inversion.prompt).expand(inversion.num_steps, -1, -1)[:, None]
    cond_tgt = torch.cat([encode_prompt(pipe, t) for t in targets]) if targets else None  # (n, L, d)
    nulls = inversion.step_nulls(pipe.device)  # (T, 1, L, d), as reconstruct_latent
    z_T = inversion.latent_T.to(pipe.device)  # (1, C, h, w)
    # Direct Inversion's corrections act on the source branch only (Ju et al.), as in reconstruction
    corr = inversion.step_corrections(pipe.device)  # (T, 1, C, h, w) or None
    return schedule, cond_src, cond_tgt, nulls, z_T, corr


def _steps(pipe, inversion) -> tuple:
    """What the method adds to the rows' steps: edit-friendly DDPM inversion's noise maps (T, 1, C,
    h, w), replayed by the source and every target (that is how it edits), or None; proxnpi's
    proximal guidance of the target rows (the source's guidance difference is zero: N = C), or None."""
    guide = None
    if inversion.method == "proxnpi":
        guide = exact.proximal_guidance(inversion.config.prox, inversion.config.prox_quantile)
    return inversion.step_noise(pipe.device), guide


def _at(x: Tensor | None, i: int) -> Tensor | None:
    return None if x is None else x[i]


@torch.no_grad()
def run_controlled(pipe, inversion, targets: list[str], controller: Controller,
                   progress: bool = False, desc: str = "editing") -> Iterator[EditStep]:
    """The edit loop with any controller installed (targets may be empty: source only).

    The processors stay installed while the generator is suspended: run it to the end, or close
    it (``contextlib.closing``) before using the UNet for anything else."""
    schedule, cond_src, cond_tgt, nulls, z_src, corr = _setup(pipe, inversion, targets)
    noise, guide = _steps(pipe, inversion)
    n, w = len(targets), inversion.config.guidance_scale
    z_tgt = z_src.expand(n, *z_src.shape[1:]).clone()
    with installed(pipe.denoiser, controller, pipe.attention_sites(tuple(z_src.shape[-2:]))):
        for i, t in enumerate(tqdm(schedule.timesteps, desc=desc, unit="step", disable=not progress, leave=False)):
            controller.begin_step(i)
            # 1. source row: the reconstruction's own computation
            controller.phase = SOURCE
            z_src = samplers.guided_step(pipe.eps, schedule, z_src, t, nulls[i], cond_src[i], w, _at(corr, i),
                                         _at(noise, i))
            mask = None
            if n:
                # 2. all targets in one batch, attention edited from the source's maps
                controller.phase = TARGET
                z_tgt = samplers.guided_step(pipe.eps, schedule, z_tgt, t, nulls[i].expand(n, -1, -1), cond_tgt, w,
                                             noise=_at(noise, i), guide=guide)
                # 3. local blend
                z_tgt = controller.end_step(z_src, z_tgt)
                blend = getattr(controller, "local_blend", None)
                mask = blend.last_mask if blend is not None else None
            samplers.check_finite(torch.cat([z_src, z_tgt]), "editing", t, i, schedule.num_steps)
            yield EditStep(i, t, z_src, z_tgt, mask)


@torch.no_grad()
def sdedit_progressive(pipe, inversion, targets: list[str], strength: float,
                       progress: bool = False, user_mask: Tensor | None = None) -> Iterator[EditStep]:
    """SDEdit from an inversion (paper 5.2): the targets branch off the inverted trajectory at
    ``strength`` (the fraction of the T steps re-denoised with the target prompt) and are
    denoised with their prompt and the inversion's N_t. The branch point is the reconstruction's
    latent at that timestep, which null-text optimisation fits to the DDIM pivot z*_t (the file
    does not store the pivots); strength 0 returns the reconstruction, 1 starts from z_T."""
    schedule, cond_src, cond_tgt, nulls, z_src, corr = _setup(pipe, inversion, targets)
    noise, guide = _steps(pipe, inversion)
    n, w, T = len(targets), inversion.config.guidance_scale, inversion.num_steps
    start = T - int(round(strength * T))
    z_tgt = None
    for i, t in enumerate(tqdm(schedule.timesteps, desc="SDEdit", unit="step", disable=not progress, leave=False)):
        if i == start:
            z_tgt = z_src.expand(n, *z_src.shape[1:]).clone()
        z_src = samplers.guided_step(pipe.eps, schedule, z_src, t, nulls[i], cond_src[i], w, _at(corr, i),
                                     _at(noise, i))
        if z_tgt is not None:
            z_tgt = samplers.guided_step(pipe.eps, schedule, z_tgt, t, nulls[i].expand(n, -1, -1), cond_tgt, w,
                                         noise=_at(noise, i), guide=guide)
            if user_mask is not None:  # outside the mask, the targets follow the source
                m = user_mask.to(z_tgt)
                z_tgt = z_src + m * (z_tgt - z_src)
        samplers.check_finite(z_src if z_tgt is None else torch.cat([z_src, z_tgt]), "SDEdit", t, i, T)
        yield EditStep(i, t, z_src, z_tgt if z_tgt is not None else z_src.expand(n, *z_src.shape[1:]))


@torch.no_grad()
def edict_progressive(pipe, inversion, targets: list[str], controller: Controller | None, start: int = 0,
                      progress: bool = False, user_mask: Tensor | None = None) -> Iterator[EditStep]:
    """The edit loop of an EDICT inversion: every row runs EDICT's coupled sampling
    (:func:`nulltext.inversion.exact.edict_sample_progressive`), the source from the file's
    coupled latent exactly as reconstruction does (its x is the reconstruction bit for bit), the
    targets with their prompt (EDICT's own edit). With a ``controller`` (Prompt-to-Prompt) each of
    the two updates of a step runs the source pass, then the targets' with the source's maps; the
    local blend acts on both latents of the pair after the mixing. Without (SDEdit), the targets
    branch off the source's pair at step ``start``, ``user_mask`` keeping the source outside it."""
    schedule, cond_src, cond_tgt, nulls, _, _ = _setup(pipe, inversion, targets)
    n, w = len(targets), inversion.config.guidance_scale
    src = list(inversion.coupled_latent.to(pipe.device)[:, None].double().unbind(0))  # [x_T, y_T], (1, C, h, w)
    tgt = None
    ctx = (installed(pipe.denoiser, controller, pipe.attention_sites(tuple(src[0].shape[-2:])))
           if controller is not None else contextlib.nullcontext())
    with ctx:
        for i, t in enumerate(tqdm(schedule.timesteps, desc="EDICT", unit="step", disable=not progress, leave=False)):
            if n and tgt is None and i >= start:
                tgt = [z.expand(n, *z.shape[1:]).clone() for z in src]
            coef = schedule.affine_step(t)
            if controller is not None:
                controller.begin_step(i)
            for k in exact.edict_order(i):
                if controller is not None:
                    controller.phase = SOURCE
                src[k] = exact.edict_forward(src[k], exact.guided64(pipe.eps, src[1 - k], t, nulls[i], cond_src[i], w),
                                             coef)
                if tgt is not None:
                    if controller is not None:
                        controller.phase = TARGET
                    eps = exact.guided64(pipe.eps, tgt[1 - k], t, nulls[i].expand(n, -1, -1), cond_tgt, w)
                    tgt[k] = exact.edict_forward(tgt[k], eps, coef)
            exact.edict_mix(src)
            mask = None
            if tgt is not None:
                exact.edict_mix(tgt)
                for k in range(2):
                    if controller is not None:
                        tgt[k] = controller.end_step(src[k], tgt[k])
                    elif user_mask is not None:
                        tgt[k] = src[k] + user_mask.to(tgt[k]) * (tgt[k] - src[k])
                blend = getattr(controller, "local_blend", None)
                mask = blend.last_mask if blend is not None else None
            x_src = src[0].float()
            x_tgt = tgt[0].float() if tgt is not None else x_src.expand(n, *x_src.shape[1:])
            samplers.check_finite(torch.cat([x_src, x_tgt]), "EDICT editing", t, i, schedule.num_steps)
            yield EditStep(i, t, x_src, x_tgt, mask)


@torch.no_grad()
def sdedit_noise_progressive(pipe, photo: PhotoLatent, targets: list[str], strength: float, seed: int = 0,
                             progress: bool = False, user_mask: Tensor | None = None) -> Iterator[EditStep]:
    """Plain SDEdit (Meng et al. 2022; the baseline of the paper's Fig. 8): the photo's latent z0
    noised to the timestep t0 where the last ``round(strength * T)`` steps start, with Gaussian
    noise drawn with ``seed`` (the scheduler's forward process; one draw for all targets), then
    denoised with each target prompt and the empty prompt's embedding N0 at the guidance of
    ``photo.config``. No inversion: the source row stays z0 (it decodes to the VAE's round trip,
    which strength 0 returns). With ``user_mask``, after each step the targets keep outside it
    the photo's latent noised, with the same noise, to the level they are at."""
    schedule, T, n = pipe.schedule(photo.num_steps, tuple(photo.z0.shape[-2:])), photo.num_steps, len(targets)
    cond = torch.cat([encode_prompt(pipe, t) for t in targets])  # (n, L, d)
    null = encode_null(pipe).expand(n, -1, -1)
    w = photo.config.guidance_scale
    z0 = photo.z0.to(pipe.device)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0)
    start = T - int(round(strength * T))
    timesteps = list(schedule.timesteps)
    z_tgt = None
    for i, t in enumerate(tqdm(timesteps, desc="SDEdit", unit="step", disable=not progress, leave=False)):
        if i == start:
            z_tgt = schedule.add_noise(z0, noise, t).expand(n, *z0.shape[1:]).clone()
        if z_tgt is not None:
            z_tgt = samplers.guided_step(pipe.eps, schedule, z_tgt, t, null, cond, w)
            if user_mask is not None:  # outside the mask: the photo at the noise level reached
                src = z0 if i + 1 == T else schedule.add_noise(z0, noise, timesteps[i + 1])
                z_tgt = src + user_mask.to(z_tgt) * (z_tgt - src)
            samplers.check_finite(z_tgt, "SDEdit", t, i, T)
        yield EditStep(i, t, z0, z_tgt if z_tgt is not None else z0.expand(n, *z0.shape[1:]))


def edit_mask(inversion, mask) -> Tensor:
    """A user's mask (see :func:`nulltext.image.load_mask`) at the inversion's image size."""
    return load_mask(mask, inversion.image_size, original_size(inversion), inversion.config.crop)


def _check_plan(plan: EditPlan, inversion) -> None:
    """A plan runs on the inversion it was made for (a programming error otherwise, not the user's),
    and plain SDEdit on a photo's latent, everything else on an inversion (the user's choice)."""
    if (plan.source, plan.num_steps, plan.latent_hw) != (inversion.prompt, inversion.num_steps, latent_size(inversion)):
        raise ValueError("this EditPlan was made for another inversion (prompt, steps or latent size differ)")
    from_noise = plan.config.method == "sdedit" and plan.config.sdedit_from == "noise"
    if from_noise and not isinstance(inversion, PhotoLatent):
        raise NulltextError("plain SDEdit (sdedit_from='noise'; --from noise on the command line) starts from the "
                            "photo's latent z0, which an inversion does not store: edit the photo itself "
                            "(nulltext.editing.photo_latent; IMAGE --prompt CAPTION on the command line)")
    if isinstance(inversion, PhotoLatent) and not from_noise:
        raise NulltextError("a photo's latent is edited by plain SDEdit only (method 'sdedit', sdedit_from 'noise'; "
                            "--method sdedit --from noise on the command line); other edits need its inversion")
    plan.start()


def run(pipe, inversion, plan: EditPlan, progress: bool = False) -> Iterator[EditStep]:
    """Run a checked plan on ``inversion`` (a :class:`PhotoLatent` for plain SDEdit); yields an
    :class:`EditStep` per step."""
    _check_plan(plan, inversion)
    if isinstance(inversion, PhotoLatent):
        yield from sdedit_noise_progressive(pipe, inversion, plan.targets, plan.config.sdedit_strength,
                                            plan.config.noise_seed, progress, plan.latent_mask)
        return
    if inversion.coupled_latent is not None:  # EDICT: its coupled sampling for every row
        T = inversion.num_steps
        start = T - int(round(plan.config.sdedit_strength * T)) if plan.controller is None else 0
        yield from edict_progressive(pipe, inversion, plan.targets, plan.controller, start, progress, plan.latent_mask)
        return
    if plan.controller is None:
        yield from sdedit_progressive(pipe, inversion, plan.targets, plan.config.sdedit_strength, progress,
                                      plan.latent_mask)
        return
    yield from run_controlled(pipe, inversion, plan.targets, plan.controller, progress)


def _plan(pipe, inversion, targets, config, stores, mask) -> EditPlan:
    if isinstance(targets, EditPlan):
        if config is not None or stores or mask is not None:
            raise ValueError("an EditPlan carries its own config, stores and mask")
        return targets
    return plan_for(pipe, inversion, request(targets, config, mask), stores)


def edit_progressive(pipe, inversion, targets: Sequence[str] | EditPlan, config: EditConfig | None = None,
                     stores: Sequence[AttentionStore] = (), progress: bool = False, mask=None) -> Iterator[EditStep]:
    """Edit ``inversion`` towards each target prompt (or run a plan made by
    :func:`nulltext.editing.plan_for`); yields an :class:`EditStep` per step."""
    yield from run(pipe, inversion, _plan(pipe, inversion, targets, config, stores, mask), progress)


def edit(pipe, inversion, targets: Sequence[str] | str | EditPlan, config: EditConfig | None = None,
         stores: Sequence[AttentionStore] = (), progress: bool = True, decode: bool = True, mask=None) -> EditResult:
    """Edit an inversion with one or more target prompts (or run a plan made by
    :func:`nulltext.editing.plan_for`, checked beforehand).

    Returns the reconstruction (row 0, identical to :func:`nulltext.reconstruct`) and one edited
    image per target. ``stores``: :class:`AttentionStore` objects that record the attention maps
    the UNet used (after edits). ``mask``: where the edit may change the image (white; a path, PIL
    image or (H, W) array at the photo's or the inverted size, see :func:`nulltext.image.load_mask`).
    It becomes the local blend (``config.mask_mode``: intersected with the blend words' mask, or
    replacing it), and each edited image keeps the reconstruction's pixels outside it.

    Plain SDEdit (``config.sdedit_from="noise"``) edits a :class:`PhotoLatent` (see
    :func:`nulltext.editing.photo_latent`) in place of an inversion; row 0 is then the photo's
    VAE round trip."""
    plan = _plan(pipe, inversion, targets, config, stores, mask)
    last = None
    for last in run(pipe, inversion, plan, progress):
        pass
    latents = torch.cat([last.source, last.targets])
    result = EditResult(prompts=[inversion.prompt, *plan.targets], modes=list(plan.modes), latents=latents)
    if decode:
        # the source row alone, as reconstruct() decodes it, so its pixels match too
        result.images = decode_latents(pipe, last.source) + (decode_latents(pipe, last.targets) if plan.targets else [])
        if plan.mask is not None:  # the VAE's decoder reaches across the mask's edge: paste the outside back
            result.images = [result.images[0],
                             *(composite(im, result.images[0], plan.mask) for im in result.images[1:])]
    return result

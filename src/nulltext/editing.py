"""Editing an inversion with text: the explicit loop over the denoising steps.

Every step runs two UNet passes, each a classifier-free-guidance batch [uncond..., cond...]:

1. the **source** row, exactly as :func:`nulltext.inversion.reconstruct_latent` computes it (same
   function, same batch shape, the layers' own processors producing the output), so the source
   row *is* the reconstruction whatever the number of targets; its attention probabilities are
   computed beside it for the controller;
2. all **target** rows in one batch, with the controller replacing their attention maps.

Then the local blend, if any. All rows start from z_T and use the inversion's N_t.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import alignment, samplers
from .config import EditConfig
from .controllers import (SOURCE, TARGET, AttentionStore, Controller, CrossEdit, LocalBlend, P2PController,
                          Refine, Replace, Reweight, build_cross_alphas, schedule_bounds)
from .errors import NulltextError
from .processors import installed
from .text import check_prompt


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


# ---------------------------------------------------------------------------------------------
# Building the controller from prompts


def _check_prompts(tokenizer, source: str, targets: Sequence[str]) -> list[str]:
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise NulltextError("no target prompt given: pass at least one --target")
    for t in targets:
        check_prompt(t, "target prompt")
    for p in (source, *targets):
        alignment.check_length(tokenizer, p)
    return targets


def _warn_words(pipe, source: str, targets: Sequence[str]) -> None:
    """One place for the unknown-word warning of edits, so a command that validates and then edits
    shows it once. Only the targets' new words: the source prompt's were named at its inversion."""
    from .text import warn_split_words

    warn_split_words(pipe, targets, skip=source)


def resolve_modes(tokenizer, source: str, targets: Sequence[str], mode: str) -> list[str]:
    """The mode of each target: ``auto`` picks replace for the same token count (and the same
    number of words, so they can be swapped one for one), else refine."""
    if mode == "auto":  # replace needs the same tokens and words, one for one
        def swappable(t: str) -> bool:
            try:
                alignment.replacement_mapper(tokenizer, source, t)
            except NulltextError:
                return False
            return True

        return ["replace" if swappable(t) else "refine" for t in targets]
    return [mode] * len(targets)


class PerTarget(CrossEdit):
    """Different edits for different target rows (e.g. ``auto`` picking replace for one target
    and refine for another): edit r acts on row r."""

    def __init__(self, edits: Sequence[CrossEdit]) -> None:
        self.edits = list(edits)

    def __call__(self, src: Tensor, tgt: Tensor) -> Tensor:
        return torch.cat([e(src, tgt[r:r + 1]) for r, e in enumerate(self.edits)])


def _cross_edit(tokenizer, source: str, targets: list[str], modes: list[str]) -> CrossEdit:
    def one(kind: str, rows: list[str]) -> CrossEdit:
        if kind == "replace":
            return Replace(torch.stack([alignment.replacement_mapper(tokenizer, source, t) for t in rows]))
        maps = [alignment.refinement_mapper(tokenizer, source, t) for t in rows]
        return Refine(torch.stack([m for m, _ in maps]), torch.stack([a for _, a in maps]))

    if len(set(modes)) == 1:
        return one(modes[0], targets)
    return PerTarget([one(m, [t]) for m, t in zip(modes, targets)])


def _cross_overrides(tokenizer, targets: list[str], spec) -> tuple[object, list]:
    if not isinstance(spec, dict):
        return spec, []
    default = (0.0, 1.0)  # the release's default when the dict names none
    overrides = []
    for word, value in spec.items():
        if word in ("default", "default_"):
            default = value
            continue
        found = False
        for r, t in enumerate(targets):
            pos = alignment.word_positions(tokenizer, t, word)
            if pos:
                overrides.append((r, pos, value))
                found = True
        if not found:
            raise NulltextError(f"cross-replace word {word!r} is not in the target prompt"
                                f"{'s' if len(targets) > 1 else ''} {', '.join(map(repr, targets))}")
    return default, overrides


def _equalizer(tokenizer, targets: list[str], reweight) -> Tensor:
    L = tokenizer.model_max_length
    eq = torch.ones(len(targets), L)
    for word, factor in reweight:
        found = False
        for r, t in enumerate(targets):
            pos = alignment.word_positions(tokenizer, t, word)
            if pos:
                eq[r, pos] = float(factor)
                found = True
        if not found:
            raise NulltextError(f"reweight word {word!r} is not in the target prompt"
                                f"{'s' if len(targets) > 1 else ''} {', '.join(map(repr, targets))}")
    return eq


def blend_size(sites, latent_hw: tuple[int, int], factor: int) -> tuple[int, int]:
    """Size of the cross-attention layers the blend mask is built from: latent / factor (the
    release: 16x16 for a 64x64 latent) or, when no down/up cross-attention layer has that size,
    the nearest size one has."""
    sizes = sorted({s.size for s in sites.values() if s.is_cross and s.place in ("down", "up")})
    if not sizes:
        raise NulltextError("this UNet has no cross-attention layers to build a blend mask from")
    want = (max(1, latent_hw[0] // factor), max(1, latent_hw[1] // factor))
    if want in sizes:
        return want
    area = want[0] * want[1]
    return min(sizes, key=lambda s: (abs(math.log(s[0] * s[1] / area)), s[0] * s[1]))


def _local_blend(tokenizer, source: str, targets: list[str], config: EditConfig, num_steps: int,
                 size: tuple[int, int], user_mask: Tensor | None = None) -> LocalBlend:
    if not config.blend:  # a user mask alone
        return LocalBlend(None, size=size, start_step=int(config.blend_start * num_steps), user_mask=user_mask,
                          user_mode="replace")
    L = tokenizer.model_max_length
    prompts = [source, *targets]
    words = torch.zeros(len(prompts), L)
    for word in config.blend_source:
        words[0, alignment.require_positions(tokenizer, source, word, "blend")] = 1.0
    for word in config.blend_target:
        found = False
        for r, t in enumerate(targets, start=1):
            pos = alignment.word_positions(tokenizer, t, word)
            if pos:
                words[r, pos] = 1.0
                found = True
        if not found:
            raise NulltextError(f"blend word {word!r} is not in the target prompt"
                                f"{'s' if len(targets) > 1 else ''} {', '.join(map(repr, targets))}")
    subtract = None
    if config.blend_subtract:
        subtract = torch.zeros(len(prompts), L)
        for word in config.blend_subtract:
            hits = [(r, alignment.word_positions(tokenizer, p, word)) for r, p in enumerate(prompts)]
            if not any(pos for _, pos in hits):
                raise NulltextError(f"blend-subtract word {word!r} is in none of the prompts")
            for r, pos in hits:
                subtract[r, pos] = 1.0
    return LocalBlend(words, size=size, start_step=int(config.blend_start * num_steps),
                      threshold=config.blend_threshold, subtract=subtract,
                      subtract_threshold=config.blend_subtract_threshold, user_mask=user_mask,
                      user_mode=config.mask_mode)


def build_controller(pipe, source: str, targets: list[str], config: EditConfig, num_steps: int,
                     latent_hw: tuple[int, int], stores: Sequence[AttentionStore] = (),
                     user_mask: Tensor | None = None) -> tuple[P2PController, list[str]]:
    """The Prompt-to-Prompt controller of an edit, and the mode used for each target.
    ``user_mask``: (1, 1, h, w) boolean at the latent size, where edits may happen."""
    tok = pipe.tokenizer
    modes = resolve_modes(tok, source, targets, config.mode)
    cross = _cross_edit(tok, source, targets, modes)
    if config.reweight:
        cross = Reweight(_equalizer(tok, targets, config.reweight), prev=cross)
    default, overrides = _cross_overrides(tok, targets, config.cross_replace)
    alphas = build_cross_alphas(num_steps, len(targets), tok.model_max_length, default, overrides)
    self_steps = schedule_bounds(config.self_replace, num_steps)
    blend = None
    if config.blend:
        size = blend_size(pipe.attention_sites(latent_hw), latent_hw, config.blend_factor)
        blend = _local_blend(tok, source, targets, config, num_steps, size, user_mask)
    elif user_mask is not None:
        blend = _local_blend(tok, source, targets, config, num_steps, (1, 1), user_mask)
    controller = P2PController(cross, alphas, self_steps=self_steps, self_max_keys=config.self_max_keys,
                               local_blend=blend, stores=stores)
    return controller, modes


def validate(pipe, source: str, targets: Sequence[str], config: EditConfig, num_steps: int,
             latent_hw: tuple[int, int]) -> list[str]:
    """Every prompt error of an edit (empty targets, token counts, words missing from their
    prompt) before any sampling; returns the mode of each target."""
    targets = _check_prompts(pipe.tokenizer, source, targets)
    _warn_words(pipe, source, targets)
    if config.method == "sdedit":
        return ["sdedit"] * len(targets)
    return build_controller(pipe, source, targets, config, num_steps, latent_hw)[1]


# ---------------------------------------------------------------------------------------------
# The loops


def _setup(pipe, inversion, targets):
    from .text import encode_prompt

    schedule = pipe.schedule(inversion.num_steps)
    cond_src = encode_prompt(pipe, inversion.prompt)  # (1, L, d), as reconstruct_latent
    cond_tgt = torch.cat([encode_prompt(pipe, t) for t in targets]) if targets else None  # (n, L, d)
    nulls = inversion.step_nulls(pipe.device)  # (T, 1, L, d), as reconstruct_latent
    z_T = inversion.latent_T.to(pipe.device)  # (1, C, h, w)
    # Direct Inversion's corrections act on the source branch only (Ju et al.), as in reconstruction
    corr = inversion.step_corrections(pipe.device)  # (T, 1, C, h, w) or None
    return schedule, cond_src, cond_tgt, nulls, z_T, corr


@torch.no_grad()
def run_controlled(pipe, inversion, targets: list[str], controller: Controller,
                   progress: bool = False, desc: str = "editing") -> Iterator[EditStep]:
    """The edit loop with any controller installed (targets may be empty: source only).

    The processors stay installed while the generator is suspended: run it to the end, or close
    it (``contextlib.closing``) before using the UNet for anything else."""
    schedule, cond_src, cond_tgt, nulls, z_src, corr = _setup(pipe, inversion, targets)
    n, w = len(targets), inversion.config.guidance_scale
    z_tgt = z_src.expand(n, *z_src.shape[1:]).clone()
    with installed(pipe.denoiser, controller, pipe.attention_sites(tuple(z_src.shape[-2:]))):
        for i, t in enumerate(tqdm(schedule.timesteps, desc=desc, unit="step", disable=not progress, leave=False)):
            controller.begin_step(i)
            # 1. source row: the reconstruction's own computation
            controller.phase = SOURCE
            z_src = samplers.guided_step(pipe.eps, schedule, z_src, t, nulls[i], cond_src, w,
                                     None if corr is None else corr[i])
            mask = None
            if n:
                # 2. all targets in one batch, attention edited from the source's maps
                controller.phase = TARGET
                z_tgt = samplers.guided_step(pipe.eps, schedule, z_tgt, t, nulls[i].expand(n, -1, -1), cond_tgt, w)
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
    n, w, T = len(targets), inversion.config.guidance_scale, inversion.num_steps
    start = T - int(round(strength * T))
    z_tgt = None
    for i, t in enumerate(tqdm(schedule.timesteps, desc="SDEdit", unit="step", disable=not progress, leave=False)):
        if i == start:
            z_tgt = z_src.expand(n, *z_src.shape[1:]).clone()
        z_src = samplers.guided_step(pipe.eps, schedule, z_src, t, nulls[i], cond_src, w,
                                 None if corr is None else corr[i])
        if z_tgt is not None:
            z_tgt = samplers.guided_step(pipe.eps, schedule, z_tgt, t, nulls[i].expand(n, -1, -1), cond_tgt, w)
            if user_mask is not None:  # outside the mask, the targets follow the source
                m = user_mask.to(z_tgt)
                z_tgt = z_src + m * (z_tgt - z_src)
        samplers.check_finite(z_src if z_tgt is None else torch.cat([z_src, z_tgt]), "SDEdit", t, i, T)
        yield EditStep(i, t, z_src, z_tgt if z_tgt is not None else z_src.expand(n, *z_src.shape[1:]))


def edit_mask(inversion, mask) -> Tensor:
    """A user's mask (see :func:`nulltext.image.load_mask`) at the inversion's image size."""
    from .image import load_mask

    original = inversion.meta.get("image", {}).get("original_size")
    return load_mask(mask, inversion.image_size, tuple(original) if original else None, inversion.config.crop)


def edit_progressive(pipe, inversion, targets: Sequence[str], config: EditConfig | None = None,
                     stores: Sequence[AttentionStore] = (), progress: bool = False, mask=None) -> Iterator[EditStep]:
    """Edit ``inversion`` towards each target prompt; yields an :class:`EditStep` per step."""
    from .image import latent_mask

    config = config or EditConfig()
    targets = _check_prompts(pipe.tokenizer, inversion.prompt, targets)
    latent_hw = tuple(inversion.latent_T.shape[-2:])
    user = None if mask is None else latent_mask(edit_mask(inversion, mask), latent_hw)
    if config.method == "sdedit":
        yield from sdedit_progressive(pipe, inversion, targets, config.sdedit_strength, progress, user)
        return
    controller, _ = build_controller(pipe, inversion.prompt, targets, config, inversion.num_steps, latent_hw,
                                     stores, user)
    yield from run_controlled(pipe, inversion, targets, controller, progress)


def edit(pipe, inversion, targets: Sequence[str] | str, config: EditConfig | None = None,
         stores: Sequence[AttentionStore] = (), progress: bool = True, decode: bool = True, mask=None) -> EditResult:
    """Edit an inversion with one or more target prompts.

    Returns the reconstruction (row 0, identical to :func:`nulltext.reconstruct`) and one edited
    image per target. ``stores``: :class:`AttentionStore` objects that record the attention maps
    the UNet used (after edits). ``mask``: where the edit may change the image (white; a path, PIL
    image or (H, W) array at the photo's or the inverted size, see :func:`nulltext.image.load_mask`).
    It becomes the local blend (``config.mask_mode``: intersected with the blend words' mask, or
    replacing it), and each edited image keeps the reconstruction's pixels outside it."""
    from .image import composite, latent_mask
    from .image import decode as decode_latents

    config = config or EditConfig()
    targets = _check_prompts(pipe.tokenizer, inversion.prompt, targets)
    _warn_words(pipe, inversion.prompt, targets)
    latent_hw = tuple(inversion.latent_T.shape[-2:])
    pixels = None if mask is None else edit_mask(inversion, mask)
    user = None if pixels is None else latent_mask(pixels, latent_hw)
    if config.method == "sdedit":
        modes = ["sdedit"] * len(targets)
        steps = sdedit_progressive(pipe, inversion, targets, config.sdedit_strength, progress, user)
    else:
        controller, modes = build_controller(pipe, inversion.prompt, targets, config, inversion.num_steps,
                                             latent_hw, stores, user)
        steps = run_controlled(pipe, inversion, targets, controller, progress)
    last = None
    for last in steps:
        pass
    latents = torch.cat([last.source, last.targets])
    result = EditResult(prompts=[inversion.prompt, *targets], modes=modes, latents=latents)
    if decode:
        # the source row alone, as reconstruct() decodes it, so its pixels match too
        result.images = decode_latents(pipe, last.source) + decode_latents(pipe, last.targets)
        if pixels is not None:  # the VAE's decoder reaches across the mask's edge: paste the outside back
            result.images = [result.images[0], *(composite(im, result.images[0], pixels) for im in result.images[1:])]
    return result


# ---------------------------------------------------------------------------------------------
# Attention maps


@dataclass
class AttentionMaps:
    prompts: list[str]
    tokens: list[list[str]]  # per prompt: decoded tokens incl. start and end
    maps: Tensor  # (rows, h, w, K): averaged over steps, heads and layers at ``size``
    size: tuple[int, int]
    images: list  # reconstruction (and edits)


def attention_store(pipe, latent_hw: tuple[int, int], config: EditConfig | None = None,
                    size: tuple[int, int] | None = None) -> tuple[AttentionStore, tuple[int, int]]:
    """A store of the cross-attention layers at ``size`` (default: the blend size, 16x16 for a
    512 image as the release shows) and that size."""
    config = config or EditConfig()
    sites = pipe.attention_sites(latent_hw)
    size = tuple(size) if size else blend_size(sites, latent_hw, config.blend_factor)
    if not any(s.size == size and s.is_cross for s in sites.values()):
        have = sorted({s.size for s in sites.values() if s.is_cross})
        raise NulltextError(f"no cross-attention layer at {size[0]}x{size[1]}; this UNet has "
                            + ", ".join(f"{h}x{w}" for h, w in have))
    return AttentionStore(cross=True, self_attn=False, max_queries=size[0] * size[1]), size


def maps_from_store(pipe, store: AttentionStore, size: tuple[int, int], prompts: list[str],
                    images: list) -> AttentionMaps:
    """Average a filled :func:`attention_store` into per-token maps."""
    places = ("down", "up")  # as the release's aggregate_attention; mid only if nothing else has that size
    if not any(s.size == size and s.is_cross and s.place in places for s in store.sites.values()):
        places = ("mid",)
    maps = store.average(size, places=places)
    tokens = [[pipe.tokenizer.decode([i]) for i in alignment.prompt_tokens(pipe.tokenizer, p)] for p in prompts]
    return AttentionMaps(list(prompts), tokens, maps, size, images)


def attention_maps(pipe, inversion, targets: Sequence[str] = (), config: EditConfig | None = None,
                   progress: bool = True, size: tuple[int, int] | None = None) -> AttentionMaps:
    """The cross-attention map of each token, averaged over the steps, heads and the layers at
    ``size`` (default: the blend size, 16x16 for a 512 image as the release shows), for the
    source prompt over its reconstruction and, with ``targets``, for each edit (the maps the
    UNet used, after the edit's controllers)."""
    config = config or EditConfig()
    latent_hw = tuple(inversion.latent_T.shape[-2:])
    store, size = attention_store(pipe, latent_hw, config, size)
    targets = list(targets)
    if targets:
        if config.method == "sdedit":
            raise NulltextError("attention maps are recorded for P2P edits; use --method p2p")
        result = edit(pipe, inversion, targets, config, stores=[store], progress=progress)
        return maps_from_store(pipe, store, size, result.prompts, result.images)
    from .image import decode as decode_latents

    last = None
    for last in run_controlled(pipe, inversion, [], store, progress, desc="attention"):
        pass
    return maps_from_store(pipe, store, size, [inversion.prompt], decode_latents(pipe, last.source))

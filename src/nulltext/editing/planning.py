"""Planning an edit: every check of an edit runs here once, before any sampling, and the result is
an :class:`EditPlan` that the loops (:mod:`.loops`) run.

Two stages, so that a command can fail before the work each needs:

1. :func:`request` needs no model: the target prompts are text, the options are valid, the user's
   mask is read and decoded (once);
2. :func:`plan` needs the tokenizer and the UNet's layers, not the inversion: token counts, words
   found in their prompts, the Prompt-to-Prompt mode of each target, the controller, the mask at
   the image's size. :func:`plan_for` takes those facts from an inversion; the command line plans
   an edit of a photo before inverting it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import alignment
from ..config import EditConfig, InversionConfig
from ..controllers import (
    AttentionStore,
    Controller,
    CrossEdit,
    Keep,
    LocalBlend,
    P2PController,
    Refine,
    Replace,
    Reweight,
    build_cross_alphas,
    schedule_bounds,
)
from ..editors import Editor, MasaCtrl, ObjectMasks, PlugAndPlay, masactrl_layers, pnp_layers
from ..errors import NulltextError
from ..image import as_source, encode, latent_mask, load_mask, output_size, preprocess, read_mask
from ..text import check_prompt, warn_split_words


@dataclass(frozen=True)
class EditRequest:
    """An edit's targets, options and mask, checked without a model (:func:`request`)."""

    targets: tuple[str, ...]
    config: EditConfig
    mask: object = None  # the user's mask, decoded (a one-channel PIL image, an array or a tensor), or None


@dataclass
class PhotoLatent:
    """A photo that plain SDEdit (``sdedit_from="noise"``) edits without inverting it: its latent z0,
    its caption (the source prompt) and the settings it was encoded and is sampled with
    (:func:`photo_latent`, or :meth:`of_inversion` beside an inversion of the same photo)."""

    z0: Tensor  # (1, C, h, w) float32: s * mean(E(x)) of the preprocessed photo
    prompt: str
    config: InversionConfig  # the steps T and the guidance w of the edit; the size and crop it was made with
    image_size: tuple[int, int]  # (width, height) of the preprocessed photo
    original_size: tuple[int, int] | None = None  # the photo's size before preprocessing (for a mask drawn on it)

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    @classmethod
    def of_inversion(cls, pipe, inversion, photo) -> "PhotoLatent":
        """The latent of ``photo``, the preprocessed photo (PIL) that ``inversion`` inverted, with
        the inversion's caption and settings."""
        return cls(encode(pipe, photo), inversion.prompt, inversion.config, inversion.image_size,
                   original_size(inversion))


def photo_latent(pipe, image, prompt: str, config: InversionConfig | None = None) -> PhotoLatent:
    """A photo (a path or PIL image) preprocessed and encoded as an inversion would be with
    ``config`` (its size and crop; its steps and guidance are the edit's), for plain SDEdit."""
    config = config or InversionConfig()
    source = as_source(image)
    size = output_size(config.size, source.image.size, config.crop, pipe.native_size, pipe.size_multiple)
    pixels = preprocess(source.image, size=size, crop=config.crop, multiple=pipe.size_multiple)
    return PhotoLatent(encode(pipe, pixels), prompt, config, tuple(pixels.size), tuple(source.image.size))


def latent_size(source) -> tuple[int, int]:
    """(h, w) of the latent an edit of ``source`` (an inversion or a :class:`PhotoLatent`) runs at."""
    return tuple((source.z0 if isinstance(source, PhotoLatent) else source.latent_T).shape[-2:])


@dataclass
class EditPlan:
    """An edit checked against a model, ready to run (:func:`plan`). The controller and the
    attention stores keep the run's state: a plan runs once (:func:`nulltext.editing.edit` plans
    each call afresh)."""

    source: str  # the source prompt (the inversion's)
    targets: list[str]
    config: EditConfig
    num_steps: int
    latent_hw: tuple[int, int]
    modes: list[str]  # per target: "replace" | "refine" | "sdedit" | "masactrl" | "pnp"
    controller: Controller | None  # None for SDEdit; the attention store alone without targets
    mask: Tensor | None = None  # (H, W) bool at the image's size: where the edit may change it
    latent_mask: Tensor | None = None  # (1, 1, h, w) bool: the same at the latent's size
    attention: AttentionStore | None = None  # records the cross-attention maps, when asked for
    attention_size: tuple[int, int] | None = None
    used: bool = False

    def start(self) -> None:
        """Mark the plan as running (its controller's state is this run's)."""
        if self.used:
            raise RuntimeError("an EditPlan runs once: plan the edit again to run it again")
        self.used = True


def request(targets: Sequence[str] | str, config: EditConfig | None = None, mask=None,
            what: str = "target prompt", required: bool = True) -> EditRequest:
    """The checks of an edit that need no model: at least one target (none is fine where not
    ``required``: the attention maps of the source prompt alone), each text without control
    characters and not empty; the mask (a path is read and decoded here, once). ``what`` names a
    target in messages (the command line says ``--target``)."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets and required:
        raise NulltextError("no target prompt given" + (f": pass at least one {what}" if what.startswith("-") else ""))
    for t in targets:
        check_prompt(t, what)
    if isinstance(mask, (str, bytes)) or hasattr(mask, "__fspath__"):
        mask = read_mask(mask)  # missing, unreadable or all black: refused before any model work
    return EditRequest(tuple(targets), config or EditConfig(), mask)


def plan(pipe, req: EditRequest, source: str, num_steps: int, latent_hw: tuple[int, int],
         image_size: tuple[int, int] | None = None, original_size: tuple[int, int] | None = None,
         crop=(0, 0, 0, 0), stores: Sequence[AttentionStore] = (), attention=None) -> EditPlan:
    """Check ``req`` against the model and the inversion's facts (its source prompt, T, latent size,
    image size, the photo's original size and crop, for a mask drawn on the photo) and build the
    controller. ``stores``: attention stores to fill while editing (after the edit's changes);
    ``attention``: True or a (h, w) size to record the cross-attention maps (:attr:`EditPlan.attention`)."""
    targets, config = list(req.targets), req.config
    if not targets and not attention:
        raise NulltextError("no target prompt given")
    spaces = token_spaces(pipe)
    for p in (source, *targets):
        alignment.spaces_check(spaces, p)
    # the targets' new words only: the source prompt's were named at its inversion
    warn_split_words(pipe, targets, skip=source)
    pixels = user = None
    if req.mask is not None:
        if image_size is None:
            f = pipe.vae_scale_factor
            image_size = (latent_hw[1] * f, latent_hw[0] * f)
        pixels = load_mask(req.mask, image_size, original_size, crop)
        user = latent_mask(pixels, latent_hw)
    store = size = None
    if attention:
        if config.method != "p2p":
            raise NulltextError("attention maps are recorded for P2P edits; use the p2p method (--method p2p on the command line)")
        store, size = attention_store(pipe, latent_hw, config, None if attention is True else attention)
        stores = [*stores, store]
    if not targets:  # the source prompt's attention maps alone: the store is the controller
        modes, controller = [], store
    elif config.method == "sdedit":
        modes, controller = ["sdedit"] * len(targets), None
    elif config.method in ("masactrl", "pnp"):
        modes = [config.method] * len(targets)
        controller = build_editor(pipe, source, targets, config, num_steps, latent_hw, stores, user)
    else:
        controller, modes = build_controller(pipe, source, targets, config, num_steps, latent_hw, stores, user)
    return EditPlan(source, targets, config, num_steps, tuple(latent_hw), modes, controller, pixels, user,
                    store, size)


def original_size(inversion) -> tuple[int, int] | None:
    """The photo's size before preprocessing, as the inversion file records it (or as a
    :class:`PhotoLatent` holds it)."""
    original = inversion.original_size if isinstance(inversion, PhotoLatent) else inversion.image.original_size
    return tuple(original) if original else None


def plan_for(pipe, inversion, req: EditRequest, stores: Sequence[AttentionStore] = (), attention=None) -> EditPlan:
    """:func:`plan` with the facts of ``inversion`` (or of a :class:`PhotoLatent`)."""
    return plan(pipe, req, inversion.prompt, inversion.num_steps, latent_size(inversion),
                inversion.image_size, original_size(inversion), inversion.config.crop, stores, attention)


def validate(pipe, source: str, targets: Sequence[str], config: EditConfig, num_steps: int,
             latent_hw: tuple[int, int]) -> list[str]:
    """Every prompt error of an edit (empty targets, token counts, words missing from their
    prompt) before any sampling; returns the mode of each target."""
    return plan(pipe, request(targets, config), source, num_steps, latent_hw).modes


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


# ---------------------------------------------------------------------------------------------
# The controller from prompts



def token_spaces(pipe) -> list:
    """Where each tokenizer's tokens sit among the cross-attention keys (the family's
    ``token_spaces``; a bare tokenizer is one space at 0)."""
    spaces = getattr(pipe, "token_spaces", None)
    return list(spaces) if spaces is not None else _spaces(pipe.tokenizer)


def _spaces(tokenizer_or_spaces) -> list:
    if isinstance(tokenizer_or_spaces, (list, tuple)):
        return list(tokenizer_or_spaces)
    return [alignment.TokenSpace(tokenizer_or_spaces, 0, tokenizer_or_spaces.model_max_length)]


def _mappers(spaces, source: str, targets: Sequence[str], mode: str) -> list[tuple[str, object]]:
    """(mode, mapper) of each target, each mapper computed once: ``auto`` takes the word swap's
    mapper where the prompts swap one for one (same tokens and words, in every tokenizer), else
    refine's."""
    spaces, out = _spaces(spaces), []
    for t in targets:
        if mode == "auto":
            try:
                out.append(("replace", alignment.spaces_replacement_mapper(spaces, source, t)))
                continue
            except NulltextError:
                pass  # another token or word count: refine
        kind = "refine" if mode == "auto" else mode
        build = alignment.spaces_replacement_mapper if kind == "replace" else alignment.spaces_refinement_mapper
        out.append((kind, build(spaces, source, t)))
    return out


def resolve_modes(tokenizer, source: str, targets: Sequence[str], mode: str) -> list[str]:
    """The mode of each target: ``auto`` picks replace for the same token count (and the same
    number of words, so they can be swapped one for one), else refine. ``tokenizer``: a tokenizer
    or a list of :class:`nulltext.alignment.TokenSpace`."""
    return [kind for kind, _ in _mappers(tokenizer, source, targets, mode)]


class PerTarget(CrossEdit):
    """Different edits for different target rows (e.g. ``auto`` picking replace for one target
    and refine for another): edit r acts on row r."""

    def __init__(self, edits: Sequence[CrossEdit]) -> None:
        self.edits = list(edits)

    def __call__(self, src: Tensor, tgt: Tensor) -> Tensor:
        return torch.cat([e(src, tgt[r:r + 1]) for r, e in enumerate(self.edits)])


def _cross_edit(mappers: list[tuple[str, object]]) -> CrossEdit:
    def one(kind: str, maps: list) -> CrossEdit:
        if kind == "replace":
            return Replace(torch.stack(maps))
        return Refine(torch.stack([m for m, _ in maps]), torch.stack([a for _, a in maps]))

    kinds = {kind for kind, _ in mappers}
    if len(kinds) == 1:
        return one(kinds.pop(), [m for _, m in mappers])
    return PerTarget([one(kind, [m]) for kind, m in mappers])


def _cross_overrides(spaces, targets: list[str], spec) -> tuple[object, list]:
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
            pos = alignment.spaces_positions(spaces, t, word)
            if pos:
                overrides.append((r, pos, value))
                found = True
        if not found:
            raise NulltextError(f"cross-replace word {word!r} is not in the target prompt"
                                f"{'s' if len(targets) > 1 else ''} {', '.join(map(repr, targets))}")
    return default, overrides


def _equalizer(spaces, targets: list[str], reweight) -> Tensor:
    eq = torch.ones(len(targets), alignment.spaces_length(spaces))
    for word, factor in reweight:
        found = False
        for r, t in enumerate(targets):
            pos = alignment.spaces_positions(spaces, t, word)
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
    sizes = sorted({s.size for s in sites.values() if s.is_cross and s.place in blend_places(sites)})
    if not sizes:
        raise NulltextError("this UNet has no cross-attention layers to build a blend mask from")
    want = (max(1, latent_hw[0] // factor), max(1, latent_hw[1] // factor))
    if want in sizes:
        return want
    area = want[0] * want[1]
    return min(sizes, key=lambda s: (abs(math.log(s[0] * s[1] / area)), s[0] * s[1]))


def blend_places(sites) -> tuple[str, ...]:
    """Where the blend's layers sit: down and up (the release's), or, for a model with no such
    cross-attention layer (SD3's transformer: all "mid"), mid."""
    if any(s.is_cross and s.place in ("down", "up") for s in sites.values()):
        return ("down", "up")
    return ("mid",)


def _local_blend(spaces, source: str, targets: list[str], config: EditConfig, num_steps: int,
                 size: tuple[int, int], user_mask: Tensor | None = None,
                 places: tuple[str, ...] = ("down", "up")) -> LocalBlend:
    if not config.blend:  # a user mask alone
        return LocalBlend(None, size=size, start_step=int(config.blend_start * num_steps), user_mask=user_mask,
                          user_mode="replace")
    L = alignment.spaces_length(spaces)
    prompts = [source, *targets]
    words = torch.zeros(len(prompts), L)
    for word in config.blend_source:
        pos = alignment.spaces_positions(spaces, source, word)
        if not pos:
            raise NulltextError(f"blend word {word!r} is not in the prompt {source!r}")
        words[0, pos] = 1.0
    for word in config.blend_target:
        found = False
        for r, t in enumerate(targets, start=1):
            pos = alignment.spaces_positions(spaces, t, word)
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
            hits = [(r, alignment.spaces_positions(spaces, p, word)) for r, p in enumerate(prompts)]
            if not any(pos for _, pos in hits):
                raise NulltextError(f"blend-subtract word {word!r} is in none of the prompts")
            for r, pos in hits:
                subtract[r, pos] = 1.0
    return LocalBlend(words, size=size, start_step=int(config.blend_start * num_steps),
                      threshold=config.blend_threshold, subtract=subtract,
                      subtract_threshold=config.blend_subtract_threshold, places=places, user_mask=user_mask,
                      user_mode=config.mask_mode)


def build_controller(pipe, source: str, targets: list[str], config: EditConfig, num_steps: int,
                     latent_hw: tuple[int, int], stores: Sequence[AttentionStore] = (),
                     user_mask: Tensor | None = None) -> tuple[P2PController, list[str]]:
    """The Prompt-to-Prompt controller of an edit, and the mode used for each target.
    ``user_mask``: (1, 1, h, w) boolean at the latent size, where edits may happen."""
    spaces = token_spaces(pipe)
    sites = pipe.attention_sites(latent_hw)
    qk = mmdit_qk(sites, config)
    mappers = _mappers(spaces, source, targets, config.mode)
    modes = [kind for kind, _ in mappers]
    # qk control: the targets' maps are their own (no replacement); a reweight scales them
    cross = None if qk else _cross_edit(mappers)
    if config.reweight:
        cross = Reweight(_equalizer(spaces, targets, config.reweight), prev=Keep() if qk else cross)
    default, overrides = _cross_overrides(spaces, targets, config.cross_replace)
    alphas = build_cross_alphas(num_steps, len(targets), alignment.spaces_length(spaces), default, overrides)
    self_steps = (0, 0) if qk else schedule_bounds(config.self_replace, num_steps)
    qk_steps = schedule_bounds(config.qk_steps, num_steps) if qk else (0, 0)
    blend = _blend_of(spaces, sites, source, targets, config, num_steps, latent_hw, user_mask)
    controller = P2PController(cross, alphas, self_steps=self_steps, self_max_keys=config.self_max_keys,
                               local_blend=blend, stores=stores, qk_steps=qk_steps)
    return controller, modes


def _blend_of(spaces, sites, source: str, targets, config: EditConfig, num_steps: int, latent_hw, user_mask):
    """The local blend of an edit: from the --blend words' maps (and the user's mask), from the
    user's mask alone, or none."""
    if config.blend:
        size = blend_size(sites, latent_hw, config.blend_factor)
        return _local_blend(spaces, source, targets, config, num_steps, size, user_mask, blend_places(sites))
    if user_mask is not None:
        return _local_blend(spaces, source, targets, config, num_steps, (1, 1), user_mask)
    return None


def mmdit_qk(sites, config: EditConfig) -> bool:
    """Whether the edit uses the qk control of joint (MMDiT) attention; refused on a model
    without joint attention layers."""
    if config.mmdit_control != "qk":
        return False
    if not any(s.joint for s in sites.values()):
        raise NulltextError("the qk control acts on joint image-text attention (Stable Diffusion 3 and 3.5); "
                            "this model has none: use attention (--mmdit-control on the command line)")
    return True


def build_editor(pipe, source: str, targets: list[str], config: EditConfig, num_steps: int,
                 latent_hw: tuple[int, int], stores: Sequence[AttentionStore] = (),
                 user_mask: Tensor | None = None) -> Editor:
    """The MasaCtrl or Plug-and-Play controller of an edit (:mod:`nulltext.editors`), its layers
    at the relative depth of the authors' SD 1.x layers, with the local blend and the user mask
    as Prompt-to-Prompt has them."""
    spaces, sites = token_spaces(pipe), pipe.attention_sites(latent_hw)
    blend = _blend_of(spaces, sites, source, targets, config, num_steps, latent_hw, user_mask)
    if config.method == "masactrl":
        masks = object_masks(spaces, sites, source, targets, config, latent_hw) if config.masactrl_mask_source else None
        return MasaCtrl(masactrl_layers(sites, config.masactrl_layer), config.masactrl_step, blend, stores, masks)
    features, layers = pnp_layers(sites, pipe.decoder_features)
    return PlugAndPlay(features, layers, schedule_bounds(config.pnp_features, num_steps),
                       schedule_bounds(config.pnp_attention, num_steps), blend, stores)


def object_masks(spaces, sites, source: str, targets: list[str], config: EditConfig,
                 latent_hw: tuple[int, int]) -> ObjectMasks:
    """MasaCtrl's object masks from the cross-attention of the ``--masactrl-mask`` words (the
    source's in the source prompt, the targets' in each target prompt) at 1/4 of the latent size
    (16x16 for a 512 image, the authors'; the nearest size the UNet has; SD3: the image x text
    blocks of the joint attention, at the patch grid)."""
    words = torch.zeros(1 + len(targets), alignment.spaces_length(spaces))
    for r, (prompt, chosen) in enumerate([(source, config.masactrl_mask_source)]
                                         + [(t, config.masactrl_mask_target) for t in targets]):
        for word in chosen:
            pos = alignment.spaces_positions(spaces, prompt, word)
            words[r, pos] = 1.0
        if not words[r].any():
            raise NulltextError(f"none of the MasaCtrl mask words {', '.join(map(repr, chosen))} is in the "
                                f"{'prompt' if r == 0 else 'target prompt'} {prompt!r} (--masactrl-mask on the "
                                "command line)")
    return ObjectMasks(words, blend_size(sites, latent_hw, 4), config.masactrl_mask_threshold)

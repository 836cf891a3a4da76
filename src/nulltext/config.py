"""Frozen configuration dataclasses. Every default is the value of the authors' public release
(Mokady et al., "Null-text Inversion", CVPR 2023; see docs/algorithm.md) unless its comment says otherwise."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import options as cells  # the manifest cells' parsers (name, value) -> value
from .errors import NulltextError
from .options import (
    MAX_SIZE,
    Widget,
    cross_spec,
    fraction_or_range,
    nonneg_float,
    nonneg_int,
    option,
    parse_reweight,  # noqa: F401  (part of this module's API: the web UI's reweight text)
    parse_size,
    positive_float,
    positive_int,
    reweight_pairs,
    words,
)
from .options import crop as parse_crop
from .options import manifest_columns as columns
from .schedules import FlowMatchConfig, SchedulerConfig, finite

# the checkpoint nulltext loads when none is named (a Hugging Face hub id)
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"

# inversion methods: null-text inversion (the paper), its Section-4 ablations (global null-text,
# random pivot, textual inversion with and without a pivot, null-text without a pivot, plain DDIM
# inversion), Negative-Prompt Inversion (Miyake et al. 2023) and Direct Inversion (Ju et al. 2024);
# random-start is the random pivot of files before format 5 (see docs/algorithm.md section 5); the
# exact inversions of inversion/exact.py: edit-friendly DDPM inversion (Huberman-Spiegelglas et al.
# 2024), EDICT (Wallace et al. 2023), and NPI with ProxEdit's proximal guidance (Han et al. 2023)
METHODS = ("nti", "npi", "direct", "global-nti", "random-pivot", "ddim", "textual-inversion",
           "textual-inversion-pivot", "nti-no-pivot", "random-start", "ddpm", "edict", "proxnpi")
PROX_KINDS = ("l0", "l1")  # ProxEdit's proximal operators (inversion.exact.proximal_delta)
# methods that run an optimisation (of the null text, or of C for the textual inversions)
OPTIMISED = ("nti", "global-nti", "random-pivot", "textual-inversion", "textual-inversion-pivot", "nti-no-pivot",
             "random-start")
# methods whose file holds one null embedding per step (the others: one for all steps)
PER_STEP_NULLS = ("nti", "random-pivot", "nti-no-pivot", "random-start")
# methods whose file holds the optimised conditional embedding the source branch uses: one for all
# steps (textual-inversion) or one per step (textual-inversion-pivot)
COND_METHODS = ("textual-inversion", "textual-inversion-pivot")
# methods that draw Gaussian noise per image, seeded by InversionConfig.seed and the image's index
# (the file records the seed); random-start draws its z_T from the seed alone
SEEDED = ("random-pivot", "textual-inversion", "nti-no-pivot")


@dataclass(frozen=True)
class InversionConfig:
    """How an image is inverted (docs/algorithm.md sections Preprocessing, 1 and 2)."""

    num_steps: int = option(  # T, DDIM steps
        50, flag="--steps", metavar="T", parse=positive_int, column="steps", cell=cells.integer_cell,
        help="sampling steps T (DDIM; flow-matching Euler on SD3), at most the scheduler's training timesteps "
             "(1000)",
        widget=Widget("slider", "Steps", {"minimum": 1, "maximum": 200, "step": 1}))
    guidance_scale: float = option(  # w, classifier-free guidance of the optimisation and sampling
        7.5, flag="--guidance", metavar="W", parse=positive_float, column="guidance", cell=cells.number_cell,
        help="classifier-free guidance scale w, positive; reconstruction and edits use the same value",
        widget=Widget("number", "Guidance scale", {"minimum": 0.01}))
    inversion_guidance: float = option(  # ours (the paper's Fig. 9): the DDIM inversion's own guidance scale
        1.0, flag="--inversion-guidance", metavar="W", parse=nonneg_float, column="inversion_guidance",
        cell=cells.number_cell,
        help="classifier-free guidance scale of the DDIM inversion itself (section 1): 1 inverts with the prompt "
             "alone, the pivot of null-text inversion; another W inverts with eps(N0) + W * (eps(C) - eps(N0)), "
             "N0 the empty prompt's embedding (the paper's Fig. 9)")
    num_inner_steps: int = option(  # Adam iterations per timestep at most
        10, flag="--inner-steps", metavar="J", parse=nonneg_int, column="inner_steps", cell=cells.integer_cell,
        help="Adam iterations per timestep at most (0: no optimisation)",
        widget=Widget("slider", "Adam iterations per step at most", {"minimum": 0, "maximum": 50, "step": 1}))
    early_stop_epsilon: float = option(  # epsilon: stop when loss < epsilon + i * early_stop_slope
        1e-5, flag="--early-stop", metavar="EPS", parse=nonneg_float, column="early_stop", cell=cells.number_cell,
        help="epsilon: a timestep stops once its loss < EPS + i * SLOPE (i = timestep index)")
    early_stop_slope: float = option(  # the release's per-timestep growth of the threshold
        2e-5, flag="--early-stop-slope", metavar="SLOPE", parse=nonneg_float, column="early_stop_slope",
        cell=cells.number_cell,
        help="growth of the early-stop threshold per timestep")
    lr: float = option(  # Adam learning rate at the first timestep
        1e-2, flag="--lr", metavar="LR", parse=positive_float, column="lr", cell=cells.number_cell,
        help="Adam learning rate at the first timestep; step i uses LR * (1 - i / max(DECAY, T))")
    lr_decay_steps: float = option(  # lr_i = lr * (1 - i / max(lr_decay_steps, T)): the release's for T <= 100
        100.0, flag="--lr-decay-steps", metavar="DECAY", parse=positive_float, column="lr_decay_steps",
        cell=cells.number_cell,
        help="DECAY of the learning rate's linear decay (the release's 100)")
    # Output size (width, height) in pixels, or one number: the long side, the short one following
    # the image's aspect (both rounded to the model's size multiple); None = the model's native size
    # (unet.config.sample_size * VAE scale factor: 512x512 for SD 1.x, as the release hard-codes).
    size: tuple[int, int] | int | None = option(
        None, flag="--size", metavar="N|WxH", parse=parse_size, column="size", cell=cells.size_cell, with_file="checked",
        default_text="the model's native size, 512x512 for SD 1.x",
        help="size the image is inverted at: WxH pixels (the image centre-cropped to that aspect, then resized), "
             "or N for the long side with the short one following the image's aspect, rounded to the model's "
             "multiple (64 for SD; an N off the multiple is rounded too, with a warning); with an inversion file "
             "it must be the file's",
        widget=Widget("number", "Size: the long side in pixels (0: the model's native size)",
                      {"precision": 0, "minimum": 0, "maximum": MAX_SIZE}, value=0))
    crop: tuple[int, int, int, int] = option(  # pixels cut from left, right, top, bottom first
        (0, 0, 0, 0), flag="--crop", metavar="L,R,T,B", parse=parse_crop, column="crop", cell=cells.crop_cell,
        help="pixels cut from the left, right, top and bottom before the centre crop")
    method: str = option(  # see METHODS
        "nti", flag="--method", qualified="--inversion-method", qualified_where="in edit, attention and batch",
        metavar="METHOD", column="method", cell=cells.text_cell,
        help="nti (null-text inversion), npi (negative-prompt inversion: N_t = C, no optimisation), direct "
             "(Direct Inversion: per-step corrections, no optimisation), ddim (DDIM inversion alone); the paper's "
             "ablations: global-nti (one null embedding for all steps), random-pivot (the pivot is z0 noised with "
             "one seeded Gaussian noise), textual-inversion (optimise C on random noise, Eq. 4), "
             "textual-inversion-pivot (optimise C_t per step around the pivot), nti-no-pivot (optimise N_t on "
             "random noise, Eq. 4); random-start (the random pivot of older files: from Gaussian z_T towards "
             "the DDIM pivots); ddpm (edit-friendly DDPM inversion: eta = 1 steps replaying stored noise maps), "
             "edict (EDICT: a coupled pair of latents, exactly invertible), proxnpi (npi, edited with ProxEdit's "
             "proximal guidance: see --prox)",
        widget=Widget("dropdown", "Inversion method (nti: the paper's; the others: cheaper methods and the "
                      "paper's ablations)", {"choices": list(METHODS)}))
    seed: int = option(  # the random methods' noise (image i of a run: inversion.ablations.noise_seed)
        0, flag="--seed", metavar="N", parse=nonneg_int, column="seed", cell=cells.integer_cell,
        help="seed of the Gaussian noise of random-pivot, textual-inversion, nti-no-pivot and ddpm (the first image "
             "of a run draws with N, the others with seeds derived from N; the file records each, ddpm's its noise maps) and of "
             "random-start's z_T; below 2^31")
    prox: str = option(  # ProxEdit's operator (its code's prox="l0" / "l1"), for method proxnpi
        "l0", flag="--prox", choices=PROX_KINDS, column="prox", cell=cells.text_cell,
        help="proxnpi: the proximal operator on the guidance difference eps(C_target) - eps(N) when editing: l0 "
             "(zero below the threshold, shrunk by it above) or l1 (ProxEdit's second variant); the file records it")
    prox_quantile: float = option(  # ProxEdit's quantile (its code's default 0.7)
        0.7, flag="--prox-quantile", metavar="Q", parse=float, column="prox_quantile", cell=cells.number_cell,
        help="proxnpi: the threshold is the Q-quantile of |eps(C_target) - eps(N)| per target and step, Q in (0, 1); "
             "Q <= 0 is the fixed threshold -Q")
    # SDXL and SD3: optimise the unconditional pooled embedding too (ours; off: only the token embeddings)
    optimize_pooled: bool = option(
        False, flag="--optimize-pooled", action="store_true", column="optimize_pooled", cell=cells.flag_cell,
        help="SDXL and SD3: the null-text optimisation also moves the unconditional pooled embedding (by default "
             "only the token embeddings)")
    scheduler: SchedulerConfig | FlowMatchConfig = field(default_factory=SchedulerConfig)

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
        for name, value in (("guidance", self.guidance_scale), ("inversion-guidance", self.inversion_guidance),
                            ("lr", self.lr), ("early-stop", self.early_stop_epsilon),
                            ("early-stop-slope", self.early_stop_slope), ("lr-decay-steps", self.lr_decay_steps)):
            if not finite(value):
                raise NulltextError(f"{name} must be a finite number, got {value!r}")
        if not self.guidance_scale > 0:
            raise NulltextError(f"guidance must be positive, got {self.guidance_scale!r}")
        if self.inversion_guidance < 0:
            raise NulltextError(f"inversion-guidance must be non-negative, got {self.inversion_guidance!r}")
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
        if self.prox not in PROX_KINDS:
            raise NulltextError(f"unknown proximal operator {self.prox!r}; choose one of {', '.join(PROX_KINDS)}")
        if (isinstance(self.prox_quantile, bool) or not isinstance(self.prox_quantile, (int, float))
                or not finite(self.prox_quantile) or self.prox_quantile >= 1):
            raise NulltextError(f"prox-quantile must be a number below 1, got {self.prox_quantile!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 31:
            raise NulltextError(f"seed must be an integer from 0 to 2^31 - 1, got {self.seed!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["size"] = self.size if self.size is None or isinstance(self.size, int) else list(self.size)
        d["crop"] = list(self.crop)
        return d


EDIT_MODES = ("auto", "replace", "refine")
MASK_MODES = ("intersect", "replace")
MMDIT_CONTROLS = ("attention", "qk")  # how P2P acts on joint (MMDiT) attention: the maps, or the image queries/keys
EDIT_METHODS = ("p2p", "sdedit", "masactrl", "pnp")
BLENDING = ("p2p", "masactrl", "pnp")  # the methods with the local blend and the user mask as a blend
SDEDIT_SOURCES = ("inversion", "noise")  # what SDEdit starts from: the inverted trajectory, or the photo noised


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


def _blend_words(pair) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """--blend SRC TGT (None when not given) -> (blend_source, blend_target)."""
    src, tgt = pair or (None, None)
    return (words(src) if src else (), words(tgt) if tgt else ())


@dataclass(frozen=True)
class EditConfig:
    """How the target prompts edit an inversion (docs/algorithm.md sections 3 and 4).

    Fractions are of the T denoising steps: a number f means the steps in [0, f), a pair (a, b)
    the steps in [a, b). Cross-attention ranges map to steps [int(a*(T+1)), int(b*(T+1))),
    self-attention ranges to [int(a*T), int(b*T)), exactly as the release computes them."""

    method: str = option(  # "p2p" (Prompt-to-Prompt) or "sdedit" (paper 5.2; ours: offered as a baseline)
        "p2p", flag="--method", dest="method", qualified="--edit-method", qualified_where="in eval and batch",
        metavar="METHOD", column="edit_method", cell=cells.text_cell,
        help="p2p (Prompt-to-Prompt), sdedit (SDEdit, from the inversion or from noise: see --from), masactrl "
             "(MasaCtrl: the source's self-attention keys and values; changes poses) or pnp (Plug-and-Play: the "
             "source's decoder features and self-attention maps)",
        widget=Widget("radio", "Method", {"choices": list(EDIT_METHODS)}))
    mode: str = option(  # "replace" (word swap), "refine" (add/remove words), "auto": replace when
        #                  source and target have the same number of tokens, refine otherwise
        "auto", flag="--mode", metavar="MODE", column="mode", cell=cells.text_cell, methods=("p2p",),
        help="replace swaps words one for one (same number of tokens and of words); refine adds or removes words "
             "(tokens aligned by Needleman-Wunsch); auto picks replace when possible, refine otherwise, per target",
        widget=Widget("dropdown", "Mode", {"choices": list(EDIT_MODES)}))
    cross_replace: object = option(  # release default; a fraction, a range, or {word: fraction|range,
        #                              "default": fraction|range} (words missing -> default (0, 1))
        0.8, flag="--cross-replace", metavar="SPEC", parse=cross_spec, column="cross_replace", cell=cells.cross_cell,
        methods=("p2p",),
        help="steps during which the targets' cross-attention is the source's: a fraction 0.8 (the first 80 %), "
             "a range 0.2,0.8, or per word 'tiger=0.4,default=0.8' (word=a:b for a range; without default= the "
             "other tokens are injected at every step, as in the release)",
        widget=Widget("slider", "Cross-attention replaced for this fraction of steps",
                      {"minimum": 0, "maximum": 1, "step": 0.05}))
    self_replace: object = option(  # release default (its word-swap examples also use 0.6)
        0.4, flag="--self-replace", metavar="SPEC", parse=fraction_or_range, column="self_replace", cell=cells.fraction_cell,
        methods=("p2p",), help="fraction (0.4) or range (0.2,0.6) of steps with the source's self-attention",
        widget=Widget("slider", "Self-attention replaced for this fraction of steps",
                      {"minimum": 0, "maximum": 1, "step": 0.05}))
    self_max_keys: int = option(  # self replacement only in layers with at most this many keys
        32 * 32, flag="--self-max-keys", metavar="N", parse=nonneg_int, column="self_max_keys", cell=cells.integer_cell,
        methods=("p2p",),
        help="self-attention is injected only in layers with at most N keys (32x32)")
    reweight: tuple = option(  # ((word, factor), ...): equalizer on target words (release: 2, 5, -2, 0.5)
        (), flag="--reweight", metavar="WORD=FACTOR", parse=reweight_pairs, action="append", arg_default=[],
        convert=lambda groups: tuple(pair for group in groups for pair in group),
        column="reweight", cell=cells.reweight_cell, methods=("p2p",),
        help="scale the attention to a target word during the cross-replace steps: 'fluffy=2', several as "
             "'fluffy=2,smiling=5' or repeated (a manifest cell: 'fluffy=2 smiling=5'); negative values push away",
        widget=Widget("textbox", "Reweight: word=factor, ... (e.g. fluffy=2)", value=""))
    blend_source: tuple = option(  # local blend: words of the source prompt ...
        (), flag="--blend", metavar=("WORDS_SRC", "WORDS_TGT"), nargs=2, arg_default=None,
        fields=("blend_source", "blend_target"), convert=_blend_words, column="blend", cell=cells.blend_cell,
        methods=BLENDING,
        help="local blend: only the region of these source and target words changes (comma-separate several "
             "words on each side; a manifest cell: 'SRC TGT')",
        widget=Widget("textbox", "Local blend: words of the caption whose region may change", value=""))
    blend_target: tuple = option(  # ... and of the target prompts whose region may change (set with --blend)
        (), widget=Widget("textbox", "Local blend: words of the targets whose region may change", value=""))
    blend_subtract: tuple = option(  # optional: words whose region is removed from the blend mask
        (), flag="--blend-subtract", metavar="WORDS", parse=words, column="blend_subtract", cell=cells.words_cell,
        methods=BLENDING,
        help="words whose region is removed from the blend mask")
    blend_start: float = option(  # blend after each step once steps done > int(blend_start * T)
        0.2, flag="--blend-start", metavar="F", parse=float, column="blend_start", cell=cells.number_cell,
        methods=BLENDING,
        help="the local blend (or the mask) acts after each step once more than this fraction of the steps is done")
    blend_threshold: float = option(  # of the mask normalised by its maximum (release th=(.3, .3))
        0.3, flag="--blend-threshold", metavar="X", parse=float, column="blend_threshold", cell=cells.number_cell,
        methods=BLENDING, help="threshold of the blend mask, as a fraction of its maximum")
    blend_subtract_threshold: float = option(
        0.3, flag="--blend-subtract-threshold", metavar="X", parse=float, column="blend_subtract_threshold",
        cell=cells.number_cell, methods=BLENDING,
        help="threshold of the subtracted words' mask, as a fraction of its maximum")
    # blend mask from the cross-attention layers at latent/blend_factor (release: 16x16 of a 64x64
    # latent); when the UNet has none at that size, the nearest size it has
    blend_factor: int = option(
        4, flag="--blend-factor", metavar="N", parse=positive_int, column="blend_factor", cell=cells.integer_cell,
        methods=BLENDING,
        help="the blend mask comes from the cross-attention layers at 1/N of the latent size (the nearest "
             "size the UNet has)")
    mmdit_control: str = option(  # ours: on joint (MMDiT, SD3) attention, replace the maps as P2P, or
        #                            the targets' image queries and keys ("Exploring MMDiT", ICCV 2025)
        "attention", flag="--mmdit-control", choices=MMDIT_CONTROLS, column="mmdit_control", cell=cells.text_cell,
        methods=("p2p",),
        help="Stable Diffusion 3: attention (Prompt-to-Prompt on the image x text block of the joint attention, the "
             "image x image block replaced during --self-replace) or qk (the targets' image queries and keys are the "
             "source's for the --qk-steps fraction; no map is replaced; --reweight and --blend still act)",
        widget=Widget("radio", "Joint attention control (Stable Diffusion 3)", {"choices": list(MMDIT_CONTROLS)}))
    qk_steps: object = option(  # ours: the qk control's steps
        0.2, flag="--qk-steps", metavar="SPEC", parse=fraction_or_range, column="qk_steps", cell=cells.fraction_cell,
        methods=("p2p",),
        help="Stable Diffusion 3 with --mmdit-control qk: fraction (0.2) or range (0.1,0.3) of steps in which the "
             "targets' image queries and keys are the source's")
    sdedit_strength: float = option(  # ours: fraction of the steps SDEdit re-denoises with the target
        0.6, flag="--strength", metavar="S", parse=float, column="strength", cell=cells.number_cell, methods=("sdedit",),
        help="SDEdit: fraction of the steps re-denoised with the target prompt (0: the reconstruction, from noise the "
             "VAE's round trip; 1: from z_T, from noise the photo noised to the first timestep)",
        widget=Widget("slider", "SDEdit strength", {"minimum": 0, "maximum": 1, "step": 0.05}))
    sdedit_from: str = option(  # ours: "inversion" (SDEdit from the inverted trajectory) or "noise" (plain
        #                           SDEdit, the paper's Fig. 8 baseline: the photo's z0 noised with seeded noise)
        "inversion", flag="--from", dest="sdedit_from", choices=SDEDIT_SOURCES, column="from", cell=cells.text_cell,
        methods=("sdedit",),
        help="SDEdit: branch off the inversion's trajectory (inversion), or noise the photo's latent z0 to the start "
             "step with seeded Gaussian noise, the scheduler's forward process, and denoise it with the target and "
             "the empty prompt (noise: plain SDEdit, which needs the photo, not an inversion file)")
    noise_seed: int = option(  # ours: the seed of plain SDEdit's noise
        0, flag="--noise-seed", metavar="N", parse=nonneg_int, column="noise_seed", cell=cells.integer_cell,
        methods=("sdedit",), help="SDEdit from noise: seed of the Gaussian noise added to z0")
    masactrl_step: int = option(  # the authors' default (of 50 steps)
        4, flag="--masactrl-step", metavar="N", parse=nonneg_int, column="masactrl_step", cell=cells.integer_cell,
        methods=("masactrl",), help="MasaCtrl: the first denoising step (0-based) whose targets read the source's keys "
                                    "and values", widget=Widget("number", "MasaCtrl: first step", {"minimum": 0, "precision": 0}))
    masactrl_layer: int = option(  # the authors' default, of SD 1.x's 16 self-attention layers
        10, flag="--masactrl-layer", metavar="N", parse=nonneg_int, column="masactrl_layer", cell=cells.integer_cell,
        methods=("masactrl",), help="MasaCtrl: the first controlled self-attention layer, of 16 as on SD 1.x (the "
                                    "authors' count); other models: the same relative depth (SDXL: 10 is 44 of 70)",
        widget=Widget("number", "MasaCtrl: first layer, of 16 as on SD 1.x", {"minimum": 0, "precision": 0}))
    masactrl_mask_source: tuple = option(  # the authors' MaskAuto: the object's words in the source ...
        (), flag="--masactrl-mask", metavar=("WORDS_SRC", "WORDS_TGT"), nargs=2, arg_default=None,
        fields=("masactrl_mask_source", "masactrl_mask_target"), convert=_blend_words, column="masactrl_mask",
        cell=cells.blend_cell, methods=("masactrl",),
        help="MasaCtrl guided by the object's masks from these source and target words' cross-attention (comma-"
             "separate several words on each side; a manifest cell: 'SRC TGT'): the target's object reads the "
             "source's object, its background the source's background",
        widget=Widget("textbox", "MasaCtrl mask: the object's words in the caption", value=""))
    masactrl_mask_target: tuple = option(  # ... and in the target prompts (set with --masactrl-mask)
        (), widget=Widget("textbox", "MasaCtrl mask: the object's words in the targets", value=""))
    masactrl_mask_threshold: float = option(  # the authors' thres
        0.1, flag="--masactrl-mask-threshold", metavar="X", parse=float, column="masactrl_mask_threshold",
        cell=cells.number_cell, methods=("masactrl",),
        help="MasaCtrl with --masactrl-mask: threshold of the words' cross-attention, normalised to [0, 1]",
        widget=Widget("slider", "MasaCtrl mask threshold", {"minimum": 0, "maximum": 1, "step": 0.05}))
    pnp_features: object = option(  # the authors' pnp_f_t
        0.8, flag="--pnp-features", metavar="SPEC", parse=fraction_or_range, column="pnp_features",
        cell=cells.fraction_cell, methods=("pnp",),
        help="Plug-and-Play: fraction (0.8) or range of steps with the source's decoder features",
        widget=Widget("slider", "Plug-and-Play: features for this fraction of steps", {"minimum": 0, "maximum": 1, "step": 0.05}))
    pnp_attention: object = option(  # the authors' pnp_attn_t
        0.5, flag="--pnp-attention", metavar="SPEC", parse=fraction_or_range, column="pnp_attention",
        cell=cells.fraction_cell, methods=("pnp",),
        help="Plug-and-Play: fraction (0.5) or range of steps with the source's self-attention maps (queries, keys)",
        widget=Widget("slider", "Plug-and-Play: maps for this fraction of steps", {"minimum": 0, "maximum": 1, "step": 0.05}))
    # a user mask (edit(..., mask=...)) "intersect"s the local blend's word mask or "replace"s it;
    # without blend words the mask alone is the blend
    mask_mode: str = option(
        "intersect", flag="--mask-mode", choices=MASK_MODES, column="mask_mode", cell=cells.text_cell, methods=BLENDING,
        help="with --blend, the mask intersects the blend words' region or replaces it",
        widget=Widget("radio", "With local-blend words, the mask intersects or replaces their region",
                      {"choices": list(MASK_MODES)}))

    def __post_init__(self) -> None:
        if isinstance(self.reweight, dict):
            object.__setattr__(self, "reweight", tuple(self.reweight.items()))
        for name in ("blend_source", "blend_target", "blend_subtract", "masactrl_mask_source", "masactrl_mask_target"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, tuple(value.split()))
            else:
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.cross_replace, list):
            object.__setattr__(self, "cross_replace", tuple(self.cross_replace))
        if isinstance(self.self_replace, list):
            object.__setattr__(self, "self_replace", tuple(self.self_replace))
        for name in ("qk_steps", "pnp_features", "pnp_attention"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        if self.method not in EDIT_METHODS:
            raise NulltextError(f"unknown edit method {self.method!r}; choose one of {', '.join(EDIT_METHODS)}")
        if self.sdedit_from not in SDEDIT_SOURCES:
            raise NulltextError(f"unknown SDEdit source {self.sdedit_from!r}; choose one of {', '.join(SDEDIT_SOURCES)}")
        if isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int) or self.noise_seed < 0:
            raise NulltextError(f"noise-seed must be a non-negative integer, got {self.noise_seed!r}")
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
        for name in ("qk_steps", "pnp_features", "pnp_attention"):
            _check_fraction_spec(getattr(self, name), name.replace("_", "-"))
        for name in ("masactrl_step", "masactrl_layer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise NulltextError(f"{name.replace('_', '-')} must be a non-negative integer, got {v!r}")
        if self.mmdit_control not in MMDIT_CONTROLS:
            raise NulltextError(f"unknown MMDiT control {self.mmdit_control!r}; choose one of "
                                f"{', '.join(MMDIT_CONTROLS)} (--mmdit-control on the command line)")
        for word, factor in self.reweight:
            if not isinstance(word, str) or not word.strip():
                raise NulltextError(f"reweight needs word=factor pairs, got {word!r}")
            if not isinstance(factor, (int, float)) or factor != factor or factor in (float("inf"), float("-inf")):
                raise NulltextError(f"reweight factor for {word!r} must be a finite number, got {factor!r}")
        if bool(self.blend_source) != bool(self.blend_target):
            raise NulltextError("local blend needs words of the source and of the target prompt")
        if self.blend_subtract and not self.blend_source:
            raise NulltextError("blend-subtract needs a local blend (blend_source and blend_target: "
                                "--blend WORDS_SRC WORDS_TGT on the command line)")
        if bool(self.masactrl_mask_source) != bool(self.masactrl_mask_target):
            raise NulltextError("the MasaCtrl mask needs words of the source and of the target prompt "
                                "(--masactrl-mask WORDS_SRC WORDS_TGT on the command line)")
        for name in ("blend_start", "blend_threshold", "blend_subtract_threshold", "sdedit_strength",
                     "masactrl_mask_threshold"):
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


def manifest_columns(*configs) -> dict:
    """column -> (field, parser) of the manifest columns that override the options of ``configs``
    (default: InversionConfig and EditConfig), as :func:`nulltext.options.manifest_columns`
    describes; :func:`nulltext.options.row_overrides` applies them to a row."""
    return columns(*(configs or (InversionConfig, EditConfig)))

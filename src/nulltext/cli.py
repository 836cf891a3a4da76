"""The ``nulltext`` command line: invert | reconstruct | edit | attention | eval | info."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import warnings

from . import __version__
from .errors import NulltextError, NulltextWarning, Terminated, one_line

EPILOG_MODEL = ("MODEL is a Hugging Face hub id (default CompVis/stable-diffusion-v1-4), a local diffusers "
                "folder, 'demo' (the small model nulltext trains on procedural 64x64 scenes such as 'a red circle "
                "on a blue background' and ships: it draws and edits them, offline) or 'tiny' (RANDOM weights "
                "built offline, for smoke runs and tests: it reconstructs images but cannot draw or edit).")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(cast, positive: bool):
    """argparse type: a finite number of ``cast`` that is > 0 (``positive``) or >= 0."""
    kind = "integer" if cast is int else "number"

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind}, got {text!r}") from None
        if not math.isfinite(v) or (v <= 0 if positive else v < 0):
            raise argparse.ArgumentTypeError(f"must be {'positive' if positive else 'non-negative'}, got {text}")
        return v

    return parse


_positive_int, _nonneg_int = _number(int, True), _number(int, False)
_positive_float, _nonneg_float = _number(float, True), _number(float, False)


def _crop(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected four non-negative integers L,R,T,B, got {text!r}")
    return values


def _size(text: str) -> tuple[int, int]:
    from .config import parse_size

    try:
        return parse_size(text)
    except NulltextError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None, either: bool = False) -> None:
    from .config import DEFAULT_MODEL

    if either:
        default_help = f" (default: the model recorded in the inversion file; for an IMAGE, {DEFAULT_MODEL})"
    elif default_model:
        default_help = f" (default: {default_model})"
    else:
        default_help = " (default: the model recorded in the inversion file)"
    p.add_argument("--model", default=default_model, metavar="MODEL",
                   help="hub id, local diffusers folder, 'demo' (shipped model trained on simple scenes) or 'tiny' (random weights)" + default_help)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="precision of the model's computations (default: fp32, as the release); the null "
                        "embeddings, Adam, the loss and the DDIM arithmetic stay float32, and fp16's loss is "
                        "scaled so its gradient does not underflow. GPUs only: on a CPU half precision is slower")
    p.add_argument("--low-memory", action="store_true",
                   help="less GPU memory for more time: gradient checkpointing in the UNet during the optimisation "
                        "and one image at a time through the VAE (same results to rounding)")


def _add_inversion_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("--steps", type=_positive_int, default=d.num_steps, help=f"DDIM steps T (default {d.num_steps})")
    p.add_argument("--guidance", type=_positive_float, default=d.guidance_scale,
                   help=f"classifier-free guidance scale w (default {d.guidance_scale})")
    p.add_argument("--inner-steps", type=_nonneg_int, default=d.num_inner_steps,
                   help=f"Adam iterations per timestep at most (default {d.num_inner_steps})")
    p.add_argument("--early-stop", type=_nonneg_float, default=d.early_stop_epsilon,
                   help=f"epsilon: stop a timestep when loss < epsilon + i*{d.early_stop_slope:g} "
                        f"(default {d.early_stop_epsilon:g})")
    p.add_argument("--early-stop-slope", type=_nonneg_float, default=d.early_stop_slope,
                   help=f"growth of the early-stop threshold per timestep (default {d.early_stop_slope:g})")
    p.add_argument("--lr", type=_positive_float, default=d.lr,
                   help=f"Adam learning rate at the first timestep, decayed as lr*(1-i/max(100,T)) (default {d.lr:g})")
    p.add_argument("--optimize-pooled", action="store_true",
                   help="SDXL: optimise the unconditional pooled text embedding too, not only the token embeddings")
    p.add_argument("--size", type=_size, default=None, metavar="N|WxH",
                   help="size the image is inverted at: WxH pixels, or N for the long side with the short one "
                        "following the image's aspect, rounded to the model's multiple (64 for SD); default: the "
                        "model's native square, 512x512 for SD 1.x, centre-cropped as the release does")
    p.add_argument("--crop", type=_crop, default=(0, 0, 0, 0), metavar="L,R,T,B",
                   help="pixels to cut from the left, right, top, bottom before the centre crop")


def _fraction_or_range(text: str):
    """'0.8' -> 0.8 (the steps [0, 0.8)); '0.2,0.6' or '0.2:0.6' -> (0.2, 0.6)."""
    parts = text.replace(":", ",").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.8 or a range like 0.2,0.6, got {text!r}") from None
    if len(values) not in (1, 2) or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.8 or a range like 0.2,0.6, got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _cross_spec(text: str):
    """A fraction, a range, or per-word 'tiger=0.4,default=0.8' (ranges there as a:b)."""
    if "=" not in text:
        return _fraction_or_range(text)
    spec = {}
    for item in text.split(","):
        word, sep, value = item.partition("=")
        if not sep or not word.strip():
            raise argparse.ArgumentTypeError(f"expected word=fraction pairs like 'tiger=0.4,default=0.8', got {text!r}")
        spec[word.strip()] = _fraction_or_range(value.strip())
    return spec


def _reweight(text: str) -> list[tuple[str, float]]:
    """'fluffy=2' or 'fluffy=2,smiling=5'."""
    out = []
    for item in text.split(","):
        word, sep, value = item.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        if not sep or not word.strip() or not math.isfinite(factor):
            raise argparse.ArgumentTypeError(f"expected word=factor like 'fluffy=2', got {text!r}")
        out.append((word.strip(), factor))
    return out


def _words(text: str) -> tuple[str, ...]:
    """'cat' or 'cat,mirror' (each item a word or phrase of the prompt)."""
    return tuple(w.strip() for w in text.split(",") if w.strip())


def _add_edit_args(p: argparse.ArgumentParser, e, method_flag: str = "--method") -> None:
    g = p.add_argument_group("Prompt-to-Prompt (defaults are the release's)")
    g.add_argument("--mode", default=e.mode, help="replace (word swap: same token count), refine (add or remove "
                   "words) or auto: replace when the token and word counts match, refine otherwise (default auto)")
    g.add_argument("--cross-replace", type=_cross_spec, default=e.cross_replace, metavar="SPEC",
                   help="fraction of steps with cross-attention injection: 0.8, a range 0.2,0.8, or per word "
                        "'tiger=0.4,default=0.8' (word=a:b for a range; without default=, the other "
                        "tokens are injected at every step, as in the release) (default 0.8)")
    g.add_argument("--self-replace", type=_fraction_or_range, default=e.self_replace, metavar="SPEC",
                   help="fraction (0.4) or range (0.2,0.6) of steps with self-attention injection (default 0.4)")
    g.add_argument("--blend", nargs=2, metavar=("WORDS_SRC", "WORDS_TGT"),
                   help="local blend: only the region of these source/target words changes "
                        "(comma-separate several, e.g. --blend cat tiger)")
    g.add_argument("--blend-subtract", type=_words, default=(), metavar="WORDS",
                   help="words whose region is removed from the blend mask")
    g.add_argument("--blend-threshold", type=float, default=e.blend_threshold,
                   help=f"blend mask threshold on the normalised attention (default {e.blend_threshold})")
    g.add_argument("--reweight", type=_reweight, action="append", default=[], metavar="WORD=FACTOR",
                   help="scale the attention to target words, e.g. 'fluffy=2' or 'fluffy=2,smiling=5' "
                        "(negative values push away)")
    g.add_argument("--self-max-keys", type=_nonneg_int, default=e.self_max_keys,
                   help=f"self-attention injection only in layers with at most this many keys (default {e.self_max_keys})")
    g.add_argument(method_flag, dest="method", default=e.method, help="p2p (Prompt-to-Prompt, default) or sdedit")
    g.add_argument("--strength", type=float, default=e.sdedit_strength,
                   help=f"SDEdit: fraction of the steps re-denoised with the target (default {e.sdedit_strength})")


def _edit_config(args):
    from .config import EditConfig

    blend = args.blend or (None, None)
    return EditConfig(method=args.method, mode=args.mode, cross_replace=args.cross_replace,
                      self_replace=args.self_replace, self_max_keys=args.self_max_keys,
                      reweight=tuple(pair for group in args.reweight for pair in group),
                      blend_source=_words(blend[0]) if blend[0] else (),
                      blend_target=_words(blend[1]) if blend[1] else (),
                      blend_subtract=args.blend_subtract, blend_threshold=args.blend_threshold,
                      sdedit_strength=args.strength, mask_mode=getattr(args, "mask_mode", "intersect"))


def _add_input_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("input", metavar="INV.safetensors|IMAGE",
                   help="an inversion file, or a photo to invert first (then --prompt is required)")
    p.add_argument("--prompt", help="IMAGE input: its caption, the source prompt of the edit")
    p.add_argument("--save-inversion", metavar="INV.safetensors", help="IMAGE input: also keep the inversion")
    g = p.add_argument_group("inversion (IMAGE input only)")
    _add_inversion_args(g, d)
    g.add_argument("--inversion-method", default=d.method, metavar="METHOD",
                   help="nti (default), npi, direct, global-nti, random-pivot or ddim (see nulltext invert --help)")
    g.add_argument("--seed", type=_nonneg_int, default=d.seed, help="random-pivot: seed of its noise (default 0)")


def build_parser() -> argparse.ArgumentParser:
    from .config import InversionConfig
    from .config import DEFAULT_MODEL

    d = InversionConfig()
    parser = _Parser(prog="nulltext", description="Edit real photographs with text: Null-text Inversion "
                     "(Mokady et al. 2023) on Stable Diffusion.", epilog=EPILOG_MODEL)
    parser.add_argument("--version", action="version", version=f"nulltext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("invert", help="invert an image into a reusable inversion file",
                       description="Invert IMAGE described by --prompt with null-text inversion and save "
                                   "z_T and the per-step null embeddings as a .safetensors file.",
                       epilog=EPILOG_MODEL)
    p.add_argument("image", metavar="IMAGE", nargs="+",
                   help="input photo (any format Pillow reads); several are inverted in batches (--batch-size)")
    p.add_argument("--prompt", required=True, action="append",
                   help="a caption of the image, e.g. 'a cat sitting next to a mirror'; with several images, "
                        "one --prompt per image in order, or one for all")
    p.add_argument("-o", "--output", required=True, metavar="INV.safetensors|OUTDIR",
                   help="inversion file to write; with several images, a folder that gets one IMAGE-NAME.safetensors each")
    p.add_argument("--batch-size", type=_positive_int, default=4,
                   help="images inverted together, one UNet call per step for all (default 4; same results as one by "
                        "one, to float rounding; images of different sizes go to different batches)")
    p.add_argument("--compile", action="store_true",
                   help="compile the UNet with torch.compile (slow first calls; faster on GPUs for long runs; same "
                        "results to rounding)")
    _add_model_args(p, DEFAULT_MODEL)
    _add_inversion_args(p, d)
    p.add_argument("--method", default=d.method, metavar="METHOD",
                   help="nti (null-text inversion, default), npi (negative-prompt inversion: N_t = C, no "
                        "optimisation), direct (Direct Inversion: per-step corrections, no optimisation), "
                        "global-nti (one null embedding for all steps), random-pivot (optimise from Gaussian "
                        "noise instead of the DDIM-inverted z_T), ddim (DDIM inversion alone)")
    p.add_argument("--seed", type=_nonneg_int, default=d.seed, help="random-pivot: seed of its noise (default 0)")
    p.add_argument("--check", action="store_true", help="also reconstruct and print the PSNR to the input")
    p.add_argument("--reproducible", action="store_true",
                   help="leave wall-clock timings out of the file, so identical runs give identical bytes")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("reconstruct", help="sample the inverted image back from an inversion file",
                       epilog=EPILOG_MODEL)
    p.add_argument("inversion", metavar="INV.safetensors")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png", help="image to write (.png/.jpg/.webp)")
    _add_model_args(p, None)
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    from .config import EditConfig

    e = EditConfig()
    p = sub.add_parser("edit", help="edit an inverted image (or an image, inverting it first) with target prompts",
                       description="Edit with Prompt-to-Prompt: each --target is a rewording of the source "
                                   "prompt; what the changed words say changes, the rest is kept. Writes "
                                   "OUTDIR/reconstruction.png, OUTDIR/edit-N-<target>.png per target and "
                                   "OUTDIR/grid.png.",
                       epilog=EPILOG_MODEL)
    _add_input_args(p, d)
    p.add_argument("--target", action="append", default=[], metavar="TEXT",
                   help="a target prompt (repeat for several; all run in one batch)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the images")
    _add_edit_args(p, e)
    p.add_argument("--attention", action="store_true",
                   help="also write OUTDIR/attention.png: each token's cross-attention map, per prompt")
    p.add_argument("--mask", metavar="MASK.png",
                   help="where the edit may change the image: white = editable, black = kept (the photo's size or "
                        "the inverted size); outside it every edited image keeps the reconstruction's pixels")
    p.add_argument("--mask-mode", choices=["intersect", "replace"], default="intersect",
                   help="with --blend: the mask intersects the blend words' region (default) or replaces it")
    _add_model_args(p, None, either=True)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("attention", help="draw the cross-attention map of each token over the image",
                       description="Average each token's cross-attention map over the steps, heads and the "
                                   "layers at 1/4 of the latent size (16x16 for 512 px, as the release "
                                   "shows) and write them as a PNG grid, one row per prompt.",
                       epilog=EPILOG_MODEL)
    _add_input_args(p, d)
    p.add_argument("--target", action="append", default=[], metavar="TEXT",
                   help="also show the maps of this edit's target prompt (repeatable)")
    p.add_argument("-o", "--output", required=True, metavar="MAPS.png", help="image to write")
    p.add_argument("--overlay", type=float, default=0.5, help="heat-map opacity over the image, 0 = map only (default 0.5)")
    p.add_argument("--cell", type=_positive_int, default=128, help="width of each cell in pixels (default 128)")
    _add_edit_args(p, e)
    _add_model_args(p, None, either=True)
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("eval", help="invert (and edit) every sample of a manifest with several methods; "
                       "tabulate the metrics",
                       description="Evaluate inversion methods over a CSV/JSONL manifest (image, prompt, optional "
                                   "target, blend, mask) or a PIE-Bench mapping_file.json. Writes "
                                   "OUTDIR/results.jsonl (resumable: a rerun skips recorded samples), "
                                   "OUTDIR/results.csv and OUTDIR/summary.md.", epilog=EPILOG_MODEL)
    p.add_argument("manifest", metavar="MANIFEST", help=".csv, .jsonl or PIE-Bench mapping_file.json")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the results")
    p.add_argument("--methods", default="nti", help="comma-separated inversion methods, e.g. nti,npi,direct "
                                                    "(default nti)")
    p.add_argument("--images-root", metavar="DIR",
                   help="folder that relative image paths in the manifest are resolved against (default: the "
                        "manifest's own folder; for a PIE-Bench mapping file, its annotation_images/ subfolder "
                        "when there is one); absolute paths are used as they are")
    p.add_argument("--limit", type=_positive_int, help="only the first N samples")
    p.add_argument("--clip-model", metavar="MODEL", help="CLIP score of edits with this transformers CLIPModel "
                   "(hub id or local folder, e.g. openai/clip-vit-large-patch14); not computed without it")
    p.add_argument("--dino-model", metavar="MODEL", help="DINO structure distance of edits with this transformers "
                   "ViTModel (hub id or local folder, e.g. facebook/dino-vitb8); not computed without it")
    p.add_argument("--lpips", choices=["alex", "vgg", "squeeze"], help="LPIPS of reconstructions and (with a mask) "
                   "of the edit's background, with torchmetrics and this backbone; needs torchvision and the "
                   "backbone's weights (downloaded once by torchvision); not computed without it")
    _add_inversion_args(p, d)
    p.add_argument("--seed", type=_nonneg_int, default=d.seed, help="random-pivot: seed of its noise (default 0)")
    _add_edit_args(p, e, method_flag="--edit-method")
    _add_model_args(p, DEFAULT_MODEL)
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")

    p = sub.add_parser("batch", help="run a manifest of jobs (photo, caption, edits), resumable, on one or many "
                       "processes (accelerate launch)",
                       description="Invert (and edit) every job of a JSONL or CSV manifest: columns image, prompt, "
                                   "optional id, targets ('|'-separated or a JSON list), blend ('SRC TGT'), mask, "
                                   "reweight, and any of steps, guidance, inner_steps, size, method, seed, lr, "
                                   "early_stop, mode, cross_replace, self_replace, edit_method, strength, mask_mode, "
                                   "blend_threshold overriding the options below. Writes OUTDIR/<id>-<key>/ per job "
                                   "and OUTDIR/summary.csv; a rerun skips finished jobs. Under accelerate launch the "
                                   "jobs are split between the processes.", epilog=EPILOG_MODEL)
    p.add_argument("manifest", metavar="MANIFEST", help=".jsonl or .csv, relative paths resolved against its folder")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the results")
    p.add_argument("--batch-size", type=_positive_int, default=4,
                   help="images inverted together where jobs share a size and settings (default 4)")
    _add_inversion_args(p, d)
    p.add_argument("--inversion-method", default=d.method, metavar="METHOD", help="inversion method (default nti)")
    p.add_argument("--seed", type=_nonneg_int, default=d.seed, help="random-pivot: seed of its noise (default 0)")
    _add_edit_args(p, e, method_flag="--edit-method")
    _add_model_args(p, DEFAULT_MODEL)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-job lines")

    p = sub.add_parser("serve", help="start the web UI: invert, edit, brush a mask, see attention maps in the browser",
                       description="Serve nulltext's web UI (Gradio; pip install 'nulltext[ui]') on HOST:PORT. "
                                   "Its Invert and Edit events are also API endpoints, /invert and /edit, for "
                                   "gradio_client.", epilog=EPILOG_MODEL)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=_positive_int, default=7860, help="port (default 7860)")
    p.add_argument("--max-pixels", type=_positive_int, default=4096 * 4096,
                   help="largest photo accepted, in pixels (default 4096x4096)")
    _add_model_args(p, DEFAULT_MODEL)

    p = sub.add_parser("info", help="show an inversion file's metadata, losses and iterations")
    p.add_argument("inversion", metavar="INV.safetensors")
    p.add_argument("--json", action="store_true", help="print the raw metadata as JSON")
    p.add_argument("--plot", metavar="LOSS.png",
                   help="draw the per-timestep losses before/after optimisation, the early-stop threshold "
                        "and the iterations used (needs matplotlib: pip install 'nulltext[plot]')")
    p.add_argument("--force", action="store_true", help="overwrite the plot if it exists")
    return parser


def _load_pipe(args, model: str):
    from .models import load_pipeline

    return load_pipeline(model, device=args.device, dtype=args.dtype, low_memory=args.low_memory,
                         compile=getattr(args, "compile", False))


def _inversion_config(args, method: str):
    from .config import InversionConfig

    return InversionConfig(num_steps=args.steps, guidance_scale=args.guidance, num_inner_steps=args.inner_steps,
                           early_stop_epsilon=args.early_stop, early_stop_slope=args.early_stop_slope,
                           lr=args.lr, size=args.size, crop=args.crop, method=method, seed=args.seed,
                           optimize_pooled=args.optimize_pooled)


def _invert_outputs(args) -> list[str]:
    """The inversion file of each image: -o itself for one image (unless it is a folder or ends
    in a separator); otherwise -o is a folder and each file gets its image's name, with -2, -3,
    ... added until no two images share a file."""
    out = args.output
    as_folder = len(args.image) > 1 or os.path.isdir(out) or out.endswith((os.sep, "/"))
    if not as_folder:
        return [out]
    if os.path.exists(out) and not os.path.isdir(out):
        raise NulltextError(f"-o {out} is a file; with {len(args.image)} images, -o names a folder for their "
                            f"inversion files")
    used: set[str] = set()
    paths = []
    for image in args.image:
        stem = os.path.splitext(os.path.basename(image))[0] or "image"
        name, n = stem, 1
        while name.casefold() in used:  # case-insensitive file systems too
            n += 1
            name = f"{stem}-{n}"
        used.add(name.casefold())
        paths.append(os.path.join(out, f"{name}.safetensors"))
    return paths


def cmd_invert(args) -> int:
    from .files import check_writable
    from .image import load_image
    from .inversion import invert_many
    from .text import check_prompt

    config = _inversion_config(args, args.method)
    prompts = args.prompt
    if len(prompts) not in (1, len(args.image)):
        raise NulltextError(f"{len(args.image)} images need one --prompt each (or one for all), got {len(prompts)}")
    prompts = prompts * len(args.image) if len(prompts) == 1 else prompts
    for prompt in prompts:  # control characters refused before any work (an empty prompt warns, at the inversion)
        check_prompt(prompt, empty="allow")
    outputs = _invert_outputs(args)
    for output in outputs:
        check_writable(output, args.force)
    for image in args.image:  # fail on a bad image before loading a model (decoded one at a time, not kept)
        load_image(image)
    pipe = _load_pipe(args, args.model)

    def done(index: int, inv) -> None:  # each file is written as soon as its batch is done
        name, output = args.image[index], outputs[index]
        inv.save(output, force=args.force, reproducible=args.reproducible)
        opt = inv.meta.get("optimisation")
        w, h = inv.image_size
        seconds = sum(inv.meta["timings"].values())
        line = f"inverted {name} ({inv.method}) at {w}x{h} in {seconds:.1f}s"
        if inv.meta.get("batch_size", 1) > 1:
            line = f"inverted {name} ({inv.method}) at {w}x{h} in a batch of {inv.meta['batch_size']} ({seconds:.1f}s)"
        if opt:
            line += (f": {sum(opt['iterations'])} optimisation iterations over {inv.num_steps} steps, "
                     f"final loss {opt['losses_after'][-1]:.3g}")
        else:
            line += f": {inv.num_steps} steps, no optimisation"
        if args.check:
            from .image import preprocess, psnr
            from .inversion import reconstruct

            target = preprocess(load_image(name).image, inv.image_size, inv.config.crop, pipe.size_multiple)
            with warnings.catch_warnings():  # the prompt's warnings were already shown by the inversion
                warnings.simplefilter("ignore", NulltextWarning)
                image = reconstruct(pipe, inv, progress=not args.quiet)
            line += f", reconstruction PSNR {psnr(image, target):.2f} dB"
        print(line)
        print(f"wrote {output}", flush=True)

    try:
        invert_many(pipe, list(args.image), prompts, config, batch_size=args.batch_size, progress=not args.quiet,
                    on_result=done)
    except Exception as e:
        if args.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise NulltextError(f"--compile failed on this machine ({one_line(e)}); run without --compile") from None
        raise
    return 0


def cmd_reconstruct(args) -> int:
    from .files import check_writable, image_format, save_image
    from .inversion import Inversion, reconstruct

    check_writable(args.output, args.force)
    image_format(args.output)
    inv = Inversion.load(args.inversion)
    pipe = _load_pipe(args, args.model or inv.meta["model"])
    from .storage import check_fits

    check_fits(inv, pipe, args.inversion)
    img = reconstruct(pipe, inv, progress=not args.quiet)
    save_image(img, args.output, force=args.force)
    print(f"wrote {args.output}")
    return 0


def cmd_info(args) -> int:
    from .inversion import Inversion

    if args.plot:
        from .files import check_writable, image_format

        check_writable(args.plot, args.force)
        if image_format(args.plot) != "PNG":
            raise NulltextError(f"--plot writes PNG: give a .png name, not {args.plot}")
    inv = Inversion.load(args.inversion)
    m = inv.meta
    if args.plot:
        from .plots import plot_losses

        plot_losses(inv, args.plot, force=args.force)
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0
    c = inv.config
    opt = m.get("optimisation", {})
    w, h = inv.image_size
    print(f"file           {args.inversion}")
    print(f"format         nulltext-inversion v{m.get('format_version')}")
    print(f"method         {m['method']}" + ("" if opt else "  (no optimisation)"))
    print(f"model          {m['model']}  (config {m['model_fingerprint'].get('config_sha256', '?')[:12]})")
    print(f"prompt         {inv.prompt!r}")
    print(f"image          {m['image'].get('name')}  sha256 {m['image'].get('sha256', '?')[:16]}  "
          f"original {'x'.join(map(str, m['image'].get('original_size', [])))} {m['image'].get('original_mode', '')}")
    print(f"preprocessing  {w}x{h}, crop L,R,T,B = {','.join(map(str, c.crop))}")
    print(f"latent_T       {tuple(inv.latent_T.shape)}   null_embeddings {tuple(inv.null_embeddings.shape)}"
          + (f"   corrections {tuple(inv.corrections.shape)}" if inv.corrections is not None else ""))
    print(f"steps T        {c.num_steps}   guidance {c.guidance_scale}   inner steps {c.num_inner_steps}   "
          f"early stop {c.early_stop_epsilon:g} + i*{c.early_stop_slope:g}   lr {c.lr:g}")
    print(f"family         {m.get('family', 'stable-diffusion')}, predicts {m.get('prediction_type', 'epsilon')}")
    scales = opt.get("loss_scales")
    print(f"precision      {m.get('dtype')} on {m.get('device')}"
          + (f", loss scaled by 2^{int(math.log2(min(scales)))} to 2^{int(math.log2(max(scales)))}" if scales else "")
          + (f", in a batch of {m['batch_size']}" if m.get("batch_size", 1) > 1 else ""))
    timings = m.get("timings", {})
    if timings:
        print("timings        " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in timings.items()))
    if opt.get("iterations"):
        its = opt["iterations"]
        print(f"iterations     {sum(its)} in all (max {c.num_inner_steps * len(its)})")
        if opt.get("diverged_steps"):
            print(f"diverged       at step(s) {', '.join(str(i + 1) for i in opt['diverged_steps'])} of {len(its)}: "
                  f"the loss rose from where the step started (try a lower --lr)")
        print(f"\n{'i':>4} {'t':>5} {'iters':>5} {'lr':>9} {'loss first':>11} {'loss last':>11} {'loss after':>11}")
        timesteps = _timesteps(inv)
        for i, it in enumerate(its):
            print(f"{i:>4} {timesteps[i]:>5} {it:>5} {opt['lrs'][i]:>9.2e} {opt['losses_first'][i]:>11.3e} "
                  f"{opt['losses_last'][i]:>11.3e} {opt['losses_after'][i]:>11.3e}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _timesteps(inv) -> list[int]:
    from .ddim import Schedule
    from .ddim import make_scheduler

    return list(Schedule.from_scheduler(make_scheduler(inv.config.scheduler), inv.num_steps).timesteps)


def _is_inversion_path(path: str) -> bool:
    return path.lower().endswith(".safetensors")


def _warn_inversion_options_ignored(args) -> None:
    """Inversion options given with an inversion file have no effect: say so instead of silently
    using the file's settings."""
    from .config import InversionConfig

    d = InversionConfig()
    given = [flag for flag, value, default in (
        ("--steps", args.steps, d.num_steps), ("--guidance", args.guidance, d.guidance_scale),
        ("--inner-steps", args.inner_steps, d.num_inner_steps), ("--early-stop", args.early_stop, d.early_stop_epsilon),
        ("--early-stop-slope", args.early_stop_slope, d.early_stop_slope), ("--lr", args.lr, d.lr),
        ("--crop", tuple(args.crop), tuple(d.crop)), ("--inversion-method", args.inversion_method, d.method),
        ("--seed", args.seed, d.seed), ("--optimize-pooled", args.optimize_pooled, d.optimize_pooled))
        if value != default]
    if given:
        warnings.warn(f"{', '.join(given)} apply to an IMAGE input only; {args.input} already holds an "
                      f"inversion made with its own settings (see nulltext info), so they are ignored",
                      NulltextWarning)


def _source(args, check=None):
    """(pipe, inversion) from the INPUT argument: an inversion file (checked against the model and
    the options), or an image inverted now with --prompt. ``check(pipe, prompt, num_steps,
    latent_hw)`` validates the edit's prompts before any inversion work."""
    from .files import check_writable
    from .config import DEFAULT_MODEL
    from .storage import check_fits

    if _is_inversion_path(args.input):
        from .inversion import Inversion

        if args.save_inversion:
            raise NulltextError("--save-inversion only applies to an IMAGE input")
        inv = Inversion.load(args.input)
        if args.prompt is not None and args.prompt != inv.prompt:
            raise NulltextError(f"{args.input} inverts the prompt {inv.prompt!r}; the source prompt of an edit "
                                f"is the inversion's (leave out --prompt)")
        if args.size is not None and (args.size not in (inv.config.size, max(inv.image_size))
                                      if isinstance(args.size, int) else tuple(args.size) != inv.image_size):
            asked = args.size if isinstance(args.size, int) else "x".join(map(str, args.size))
            raise NulltextError(f"{args.input} was inverted at {inv.image_size[0]}x{inv.image_size[1]} pixels, "
                                f"not {asked}; invert the image again at that size")
        _warn_inversion_options_ignored(args)  # after the refusals: an error is one line
        pipe = _load_pipe(args, args.model or inv.meta["model"])
        check_fits(inv, pipe, args.input)
        if check is not None:
            check(pipe, inv.prompt, inv.num_steps, tuple(inv.latent_T.shape[-2:]))
        return pipe, inv
    from .image import load_image
    from .inversion import invert_image

    if args.prompt is None:
        raise NulltextError(f"{args.input} is an image: pass --prompt with its caption (or give an inversion "
                            f"file made by nulltext invert)")
    from .text import check_prompt

    check_prompt(args.prompt, empty="allow")  # (an empty one warns, at the inversion)
    if args.save_inversion:
        check_writable(args.save_inversion, args.force)
    config = _inversion_config(args, args.inversion_method)
    image = load_image(args.input)
    pipe = _load_pipe(args, args.model or DEFAULT_MODEL)
    if check is not None:
        from .image import output_size

        w, h = output_size(config.size, image.image.size, config.crop, pipe.native_size, pipe.size_multiple)
        check(pipe, args.prompt, config.num_steps, (h // pipe.vae_scale_factor, w // pipe.vae_scale_factor))
    inv = invert_image(pipe, image, args.prompt, config, progress=not args.quiet)
    if args.save_inversion:
        inv.save(args.save_inversion, force=args.force)
        print(f"wrote {args.save_inversion}")
    return pipe, inv


def _warn_ignored(args, config) -> None:
    """Options the chosen method does not use are reported, not silently dropped."""
    from .config import EditConfig

    d = EditConfig()
    if config.method == "sdedit":
        unused = [name for name, used in (
            ("--mode", config.mode != d.mode), ("--cross-replace", config.cross_replace != d.cross_replace),
            ("--self-replace", config.self_replace != d.self_replace), ("--reweight", bool(config.reweight)),
            ("--blend", config.blend), ("--self-max-keys", config.self_max_keys != d.self_max_keys)) if used]
        if unused:
            warnings.warn(f"{', '.join(unused)} apply to --method p2p only; ignored with sdedit", NulltextWarning)
    elif config.sdedit_strength != d.sdedit_strength:
        warnings.warn("--strength applies to --method sdedit only; ignored", NulltextWarning)


def _slug(text: str, n: int = 40) -> str:
    """A file-name piece from a prompt: lower-case words joined by '-', whole words only, at most
    ``n`` characters (a first word longer than that is kept, up to ``2 n``: file names have limits)."""
    import re

    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    out = ""
    for word in words:
        if out and len(out) + 1 + len(word) > n:
            break
        out = f"{out}-{word}" if out else word[: 2 * n]
    return out or "edit"


def _validate_edit_prompts(args) -> None:
    if not args.target:
        raise NulltextError("no target prompt given: pass at least one --target TEXT")
    from .text import check_prompt

    for t in args.target:
        if not t.strip():
            raise NulltextError("--target must not be empty")
        check_prompt(t, "target prompt")


def cmd_edit(args) -> int:
    from .editing import attention_store, edit, maps_from_store, validate
    from .files import check_writable, save_image
    from .visual import attention_grid, side_by_side

    _validate_edit_prompts(args)
    config = _edit_config(args)
    if args.attention and config.method != "p2p":
        raise NulltextError("--attention records the maps of P2P edits; leave it out with --method sdedit")
    _warn_ignored(args, config)
    out = args.output
    if os.path.exists(out) and not os.path.isdir(out):
        raise NulltextError(f"output {out} is a file; -o takes a folder")
    names = ["reconstruction.png"] + [f"edit-{k}-{_slug(t)}.png" for k, t in enumerate(args.target, 1)] + ["grid.png"]
    if args.attention:
        names.append("attention.png")
    paths = [os.path.join(out, n) for n in names]
    for path in paths:
        check_writable(path, args.force)
    targets = list(args.target)
    mask = None
    if args.mask:
        from .image import read_mask

        mask = read_mask(args.mask)  # a missing, unreadable or all-black mask fails before any model work

    def check(pipe, prompt, num_steps, latent_hw):
        validate(pipe, prompt, targets, config, num_steps, latent_hw)
        if mask is not None and not _is_inversion_path(args.input):  # the mask's size, before the inversion
            from .image import load_image, load_mask

            f = pipe.vae_scale_factor
            load_mask(mask, (latent_hw[1] * f, latent_hw[0] * f), load_image(args.input).image.size, args.crop)

    pipe, inv = _source(args, check)
    if args.mask:
        from .editing import edit_mask

        mask = edit_mask(inv, mask)  # the photo's or the inverted size
    stores, size = [], None
    if args.attention:
        store, size = attention_store(pipe, tuple(inv.latent_T.shape[-2:]), config)
        stores = [store]
    result = edit(pipe, inv, targets, config, stores=stores, progress=not args.quiet, mask=mask)
    labels = [f"reconstruction: {inv.prompt}"] + [f"{m}: {t}" for m, t in zip(result.modes, targets)]
    pictures = [*result.images, side_by_side(result.images, labels)]
    if args.attention:
        am = maps_from_store(pipe, stores[0], size, result.prompts, result.images)
        pictures.append(attention_grid(am.maps, am.tokens, am.images))
    for img, path in zip(pictures, paths):  # everything computed: write it all, each atomically
        save_image(img, path, force=args.force)
    for mode, t in zip(result.modes, targets):
        print(f"{mode:>8}: {t}")
    for path in paths:
        print(f"wrote {path}")
    return 0


def cmd_attention(args) -> int:
    from .editing import attention_maps, validate
    from .files import check_writable, image_format, save_image
    from .visual import attention_grid

    check_writable(args.output, args.force)
    image_format(args.output)
    if not 0.0 <= args.overlay <= 1.0:
        raise NulltextError(f"--overlay must lie in [0, 1], got {args.overlay}")
    config = _edit_config(args)
    if config.method != "p2p":
        raise NulltextError("attention maps are recorded for P2P edits; use --method p2p")
    if not args.target and config.blend:
        warnings.warn("--blend acts on edits; without --target it is ignored", NulltextWarning)
    targets = list(args.target)

    def check(pipe, prompt, num_steps, latent_hw):
        if targets:
            validate(pipe, prompt, targets, config, num_steps, latent_hw)

    pipe, inv = _source(args, check)
    am = attention_maps(pipe, inv, targets, config, progress=not args.quiet)
    grid = attention_grid(am.maps, am.tokens, am.images, cell=args.cell, overlay=args.overlay)
    save_image(grid, args.output, force=args.force)
    print(f"cross-attention at {am.size[0]}x{am.size[1]} averaged over {inv.num_steps} steps")
    print(f"wrote {args.output}")
    return 0


def cmd_eval(args) -> int:
    from .config import METHODS
    from .evaluation import evaluate, read_manifest

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise NulltextError(f"unknown method {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    config = _inversion_config(args, methods[0])
    edit_config = _edit_config(args)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise NulltextError(f"output {args.output} is a file; -o takes a folder")
    samples = read_manifest(args.manifest, args.images_root)
    if args.limit:
        samples = samples[: args.limit]
    if not samples:
        raise NulltextError(f"{args.manifest} has no samples")
    models = None
    if args.clip_model or args.dino_model or args.lpips:  # their errors before the long model load
        from .evaluation import ModelMetrics
        from .models import resolve_device

        models = ModelMetrics(args.clip_model, args.dino_model, device=resolve_device(args.device),
                              lpips=args.lpips)
    from .batch import process_state

    state = process_state()  # one process, or those of accelerate launch: the samples are split
    pipe = _load_pipe(args, args.model)
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    rows = evaluate(pipe, samples, methods, args.output, config, edit_config, log=log, models=models, state=state)
    if rows is None:  # not the main process: the main one reports
        return 0
    with open(os.path.join(args.output, "summary.md"), encoding="utf-8") as f:
        print(f.read().split("\n\n")[0])
    skipped = []
    if not args.lpips:
        skipped.append("LPIPS needs --lpips alex|vgg|squeeze (torchvision and its backbone weights)")
    if not args.clip_model:
        skipped.append("CLIP score needs --clip-model")
    if not args.dino_model:
        skipped.append("the DINO structure distance needs --dino-model")
    if skipped:
        print(f"note: {'; '.join(skipped)}")
    for name in ("results.jsonl", "results.csv", "summary.md"):
        print(f"wrote {os.path.join(args.output, name)}")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed and len(failed) == len(rows):
        print(f"nulltext: error: every sample failed ({len(failed)} of {len(rows)}; first: "
              f"{failed[0]['id']} {failed[0]['method']}: {failed[0]['reason']}); see "
              f"{os.path.join(args.output, 'results.jsonl')}", file=sys.stderr)
        return 1
    return 0


def cmd_batch(args) -> int:
    from .batch import batch, process_state, read_jobs

    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise NulltextError(f"output {args.output} is a file; -o takes a folder")
    jobs = read_jobs(args.manifest, _inversion_config(args, args.inversion_method), _edit_config(args))
    if not jobs:
        raise NulltextError(f"{args.manifest} has no jobs")
    state = process_state()
    pipe = _load_pipe(args, args.model)
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    done = batch(pipe, jobs, args.output, args.batch_size, progress=not args.quiet, log=log, state=state)
    if done is None:  # not the main process: the main one reports
        return 0
    rows, skipped = done
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)} of {len(rows)} jobs done" + (f" ({skipped} by an earlier run)" if skipped else "")
          + (f", {len(failed)} failed:" if failed else ""))
    for r in failed:
        print(f"  {r['id']}: {r['reason']}")
    print(f"wrote {os.path.join(args.output, 'summary.csv')}")
    return 1 if failed else 0


def cmd_serve(args) -> int:
    from .ui import require_gradio, serve

    require_gradio()  # before minutes of model loading
    pipe = _load_pipe(args, args.model)
    try:
        serve(pipe, host=args.host, port=args.port, max_pixels=args.max_pixels, quiet=True,
              on_start=lambda: print(f"nulltext: serving {args.model} on http://{args.host}:{args.port} "
                                     f"(Ctrl-C to stop)", flush=True))
    except OSError as e:  # the port is taken, the address is not this machine's, ...
        raise NulltextError(f"cannot serve on {args.host}:{args.port} ({str(e).strip().splitlines()[0][:160]})") from None
    return 0


COMMANDS = {"batch": cmd_batch, "serve": cmd_serve, "invert": cmd_invert, "reconstruct": cmd_reconstruct, "edit": cmd_edit, "attention": cmd_attention,
            "eval": cmd_eval, "info": cmd_info}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"nulltext: warning: {message}", file=sys.stderr)


def _terminate(signum, frame):
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _quiet_libraries()
    warnings.showwarning = _show_warning
    from .files import written

    written.clear()
    # SIGTERM and SIGHUP stop a command as Ctrl-C does: the file being written is removed
    # (only where the default would kill the process: `nohup nulltext ...` keeps ignoring SIGHUP)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
                handlers[sig] = signal.signal(sig, _terminate)
    try:
        return COMMANDS[args.command](args)
    except NulltextError as e:
        print(f"nulltext: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # torch.cuda.OutOfMemoryError and CPU allocation failures
        if isinstance(e, RuntimeError) and "out of memory" not in str(e).lower():
            raise
        hint = ("a smaller --batch-size, --low-memory, a smaller --size or --dtype bf16" if args.command == "invert"
                else "fewer --target prompts, a smaller --size or --dtype bf16")
        print(f"nulltext: error: out of memory; try {hint}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `nulltext info x | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # disk full, permissions, ... outside the atomic writes' own handling
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"nulltext: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        what = f"terminated ({signal.Signals(e.signum).name})" if isinstance(e, Terminated) else "interrupted"
        if args.command in ("eval", "batch"):
            print(f"nulltext: {what}; the {'samples' if args.command == 'eval' else 'jobs'} finished so far are "
                  f"kept, rerun to resume", file=sys.stderr)
        elif written:
            print(f"nulltext: {what}; wrote {', '.join(written)} (complete) before the interruption, "
                  f"nothing else", file=sys.stderr)
        else:
            print(f"nulltext: {what}; nothing was written", file=sys.stderr)
        return 128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _quiet_libraries() -> None:
    """Library chatter (deprecations, load progress bars) is not for users of the CLI."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=NulltextWarning)

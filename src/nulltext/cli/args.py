"""The command line's arguments: the parser of every command, the argument types, and the mapping
from parsed arguments to the library's configs."""

from __future__ import annotations

import argparse
import math

from .. import __version__
from ..errors import NulltextError

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
    from ..config import parse_size

    try:
        return parse_size(text)
    except NulltextError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None, either: bool = False) -> None:
    from ..config import DEFAULT_MODEL

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
    from ..config import EditConfig

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
    from ..config import InversionConfig
    from ..config import DEFAULT_MODEL

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

    from ..config import EditConfig

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
                       description="Evaluate inversion methods over a CSV/JSONL manifest, read as nulltext batch "
                                   "reads it (image, prompt, optional id, target, blend, mask: a mask image of the "
                                   "edited region, and option columns), or a PIE-Bench mapping_file.json. A bad line "
                                   "fails that sample alone. Writes OUTDIR/results.jsonl (resumable: a rerun skips "
                                   "recorded samples), OUTDIR/results.csv and OUTDIR/summary.md.", epilog=EPILOG_MODEL)
    p.add_argument("manifest", metavar="MANIFEST", help=".csv, .jsonl or PIE-Bench mapping_file.json")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the results")
    p.add_argument("--methods", default="nti", help="comma-separated inversion methods, e.g. nti,npi,direct "
                                                    "(default nti)")
    p.add_argument("--images-root", metavar="DIR",
                   help="folder that relative image paths in the manifest are resolved against, mask paths too "
                        "(default: the manifest's own folder; for a PIE-Bench mapping file, its annotation_images/ subfolder "
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
                                   "optional id, targets ('|'-separated or a JSON list), mask (a mask image), and "
                                   "one column per inversion and edit option below, named as the flag with _ for - "
                                   "(method for --inversion-method, edit_method for --edit-method; blend 'SRC TGT'), "
                                   "overriding the option for that job. A bad line fails that job alone. Writes "
                                   "OUTDIR/<id>-<key>/ per job and OUTDIR/summary.csv; a rerun skips finished jobs. "
                                   "Under accelerate launch the jobs are split between the processes.",
                       epilog=EPILOG_MODEL)
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


def _inversion_config(args, method: str):
    from ..config import InversionConfig

    return InversionConfig(num_steps=args.steps, guidance_scale=args.guidance, num_inner_steps=args.inner_steps,
                           early_stop_epsilon=args.early_stop, early_stop_slope=args.early_stop_slope,
                           lr=args.lr, size=args.size, crop=args.crop, method=method, seed=args.seed,
                           optimize_pooled=args.optimize_pooled)

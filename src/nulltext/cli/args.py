"""The command line's arguments: the parser of every command, the argument types, and the mapping
from parsed arguments to the library's configs."""

from __future__ import annotations

import argparse
import dataclasses

from .. import __version__
from ..config import DEFAULT_MODEL, EditConfig, InversionConfig
from ..errors import NulltextError
from ..options import UNSET, options, positive_int
from ..protocols import PROTOCOL_FIELDS, PROTOCOLS

EPILOG_MODEL = ("MODEL is a Hugging Face hub id (default CompVis/stable-diffusion-v1-4), a local diffusers "
                "folder, 'demo' (the small model nulltext trains on procedural 64x64 scenes such as 'a red circle "
                "on a blue background' and ships: it draws and edits them, offline) or 'tiny' (RANDOM weights "
                "built offline, for smoke runs and tests: it reconstructs images but cannot draw or edit).")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _argtype(parse):
    """An argparse type from a parser of nulltext.options: its NulltextError becomes argparse's
    one-line refusal ("argument --steps: must be positive, got 0"); a ValueError stays argparse's
    own ("invalid float value: 'x'"), so the type keeps the parser's name."""
    def argtype(text: str):
        try:
            return parse(text)
        except NulltextError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    argtype.__name__ = parse.__name__
    return argtype


_positive_int = _argtype(positive_int)  # the commands' own numbers (--batch-size, --port, ...)


def _add_options(p, cls, qualified: bool = False, only=None, exclude=()) -> None:
    """The arguments of a config's options (nulltext.options): each field's flag, type, default
    and help as its ``option(...)`` declares them. ``qualified``: the command takes both configs,
    so options that would share a flag take their qualified one (--inversion-method)."""
    for o in options(cls):
        if o.flag is None or (only is not None and o.name not in only) or o.name in exclude:
            continue
        kw = {"dest": o.dest_for(qualified), "help": o.help.replace("%", "%%")}
        if o.action == "store_true":
            kw["action"] = "store_true"
        else:
            kw["default"] = o.default if o.arg_default is UNSET else o.arg_default
            for name in ("action", "nargs", "metavar"):
                if getattr(o, name) is not None:
                    kw[name] = getattr(o, name)
            if o.parse is not None:
                kw["type"] = _argtype(o.parse)
            if o.choices is not None:
                kw["choices"] = list(o.choices)
            shown = o.describe_default()
            if shown not in ("none", "off"):
                kw["help"] += f" (default {shown})"
        p.add_argument(o.flag_for(qualified), **kw)


def config_from_args(cls, args, qualified: bool = False, **fields):
    """The config of parsed arguments: each option whose flag this command has, converted to its
    field(s); options without a flag here keep the config's default; ``fields`` override."""
    kw = {}
    for o in options(cls):
        if o.flag is None or not hasattr(args, o.dest_for(qualified)):
            continue
        value = o.to_field(getattr(args, o.dest_for(qualified)))
        kw.update(zip(o.fields, value) if o.fields else [(o.name, value)])
    kw.update(fields)
    return cls(**kw)


def given_options(cls, args, qualified: bool = False):
    """(option, flag) of each option whose flag this command has and whose value differs from
    the config's default: what the user gave."""
    out = []
    for o in options(cls):
        if o.flag is None or not hasattr(args, o.dest_for(qualified)):
            continue
        value = o.to_field(getattr(args, o.dest_for(qualified)))
        default = tuple(_field_default(cls, f) for f in o.fields) if o.fields else o.default
        if _normal(value) != _normal(default):
            out.append((o, o.flag_for(qualified)))
    return out


def _field_default(cls, name: str):
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _normal(value):
    """Lists as tuples: argparse gives lists where the configs hold tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_normal(v) for v in value)
    return value


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None, either: bool = False) -> None:
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
    p.add_argument("--no-t5", dest="no_t5", action="store_true",
                   help="Stable Diffusion 3 / 3.5: leave the T5 text encoder out (its tokens are zeros, as diffusers "
                        "has them; about 9 GB less for T5-XXL in bf16, somewhat weaker prompt following); an inversion "
                        "made with T5 is refused without it and the reverse. No effect on other families")


def _add_inversion_args(p: argparse.ArgumentParser, d, qualified: bool = False, exclude=()) -> None:
    """The options of ``d``'s config (an InversionConfig or a subclass's instance)."""
    _add_options(p, type(d), qualified=qualified, exclude=exclude)


def _add_edit_args(p: argparse.ArgumentParser, e, qualified: bool = False) -> None:
    """The options of ``e``'s config (an EditConfig or a subclass's instance) but --mask-mode, which
    goes with --mask. ``qualified``: the edit method is --edit-method (beside --methods or
    --inversion-method)."""
    g = p.add_argument_group("Prompt-to-Prompt (defaults are the release's)")
    _add_options(g, type(e), qualified=qualified, exclude=("mask_mode",))


def edit_config(args, cls=None):
    """The edit options of the flags. Under a ``--protocol`` other than release (eval, batch), the
    options it sets may not be given too: the protocol's values are what its name promises."""
    cls = cls or EditConfig
    protocol = getattr(args, "protocol", "release")
    if protocol != "release":
        fixed = [flag for o, flag in given_options(cls, args, qualified=True) if set(o.names) & set(PROTOCOL_FIELDS)]
        if fixed:
            raise NulltextError(f"--protocol {protocol} sets {', '.join(fixed)} itself; leave them out (or use "
                                f"--protocol release)")
    return config_from_args(cls, args)


def _add_protocol(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", choices=PROTOCOLS, default="release",
                   help="release: the edit options as given (the release's defaults); pie-bench: the published "
                        "PIE-Bench protocol of NTI+P2P and DirectInversion+P2P (PnPInversion's run_editing_p2p.py): "
                        "--mode refine, --cross-replace 0.4, --self-replace 0.6, the local blend on each sample's "
                        "blend words and its target blend word reweighted x2 (default release)")


def inversion_config(args, method: str, cls=None):
    return config_from_args(cls or InversionConfig, args, method=method)


def _add_input_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("input", metavar="INV.safetensors|IMAGE",
                   help="an inversion file, or a photo to invert first (then --prompt is required)")
    p.add_argument("--prompt", help="IMAGE input: its caption, the source prompt of the edit")
    p.add_argument("--save-inversion", metavar="INV.safetensors", help="IMAGE input: also keep the inversion")
    g = p.add_argument_group("inversion (IMAGE input only)")
    _add_inversion_args(g, d, qualified=True)


def build_parser() -> argparse.ArgumentParser:
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
    _add_options(p, type(e), only=("mask_mode",))
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
    p.add_argument("--cell", type=_positive_int, default=192,
                   help="width of each cell in pixels: a narrower image is enlarged by a whole factor (sharp "
                        "pixels) to at least this width, a wider one scaled down to it (default 192)")
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
    p.add_argument("--edit-methods", metavar="EDITORS",
                   help="comma-separated edit methods, e.g. p2p,sdedit: every sample and inversion method is edited "
                        "with each (rows and tables labelled METHOD/EDITOR); default: --edit-method alone")
    p.add_argument("--images-root", metavar="DIR",
                   help="folder that relative image paths in the manifest are resolved against, mask paths too "
                        "(default: the manifest's own folder; for a PIE-Bench mapping file, its annotation_images/ subfolder "
                        "when there is one); absolute paths are used as they are")
    p.add_argument("--limit", type=_positive_int, help="only the first N samples")
    p.add_argument("--clip-model", metavar="MODEL", help="CLIP score of edits with this transformers CLIPModel "
                   "(hub id or local folder, e.g. openai/clip-vit-large-patch14); not computed without it")
    p.add_argument("--dino-model", metavar="MODEL", help="DINO structure distance of edits with this transformers "
                   "ViTModel (hub id or local folder, e.g. facebook/dino-vitb8); not computed without it")
    p.add_argument("--lpips", choices=["alex", "vgg", "squeeze"], help="LPIPS of reconstructions and edits to the "
                   "input (and, with a mask, of the edit's background), with torchmetrics and this backbone; needs "
                   "torchvision and the backbone's weights (downloaded once by torchvision); not computed without it")
    _add_inversion_args(p, d, exclude=("method",))  # --methods names them
    _add_edit_args(p, e, qualified=True)
    _add_protocol(p)
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
    _add_inversion_args(p, d, qualified=True)
    _add_edit_args(p, e, qualified=True)
    _add_protocol(p)
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
    p.add_argument("--json", action="store_true",
                   help="print the raw metadata as JSON (with latent_T_log_likelihood, computed from z_T)")
    p.add_argument("--plot", metavar="LOSS.png",
                   help="draw the per-timestep losses before/after optimisation, the early-stop threshold "
                        "and the iterations used (needs matplotlib: pip install 'nulltext[plot]')")
    p.add_argument("--force", action="store_true", help="overwrite the plot if it exists")
    return parser

"""The ``nulltext`` command line: invert | reconstruct | info."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

from . import __version__
from .errors import NulltextError, NulltextWarning

EPILOG_MODEL = ("MODEL is a Hugging Face hub id (default CompVis/stable-diffusion-v1-4), a local diffusers "
                "folder, or 'tiny': a small model with RANDOM weights built offline, for smoke runs and tests "
                "(it reconstructs images but cannot draw or edit meaningfully).")


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
    from .image import parse_size

    try:
        return parse_size(text)
    except NulltextError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
    p.add_argument("--model", default=default_model, metavar="MODEL",
                   help="hub id, local diffusers folder, or 'tiny' (random weights)"
                        + (f" (default: {default_model})" if default_model else
                           " (default: the model recorded in the inversion file)"))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="model weights' precision (default: fp32, as the release)")


def build_parser() -> argparse.ArgumentParser:
    from .config import InversionConfig
    from .models import DEFAULT_MODEL

    d = InversionConfig()
    parser = _Parser(prog="nulltext", description="Edit real photographs with text: Null-text Inversion "
                     "(Mokady et al. 2023) on Stable Diffusion.", epilog=EPILOG_MODEL)
    parser.add_argument("--version", action="version", version=f"nulltext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("invert", help="invert an image into a reusable inversion file",
                       description="Invert IMAGE described by --prompt with null-text inversion and save "
                                   "z_T and the per-step null embeddings as a .safetensors file.",
                       epilog=EPILOG_MODEL)
    p.add_argument("image", metavar="IMAGE", help="input photo (any format Pillow reads)")
    p.add_argument("--prompt", required=True, help="a caption of the image, e.g. 'a cat sitting next to a mirror'")
    p.add_argument("-o", "--output", required=True, metavar="INV.safetensors", help="inversion file to write")
    _add_model_args(p, DEFAULT_MODEL)
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
                   help=f"Adam learning rate at the first timestep, decayed as lr*(1-i/100) (default {d.lr:g})")
    p.add_argument("--size", type=_size, default=None, metavar="N|WxH",
                   help="output size in pixels (default: the model's native size, 512 for SD 1.x)")
    p.add_argument("--crop", type=_crop, default=(0, 0, 0, 0), metavar="L,R,T,B",
                   help="pixels to cut from the left, right, top, bottom before the centre crop")
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

    p = sub.add_parser("info", help="show an inversion file's metadata, losses and iterations")
    p.add_argument("inversion", metavar="INV.safetensors")
    p.add_argument("--json", action="store_true", help="print the raw metadata as JSON")
    return parser


def _load_pipe(args, model: str):
    from .models import load_pipeline

    return load_pipeline(model, device=args.device, dtype=args.dtype)


def cmd_invert(args) -> int:
    from .config import InversionConfig
    from .files import check_writable
    from .image import load_image
    from .inversion import invert_image

    config = InversionConfig(num_steps=args.steps, guidance_scale=args.guidance, num_inner_steps=args.inner_steps,
                             early_stop_epsilon=args.early_stop, early_stop_slope=args.early_stop_slope,
                             lr=args.lr, size=args.size, crop=args.crop)
    check_writable(args.output, args.force)
    source = load_image(args.image)  # fail on a bad image before loading a model
    pipe = _load_pipe(args, args.model)
    inv = invert_image(pipe, source, args.prompt, config, progress=not args.quiet)
    inv.save(args.output, force=args.force, reproducible=args.reproducible)
    opt = inv.meta["optimisation"]
    line = (f"inverted {args.image} in {sum(inv.meta['timings'].values()):.1f}s: "
            f"{sum(opt['iterations'])} optimisation iterations over {inv.num_steps} steps, "
            f"final loss {opt['losses_after'][-1]:.3g}")
    if args.check:
        from .image import preprocess, psnr
        from .inversion import reconstruct

        target = preprocess(source.image, inv.image_size, inv.config.crop, pipe.size_multiple)
        with warnings.catch_warnings():  # the prompt's warnings were already shown by the inversion
            warnings.simplefilter("ignore", NulltextWarning)
            image = reconstruct(pipe, inv, progress=not args.quiet)
        line += f", reconstruction PSNR {psnr(image, target):.2f} dB"
    print(line)
    print(f"wrote {args.output}")
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

    inv = Inversion.load(args.inversion)
    m = inv.meta
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0
    c = inv.config
    opt = m.get("optimisation", {})
    w, h = inv.image_size
    print(f"file           {args.inversion}")
    print(f"format         nulltext-inversion v{m.get('format_version')}")
    print(f"method         {m['method']}")
    print(f"model          {m['model']}  (config {m['model_fingerprint'].get('config_sha256', '?')[:12]})")
    print(f"prompt         {inv.prompt!r}")
    print(f"image          {m['image'].get('name')}  sha256 {m['image'].get('sha256', '?')[:16]}  "
          f"original {'x'.join(map(str, m['image'].get('original_size', [])))} {m['image'].get('original_mode', '')}")
    print(f"preprocessing  {w}x{h}, crop L,R,T,B = {','.join(map(str, c.crop))}")
    print(f"latent_T       {tuple(inv.latent_T.shape)}   null_embeddings {tuple(inv.null_embeddings.shape)}")
    print(f"steps T        {c.num_steps}   guidance {c.guidance_scale}   inner steps {c.num_inner_steps}   "
          f"early stop {c.early_stop_epsilon:g} + i*{c.early_stop_slope:g}   lr {c.lr:g}")
    print(f"precision      {m.get('dtype')} on {m.get('device')}")
    timings = m.get("timings", {})
    if timings:
        print("timings        " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in timings.items()))
    if opt.get("iterations"):
        its = opt["iterations"]
        print(f"iterations     {sum(its)} in all (max {c.num_inner_steps * len(its)})")
        print(f"\n{'i':>4} {'t':>5} {'iters':>5} {'lr':>9} {'loss first':>11} {'loss last':>11} {'loss after':>11}")
        timesteps = _timesteps(inv)
        for i, it in enumerate(its):
            print(f"{i:>4} {timesteps[i]:>5} {it:>5} {opt['lrs'][i]:>9.2e} {opt['losses_first'][i]:>11.3e} "
                  f"{opt['losses_last'][i]:>11.3e} {opt['losses_after'][i]:>11.3e}")
    return 0


def _timesteps(inv) -> list[int]:
    from .ddim import Schedule
    from .models import make_scheduler

    return list(Schedule.from_scheduler(make_scheduler(inv.config.scheduler), inv.num_steps).timesteps)


COMMANDS = {"invert": cmd_invert, "reconstruct": cmd_reconstruct, "info": cmd_info}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"nulltext: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _quiet_libraries()
    warnings.showwarning = _show_warning
    try:
        return COMMANDS[args.command](args)
    except NulltextError as e:
        print(f"nulltext: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `nulltext info x | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("nulltext: interrupted; nothing was written", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Library chatter (deprecations, load progress bars) is not for users of the CLI."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=NulltextWarning)

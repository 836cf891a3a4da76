"""``python -m nulltext.experiments FIGURE``: the paper's experiments, one command per figure, on
any model (``--model``: a checkpoint, ``demo`` or ``tiny``). Each run writes its markdown table
and its plot (matplotlib) into ``--out``; docs/experiments.md maps the paper's figures to them.

- ``fig4``: reconstruction PSNR against optimisation iterations and wall time, null-text
  inversion and the ablations (with the image grid of Figs. 13-14);
- ``fig8``: SDEdit from noise against SDEdit on the null-text inversion, t0 from 10 % to 90 %;
- ``fig9``: the DDIM inversion's guidance against reconstruction and z_T's log-likelihood;
- ``fig15``: attention maps and a word swap, null-text against textual inversion with a pivot."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import warnings

from ..errors import NulltextError, is_out_of_memory

FIGURES = ("fig4", "fig8", "fig9", "fig15")


def _module(name: str):
    return importlib.import_module(f".{name}", __name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nulltext.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="figure", metavar="FIGURE")
    for name in FIGURES:
        module = _module(name)
        f = sub.add_parser(name, help=module.SUMMARY, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        g = f.add_argument_group("model and images")
        g.add_argument("--model", default="tiny",
                       help="checkpoint (hub id or folder), 'demo' (the shipped demo model) or 'tiny' (random "
                            "weights: shows the pipeline, not the paper's effects); default tiny")
        g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default auto)")
        g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
        src = g.add_mutually_exclusive_group()
        src.add_argument("--images", metavar="DIR",
                         help="a folder of images with captions.csv (columns image,prompt; fig8 and fig15 also "
                              "need target: the edit's prompt, a word swap of the caption)")
        src.add_argument("--scenes", type=int, default=0, metavar="N",
                         help="N held-out scenes of the demo model with their captions (for --model demo); the "
                              "target recolours the object")
        g.add_argument("--images-count", type=int, default=2, metavar="N",
                       help="without --images or --scenes: N seeded synthetic pictures (default 2)")
        s = f.add_argument_group("settings")
        s.add_argument("--size", type=int, default=None, metavar="PX", help="pixels (default: the model's native size)")
        s.add_argument("--steps", type=int, default=50, metavar="T", help="DDIM steps (default 50)")
        s.add_argument("--guidance", type=float, default=7.5, metavar="W", help="classifier-free guidance (default 7.5)")
        s.add_argument("--inner-steps", type=int, default=10, metavar="J",
                       help="fig8, fig15: Adam iterations per step of the inversions (default 10)")
        s.add_argument("--seed", type=int, default=0, help="the seed of every random draw (default 0)")
        module.add_arguments(f.add_argument_group(f"{name}"))
        o = f.add_argument_group("output")
        o.add_argument("--out", default="out/experiments", metavar="DIR",
                       help=f"folder of the outputs: {', '.join(module.FILES)} (default out/experiments)")
        o.add_argument("--force", action="store_true", help="overwrite existing outputs")
        o.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _check(args) -> None:
    for name, low in (("steps", 1), ("inner_steps", 0), ("seed", 0), ("images_count", 1), ("scenes", 0),
                      ("grid_images", 1)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise NulltextError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if args.size is not None and args.size < 8:
        raise NulltextError(f"--size must be at least 8 pixels, got {args.size}")
    if not args.guidance > 0:
        raise NulltextError(f"--guidance must be positive, got {args.guidance}")
    if args.images and not os.path.isdir(args.images):
        raise NulltextError(f"--images {args.images}: no such folder")


def run(args) -> int:
    import nulltext

    from . import common

    _check(args)
    module = _module(args.figure)
    if hasattr(module, "check"):  # the figure's own checks that need no model
        module.check(args)
    paths = common.outputs(args.out, module.FILES, args.force)  # before the model loads
    pipe = nulltext.load_pipeline(args.model, device=args.device, dtype=args.dtype)
    size = (args.size, args.size) if args.size else pipe.native_size
    items = common.samples(args, size)
    module.run(args, pipe, items, paths)
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.figure is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return run(args)
    except NulltextError as e:
        print(f"nulltext.experiments: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        print("nulltext.experiments: error: out of memory; try fewer images, a smaller --size or --dtype bf16",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nulltext.experiments: interrupted; the outputs written so far are complete, the others were not "
              "written", file=sys.stderr)
        return 128 + signal.SIGINT

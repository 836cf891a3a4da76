"""The paper's Fig. 4 (and the image grid of Figs. 13-14): mean reconstruction PSNR against the
optimisation's iterations and against wall time, for null-text inversion and the ablations at the
same budgets (docs/algorithm.md section 5.1), with the VAE round trip (VQAE, upper bound) and DDIM
inversion (lower bound). ``random-caption`` is null-text inversion with each image's caption
replaced by one drawn, seeded, from the other images' captions.

Writes ``fig4.md`` (the table), ``fig4.png`` (PSNR against iterations and against seconds per
image) and ``fig4_grid.png`` (the first image: one row per method, one column per budget)."""

from __future__ import annotations

import dataclasses
import random
import time

import numpy as np

from ..config import InversionConfig
from ..errors import NulltextError
from . import common

CURVES = ("nti", "random-pivot", "global-nti", "textual-inversion", "textual-inversion-pivot", "nti-no-pivot",
          "random-caption")
SUMMARY = "reconstruction PSNR against iterations and wall time: null-text inversion, the ablations, the bounds (and Figs. 13-14's grid)"
FILES = ("fig4.md", "fig4.png", "fig4_grid.png")


def add_arguments(p) -> None:
    p.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 5, 10], metavar="J",
                   help="Adam iterations per timestep to try, one point of each curve per budget (default 1 2 5 10)")
    p.add_argument("--methods", nargs="+", default=list(CURVES), choices=CURVES, metavar="METHOD",
                   help=f"the curves to run (default: all: {' '.join(CURVES)})")


def check(args) -> None:
    """Before the model loads: the random-caption curve with a known count of images under 2 (a
    folder's is known once it is read)."""
    count = args.scenes or (None if args.images else args.images_count)
    if "random-caption" in args.methods and count is not None and count < 2:
        random_captions([""] * count, args.seed)  # its one-line refusal


def random_captions(prompts: list[str], seed: int) -> list[str]:
    """For each image, a caption drawn (seeded) from the other images' captions."""
    if len(prompts) < 2:
        raise NulltextError("the random-caption curve needs at least 2 images (it draws from the others' captions)")
    rng = random.Random(seed)
    return [rng.choice(prompts[:i] + prompts[i + 1:]) for i in range(len(prompts))]


@dataclasses.dataclass
class Point:
    method: str
    budget: int | None
    iterations: float  # mean per image
    psnr: float  # mean dB
    latent_mse: float  # mean, before the decoder
    seconds: float  # mean inversion time per image


def run(args, pipe, items: list[common.Sample], paths: dict[str, str]) -> list[Point]:
    import nulltext

    from ..image import decode, encode, preprocess, psnr
    from ..inversion import reconstruct_latent
    from ..visual import labelled_grid

    if any(b < 1 for b in args.budgets):
        raise NulltextError("--budgets must be positive integers")
    size = (args.size, args.size) if args.size else pipe.native_size
    captions = [s.prompt for s in items]
    shuffled = random_captions(captions, args.seed) if "random-caption" in args.methods else None
    base = InversionConfig(num_steps=args.steps, guidance_scale=args.guidance, size=size, seed=args.seed)
    targets = [preprocess(s.image, size) for s in items]
    latents = [encode(pipe, t) for t in targets]
    grid_cells: dict[str, list] = {}

    def measure(config, name: str, budget: int | None) -> Point:
        values, iters, mses, secs = [], [], [], []
        prompts = shuffled if name == "random-caption" else captions
        for k, (s, prompt, target, z0) in enumerate(common.bar(list(zip(items, prompts, targets, latents)),
                                                                len(items), name + (f" J={budget}" if budget else ""), args.quiet)):
            t0 = time.perf_counter()
            inv = nulltext.invert(pipe, s.image, prompt, config, progress=False)
            secs.append(time.perf_counter() - t0)
            z = reconstruct_latent(pipe, inv, progress=False)
            image = decode(pipe, z)[0]
            values.append(psnr(image, target))
            mses.append(float(((z - z0) ** 2).mean()))
            iters.append(sum(inv.optimisation.iterations) if inv.optimisation else 0)
            if k == 0:
                grid_cells.setdefault(name, []).append((image, f"{name}" + (f" J={budget}" if budget else "")))
        return Point(name, budget, float(np.mean(iters)), float(np.mean(values)), float(np.mean(mses)),
                     float(np.mean(secs)))

    vae_images = [decode(pipe, z)[0] for z in latents]
    vae = Point("vae (upper)", None, 0.0, float(np.mean([psnr(v, t) for v, t in zip(vae_images, targets)])), 0.0,
                0.0)
    ddim = measure(dataclasses.replace(base, method="ddim"), "ddim", None)
    points = [vae, ddim]
    for name in args.methods:
        method = "nti" if name == "random-caption" else name
        for budget in args.budgets:
            points.append(measure(dataclasses.replace(base, method=method, num_inner_steps=budget), name, budget))

    header = ["curve", "J (per step)", "iterations", "PSNR dB", "latent MSE", "seconds / image"]
    rows = [[p.method, p.budget if p.budget else "-", f"{p.iterations:.0f}", p.psnr, f"{p.latent_mse:.3e}",
             p.seconds if p.budget or p.method == "ddim" else None] for p in points]
    notes = [f"Model {args.model}, {size[0]}x{size[1]}, T = {args.steps}, w = {args.guidance:g}, {len(items)} "
             f"image(s), seed {args.seed}, device {pipe.device}. Means per image. 'iterations': the optimisation's "
             "Adam iterations in all; 'seconds': the whole inversion of one image (DDIM inversion included); "
             "'latent MSE': the reconstruction's latent against the photo's, before the decoder."]
    if shuffled is not None:
        notes.append("random-caption: null-text inversion under these captions: "
                     + "; ".join(f"{s.name} -> \"{c}\"" for s, c in zip(items, shuffled)) + ".")
    common.write_text(paths["fig4.md"], common.markdown_table(header, rows, notes), args.force)

    plt = common.pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in args.methods:
        pts = [p for p in points if p.method == name]
        ax.plot([p.iterations for p in pts], [p.psnr for p in pts], "o-", label=name)
        ax2.plot([p.seconds for p in pts], [p.psnr for p in pts], "o-", label=name)
    for a in (ax, ax2):
        a.axhline(vae.psnr, color="k", ls="--", label="VQAE (VAE round trip)")
        a.axhline(ddim.psnr, color="gray", ls=":", label="DDIM inversion")
        a.set_ylabel("mean reconstruction PSNR (dB)")
        a.grid(alpha=0.3)
    ax.set_xlabel("optimisation iterations (mean per image)")
    ax2.set_xlabel("seconds per image (mean)")
    ax.set_title(f"{args.model}, {size[0]}x{size[1]}, T={args.steps}, {len(items)} image(s)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, paths["fig4.png"], args.force)

    grid = [[(targets[0], "input"), (vae_images[0], "VQAE"), *grid_cells["ddim"]]]
    grid += [grid_cells[name] for name in args.methods]
    common.save_grid(labelled_grid(grid), paths["fig4_grid.png"], args.force)
    return points

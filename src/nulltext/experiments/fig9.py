"""The paper's Fig. 9: DDIM inversion run with guidance w (``--inversion-guidance``) from 1 to 8,
no optimisation: the reconstruction's PSNR when its z_T is replayed with classifier-free guidance
at the sampling guidance (``--guidance``, 7.5 by default) and the plain null text, and the
log-likelihood of z_T under N(0, I) per dimension (the paper's proxy of editability; Gaussian noise
gives about -1.419).

Writes ``fig9.md`` and ``fig9.png`` (both quantities against w)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..config import InversionConfig
from ..errors import NulltextError
from . import common

SUMMARY = "the DDIM inversion's guidance w against reconstruction PSNR and z_T's log-likelihood"
FILES = ("fig9.md", "fig9.png")


def add_arguments(p) -> None:
    p.add_argument("--weights", type=float, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8], metavar="W",
                   help="the inversion's guidance scales to try (default 1 2 ... 8)")


def run(args, pipe, items: list[common.Sample], paths: dict[str, str]) -> list[tuple[float, float, float]]:
    import nulltext

    from ..image import preprocess, psnr

    if any(w < 0 for w in args.weights):
        raise NulltextError("--weights must be non-negative")
    size = (args.size, args.size) if args.size else pipe.native_size
    targets = [preprocess(s.image, size) for s in items]
    base = InversionConfig(num_steps=args.steps, guidance_scale=args.guidance, size=size, method="ddim")
    points = []
    for w in args.weights:
        config = dataclasses.replace(base, inversion_guidance=float(w))
        values, logliks = [], []
        for s, target in common.bar(list(zip(items, targets)), len(items), f"w={w:g}", args.quiet):
            inv = nulltext.invert(pipe, s.image, s.prompt, config, progress=False)
            values.append(psnr(nulltext.reconstruct(pipe, inv, progress=False), target))
            logliks.append(inv.latent_log_likelihood)
        points.append((float(w), float(np.mean(values)), float(np.mean(logliks))))

    notes = [f"Model {args.model}, {size[0]}x{size[1]}, T = {args.steps}, replayed at guidance {args.guidance:g}, "
             f"{len(items)} image(s), device {pipe.device}. Means per image. DDIM inversion with the inversion's "
             "guidance w (w = 1: the prompt alone, null-text inversion's pivot), no optimisation; log-likelihood: "
             "mean over z_T's elements of log N(z; 0, 1) (Gaussian noise: about -1.419)."]
    table = common.markdown_table(["inversion guidance w", "PSNR dB", "log-likelihood of z_T per dim"],
                                  [[w, p, f"{ll:.3f}"] for w, p, ll in points], notes)
    common.write_text(paths["fig9.md"], table, args.force)

    plt = common.pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    ws = [w for w, _, _ in points]
    ax.plot(ws, [p for _, p, _ in points], "o-")
    ax.set_ylabel("reconstruction PSNR (dB)")
    ax2.plot(ws, [ll for _, _, ll in points], "o-", color="tab:red")
    ax2.axhline(-0.5 * (1 + np.log(2 * np.pi)), color="gray", ls=":", label="N(0, I) noise")
    ax2.set_ylabel("log-likelihood of z_T per dimension")
    ax2.legend(fontsize=8)
    for a in (ax, ax2):
        a.set_xlabel("DDIM inversion guidance w")
        a.grid(alpha=0.3)
    ax.set_title(f"{args.model}, T={args.steps}, replay w={args.guidance:g}, {len(items)} image(s)", fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, paths["fig9.png"], args.force)
    return points

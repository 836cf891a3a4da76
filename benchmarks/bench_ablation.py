"""The paper's Fig. 4 ablation: mean reconstruction PSNR against total optimisation iterations for
null-text inversion (per-step embeddings) and the paper's ablations at the same budget (global
null-text, the random pivot, textual inversion with and without a pivot, null-text without a pivot;
docs/algorithm.md section 5.1), with DDIM inversion (no optimisation) and the VAE round trip as the
lower and upper bounds. Prints a table and writes a PNG plot (matplotlib). ``--methods`` picks some.

Images: a folder of images with a captions file (``--images DIR`` holding ``captions.csv`` with
columns image,prompt) or, by default, seeded synthetic pictures captioned "a photo". The tiny model
has random weights: its numbers show the pipeline, not the paper's effect sizes; rerun on the trained
demo model (``--model demo --scenes N``: held-out scenes of nulltext.demo.scenes with their captions)
or a real checkpoint with ``--model``.

Examples:
    python benchmarks/bench_ablation.py --model tiny --size 128 --steps 10 --budgets 1 2 5 --images-count 3
    python benchmarks/bench_ablation.py --model demo --scenes 5 --budgets 1 2 5 10
    python benchmarks/bench_ablation.py --model /path/to/stable-diffusion-v1-4 --images DIR --device cuda
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import nulltext  # noqa: E402
from nulltext.config import InversionConfig  # noqa: E402
from nulltext.image import decode, encode, load_image, preprocess, psnr  # noqa: E402
from nulltext.inversion import reconstruct_latent  # noqa: E402

OPTIMISED = ("nti", "global-nti", "random-pivot", "textual-inversion", "textual-inversion-pivot", "nti-no-pivot")


def synthetic_images(n: int, size: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(n):
        c = rng.uniform(0, 255, (3, 3))
        img = c[0] * xx[..., None] + c[1] * yy[..., None] + c[2] * (1 - xx[..., None]) * yy[..., None]
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2] = rng.uniform(0, 255, 3)
        out.append((Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), "a photo"))
    return out


def folder_images(folder: str):
    with open(os.path.join(folder, "captions.csv"), encoding="utf-8", newline="") as f:
        return [(load_image(os.path.join(folder, row["image"])).image, row["prompt"]) for row in csv.DictReader(f)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--images", help="folder with captions.csv (image,prompt)")
    p.add_argument("--images-count", type=int, default=3, help="synthetic images when --images is not given")
    p.add_argument("--scenes", type=int, default=0,
                   help="use this many held-out procedural scenes with their captions (for --model demo)")
    p.add_argument("--size", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 5, 10], help="inner steps to try")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(OPTIMISED), choices=OPTIMISED, help="methods to run")
    p.add_argument("--plot", default="out/ablation.png")
    args = p.parse_args()

    pipe = nulltext.load_pipeline(args.model, device=args.device, dtype=args.dtype)
    size = (args.size, args.size) if args.size else pipe.native_size
    if args.scenes:
        from nulltext import demo
        from nulltext.demo import scenes

        images = [(s.image, s.caption) for s in scenes.scenes(args.scenes, demo.HELDOUT_SEED)]
    elif args.images:
        images = folder_images(args.images)
    else:
        images = synthetic_images(args.images_count, size[0], args.seed)
    base = InversionConfig(num_steps=args.steps, size=size)
    targets = [preprocess(img, size) for img, _ in images]

    latents = [encode(pipe, t) for t in targets]

    def mean_psnr(config) -> tuple[float, float, float, float]:
        """(image PSNR dB, optimisation iterations, seconds, latent MSE to z0), means per image.
        The latent MSE does not go through the decoder: it shows the inversion's own error even
        where a (random) VAE caps the image PSNR."""
        values, iters, mses, t0 = [], [], [], time.perf_counter()
        for (img, prompt), target, z0 in zip(images, targets, latents):
            inv = nulltext.invert(pipe, img, prompt, config, progress=False)
            z = reconstruct_latent(pipe, inv, progress=False)
            values.append(psnr(decode(pipe, z)[0], target))
            mses.append(float(((z - z0) ** 2).mean()))
            iters.append(sum(inv.optimisation.iterations) if inv.optimisation else 0)
        return float(np.mean(values)), float(np.mean(iters)), time.perf_counter() - t0, float(np.mean(mses))

    vae = float(np.mean([psnr(decode(pipe, encode(pipe, t))[0], t) for t in targets]))
    ddim_psnr, _, ddim_s, ddim_mse = mean_psnr(dataclasses.replace(base, method="ddim"))
    print(f"model {args.model}  {size[0]}x{size[1]}  T={args.steps}  {len(images)} images  device {pipe.device}")
    print(f"{'method':<23} {'inner':>5} {'iterations':>10} {'PSNR dB':>8} {'latent MSE':>11} {'seconds':>8}")
    print(f"{'vae (upper)':<23} {'-':>5} {0:>10} {vae:>8.2f} {0:>11.3e} {'-':>8}")
    print(f"{'ddim (lower)':<23} {'-':>5} {0:>10} {ddim_psnr:>8.2f} {ddim_mse:>11.3e} {ddim_s:>8.1f}")
    curves: dict[str, list[tuple[float, float, float]]] = {m: [] for m in args.methods}
    for method in args.methods:
        for budget in args.budgets:
            config = dataclasses.replace(base, method=method, num_inner_steps=budget, seed=args.seed)
            value, iters, secs, mse = mean_psnr(config)
            curves[method].append((iters, value, mse))
            print(f"{method:<23} {budget:>5} {iters:>10.0f} {value:>8.2f} {mse:>11.3e} {secs:>8.1f}", flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'nulltext[plot]')")
        return 0
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method, pts in curves.items():
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "o-", label=method)
        ax2.semilogy([x for x, _, _ in pts], [m for _, _, m in pts], "o-", label=method)
    ax.axhline(vae, color="k", ls="--", label="VAE round trip (upper bound)")
    ax.axhline(ddim_psnr, color="gray", ls=":", label="DDIM inversion (lower bound)")
    ax2.axhline(ddim_mse, color="gray", ls=":", label="DDIM inversion (lower bound)")
    ax.set_xlabel("optimisation iterations (mean per image)")
    ax2.set_xlabel("optimisation iterations (mean per image)")
    ax.set_ylabel("reconstruction PSNR (dB)")
    ax2.set_ylabel("latent MSE to z0 (before the decoder)")
    ax.set_title(f"{args.model}, {size[0]}x{size[1]}, T={args.steps}, {len(images)} images", fontsize=9)
    ax.legend(fontsize=8)
    ax2.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    fig.savefig(args.plot, dpi=100)
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

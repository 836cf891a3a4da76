#!/usr/bin/env python
"""Where the colour swap on the demo model loses its background (issue 5's missed targets).

bench_quality.py measures the colour swap's background PSNR outside the object; this script splits
that error by place and by cause, on held-out scenes whose recoloured ground truth the generator
renders exactly (same centre, radius and background, another colour):

- decoder: is decoding the bottleneck? The *ideal* edit latent, the encoder's latent of the
  recoloured scene inside a blend-like mask (the object's 8x8 cells, max-pooled 3x3, as the local
  blend builds it) and the source's latent outside, decoded; background PSNR against the recoloured
  scene, and in the ring (inside that mask, outside the object). Cheap: runs on ``--decoder-n``.
- for each edit setting, on the NTI inversion (release defaults unless the row says otherwise), the
  colour swap's background PSNR split into *outside* the final blend mask and the object (where the
  latent equals the reconstruction's exactly: any error there is the decoder carrying the edit)
  and the *ring* (inside the blend mask, outside the object); how well the final blend mask fits
  the object (share of the object's pixels inside it; its pixels beyond the object, as a share of
  the object's area);
  success and mask IoU as bench_quality.py judges them; and the latent *overshoot*: the edit's
  change of the mean latent inside the object divided by the true change (the encoder's latent
  of the recoloured scene minus the source's), projected on the true change's direction (1.0 =
  exactly the true change, > 1 = extrapolated past it).
  Rows: P2P variants (self-replace 0.8, cross-replace 1.0, blend mask from the 16x16 layers),
  inversions whose unconditional branch follows the source more or less closely (negative-prompt
  inversion: it *is* the source caption; NTI with 2 inner iterations), and the guidance scale the
  inversion and the edit use (1, 2, 3; the release's 7.5 is the default row), next to DDIM
  inversion + CFG reconstruction at the same scale (the lower bound that bench_quality.py reports
  at 7.5).

    python benchmarks/bench_edit_limits.py --n 8 --threads 2    # the recorded run (~25 min)
    python benchmarks/bench_edit_limits.py --n 1 --guidances 2  # quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nulltext  # noqa: E402
from bench_quality import finish, iou, masked_psnr, other_color  # noqa: E402
from nulltext import demo, scenes  # noqa: E402
from nulltext.config import EditConfig, InversionConfig  # noqa: E402
from nulltext.editing import edit_progressive  # noqa: E402
from nulltext.image import decode, encode, psnr  # noqa: E402
from nulltext.inversion import reconstruct_latent  # noqa: E402

VARIANTS = {  # label -> (inversion settings, edit settings)
    "release defaults (NTI, guidance 7.5)": ({}, {}),
    "self-replace 0.8": ({}, {"self_replace": 0.8}),
    "cross-replace 1.0": ({}, {"cross_replace": 1.0}),
    "blend mask from the 16x16 layers": ({}, {"blend_factor": 1}),
    "NTI, 2 inner iterations": ({"num_inner_steps": 2}, {}),
    "negative-prompt inversion (null = source caption)": ({"method": "npi"}, {}),
}


def recoloured(s):
    return scenes.render(other_color(s), s.shape, s.background, s.center, s.radius)


def blend_like_mask(s, latent: int = 16, cells: int = 8) -> torch.Tensor:
    """(1, 1, latent, latent) mask as the local blend builds it from a perfect attention map: the
    object's cells at the blend layers' size, max-pooled 3x3, resized (nearest) to the latent."""
    cov = torch.from_numpy(s.mask.astype(np.float32))[None, None]
    m = (F.adaptive_avg_pool2d(cov, cells) > 0.1).float()
    return F.interpolate(F.max_pool2d(m, 3, 1, 1), size=latent)


def pixel_mask(latent_mask: torch.Tensor, size: int) -> np.ndarray:
    f = size // latent_mask.shape[-1]
    return np.kron(latent_mask[0, 0].float().numpy(), np.ones((f, f))) > 0.5


def decoder_section(pipe, held) -> dict:
    bg, ring, plain = [], [], []
    for s in held:
        new = recoloured(s)
        za, zb = encode(pipe, s.image), encode(pipe, new.image)
        m = blend_like_mask(s, za.shape[-1])
        img = decode(pipe, za * (1 - m) + zb * m)[0]
        bm = pixel_mask(m, s.mask.shape[0])
        bg.append(masked_psnr(img, new.image, ~s.mask))
        ring.append(masked_psnr(img, new.image, bm & ~s.mask))
        plain.append(masked_psnr(decode(pipe, zb)[0], new.image, ~s.mask))
    return {"n": len(held), "ideal_bg": float(np.mean(bg)), "ideal_ring": float(np.mean(ring)),
            "recoloured_decode_bg": float(np.mean(plain))}


def true_change(pipe, s, new) -> tuple[torch.Tensor, torch.Tensor]:
    """The object's latent cells (coverage > 1/2) and the true change of their mean latent when the
    object takes the new colour (encoder's latent of the recoloured scene minus the source's)."""
    za, zb = encode(pipe, s.image), encode(pipe, new.image)
    cover = torch.from_numpy(s.mask.astype(np.float32))[None, None]
    obj = F.adaptive_avg_pool2d(cover, za.shape[-1])[0, 0] > 0.5
    return obj, (zb - za)[0][:, obj].mean(1)


def colour_swap(pipe, inv, s, new, obj, true, edit_kw) -> tuple[dict, object]:
    last = None
    for last in edit_progressive(pipe, inv, [new.caption],
                                 EditConfig(blend_source=(s.shape,), blend_target=(s.shape,), **edit_kw)):
        pass
    z_src, z_edit = last.source, last.targets
    img = decode(pipe, torch.cat([z_src, z_edit]))[1]
    bm = pixel_mask(last.mask, s.mask.shape[0])
    made = (z_edit - z_src)[0][:, obj].mean(1)  # latent overshoot inside the object, along the true change
    j = scenes.judge(img)
    return {"ok": float(j.color == new.color), "iou": iou(j.mask, s.mask),
            "bg": masked_psnr(img, s.image, ~s.mask), "outside_blend": masked_psnr(img, s.image, ~bm & ~s.mask),
            "ring": masked_psnr(img, s.image, bm & ~s.mask),
            "overshoot": float((made @ true) / (true @ true)),
            "recall": float((bm & s.mask).sum() / s.mask.sum()), "spill": float((bm & ~s.mask).sum() / s.mask.sum())}, img


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--n", type=int, default=8, help="held-out scenes for the edit rows")
    p.add_argument("--decoder-n", type=int, default=50, help="held-out scenes for the decoder row")
    p.add_argument("--guidances", type=float, nargs="*", default=[1.0, 2.0, 3.0],
                   help="guidance scales besides the release's 7.5")
    p.add_argument("--only", nargs="+", metavar="WORD",
                   help="keep only the edit rows whose label contains one of these words (e.g. release guidance)")
    p.add_argument("--ddim-guidances", type=float, nargs="*", default=None,
                   help="guidance scales of the DDIM + CFG rows (default: --guidances and 7.5)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--grid", default="out/edit_limits.png")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = dict(VARIANTS)
    for w in args.guidances:
        rows[f"guidance {w:g} (inversion and edit)"] = ({"guidance_scale": w}, {})
    if args.only:
        rows = {k: v for k, v in rows.items() if any(w.lower() in k.lower() for w in args.only)}
        if not rows:
            p.error(f"--only {' '.join(args.only)} keeps none of the rows: {', '.join(VARIANTS)}, guidance ...")
    pipe = nulltext.load_pipeline(args.model, device=args.device)
    t_start = time.time()
    held = list(scenes.scenes(max(args.n, args.decoder_n), demo.HELDOUT_SEED))
    figures: dict = {"model": args.model, "n": args.n, "decoder": decoder_section(pipe, held[:args.decoder_n])}
    results: dict[str, list[dict]] = {k: [] for k in rows}
    ddim_ws = args.ddim_guidances if args.ddim_guidances is not None else [*args.guidances, 7.5]
    ddim: dict[float, list[float]] = {w: [] for w in ddim_ws}
    grid = []
    for k, s in enumerate(held[:args.n]):
        new = recoloured(s)
        obj, true = true_change(pipe, s, new)
        cells = [(s.image.resize((128, 128), 0), "input"), (new.image.resize((128, 128), 0), "true recolour")]
        inversions: dict[tuple, object] = {}
        for label, (inv_kw, edit_kw) in rows.items():
            key = tuple(sorted(inv_kw.items()))
            if key not in inversions:
                inversions[key] = nulltext.invert(pipe, s.image, s.caption, InversionConfig(seed=k, **inv_kw),
                                                  progress=False)
            r, img = colour_swap(pipe, inversions[key], s, new, obj, true, edit_kw)
            results[label].append(r)
            if label.startswith(("release", "guidance")):
                cells.append((img.resize((128, 128), 0), label.split(" (")[0]))
        for w in ddim:
            inv = nulltext.invert(pipe, s.image, s.caption, InversionConfig(method="ddim", guidance_scale=w),
                                  progress=False)
            ddim[w].append(psnr(decode(pipe, reconstruct_latent(pipe, inv, progress=False))[0], s.image))
        if k < 4:
            grid.append(cells)
        print(f"scene {k + 1}/{args.n} done ({time.time() - t_start:.0f} s)", flush=True)

    d = figures["decoder"]
    lines = [f"# Colour swap: where the background is lost (model {args.model})", "",
             f"Decoder ({d['n']} scenes): ideal edit latent (encoder's recoloured latent inside a blend-like "
             f"mask, source latent outside) decodes to background {d['ideal_bg']:.2f} dB, ring "
             f"{d['ideal_ring']:.2f} dB; the recoloured scene's own decode {d['recoloured_decode_bg']:.2f} dB.", "",
             f"Colour swaps ({args.n} scenes):", "",
             "| setting | success | mask IoU | background PSNR | outside the blend mask | ring | latent overshoot "
             "| object in the blend mask | blend mask beyond the object |",
             "|---|---|---|---|---|---|---|---|---|"]
    figures["rows"] = {}
    for label, rs in results.items():
        m = {key: float(np.mean([r[key] for r in rs])) for key in rs[0]}
        figures["rows"][label] = m
        lines.append(f"| {label} | {100 * m['ok']:.0f} % | {m['iou']:.2f} | {m['bg']:.2f} | {m['outside_blend']:.2f} "
                     f"| {m['ring']:.2f} | {m['overshoot']:.2f} | {100 * m['recall']:.0f} % | {100 * m['spill']:.0f} % |")
    lines += ["", "DDIM inversion + CFG reconstruction at the same guidance (the lower bound of bench_quality.py "
              "at 7.5):", "", "| guidance | PSNR dB |", "|---|---|"]
    figures["ddim"] = {}
    for w, vals in ddim.items():
        figures["ddim"][str(w)] = float(np.mean(vals))
        lines.append(f"| {w:g} | {np.mean(vals):.2f} |")
    lines += ["", f"({time.time() - t_start:.0f} s)"]
    return finish(args, lines, figures, grid)


if __name__ == "__main__":
    sys.exit(main())

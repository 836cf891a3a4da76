#!/usr/bin/env python
"""Edit quality of nulltext on the trained demo model (``--model demo``), on held-out generated scenes whose
colour, shape, background and object mask are known exactly. Prints a table (markdown) and writes
a PNG grid of examples.

Sections (each on the same ``--n`` held-out scenes, scenes(n, HELDOUT_SEED)):
- adherence: text-to-image from each scene's caption (DDIM 50, CFG 7.5, seed k); object colour,
  shape and background judged with the generator's palette and geometry (scenes.judge);
- localisation: cross-attention mass of the colour word, the shape word and the filler "a" inside
  the object mask, divided by the mask's share of the image (1.0 = not localised), from the
  maps of the null-text reconstruction at the 16x16 cross-attention layers;
- reconstruction PSNR: VAE round trip (upper bound), DDIM inversion + CFG 7.5 (lower bound),
  null-text inversion with 1, 2, 5, 10 inner iterations, global null-text, random pivot;
- edits with local blend on the NTI inversion (Prompt-to-Prompt, release defaults):
  colour swap (object colour -> another palette colour, blend on the shape word) and shape swap
  (shape -> the next shape); success = the judged object has the target attribute; structure =
  IoU of object masks (colour swap) and centroid shift in pixels (shape swap); background PSNR
  outside the object mask (the ground-truth mask for colour swaps, the union of the masks before
  and after for shape swaps), also with the mask dilated by one pixel, where anti-aliased edge
  pixels that legitimately change colour are left out.

    python benchmarks/bench_quality.py --n 50                       # the recorded run
    python benchmarks/bench_quality.py --n 4 --sections adherence   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import nulltext  # noqa: E402
from nulltext import demo  # noqa: E402
from nulltext.config import EditConfig, InversionConfig  # noqa: E402
from nulltext.demo import scenes  # noqa: E402
from nulltext.image import decode, encode, psnr  # noqa: E402
from nulltext.inversion import reconstruct_latent  # noqa: E402
from nulltext.visual import labelled_grid  # noqa: E402

SECTIONS = ("adherence", "localisation", "reconstruction", "edits")
RECON_ROWS = [  # (label, method, inner steps)
    ("DDIM inversion + CFG 7.5 (lower bound)", "ddim", 0),  # the label keeps the recorded JSON keys; --guidance is in the header
    ("null-text, 1 inner", "nti", 1),
    ("null-text, 2 inner", "nti", 2),
    ("null-text, 5 inner", "nti", 5),
    ("null-text, 10 inner (default)", "nti", 10),
    ("global null-text", "global-nti", 10),
    ("random pivot", "random-pivot", 10),
]


def masked_psnr(a, b, keep: np.ndarray) -> float:
    x = np.asarray(a, np.float64)[keep]
    y = np.asarray(b, np.float64)[keep]
    mse = float(np.mean((x - y) ** 2)) if keep.any() else float("nan")
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()]) if len(xs) else np.array([np.nan, np.nan])


def other_color(s) -> str:
    colors = list(scenes.PALETTE)
    k = colors.index(s.color)
    for d in range(1, len(colors)):
        c = colors[(k + d) % len(colors)]
        if c != s.background:
            return c
    raise AssertionError


def other_shape(s) -> str:
    return scenes.SHAPES[(scenes.SHAPES.index(s.shape) + 1) % len(scenes.SHAPES)]


def pct(x) -> str:
    return f"{100 * np.mean(x):.0f} %"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--n", type=int, default=50, help="held-out scenes")
    p.add_argument("--ablation-n", type=int, default=10,
                   help="scenes for the ablation rows (1, 2, 5 inner iterations, global null-text, random pivot), "
                        "which cost up to 2 min per scene on a 2-core CPU; the other rows use all --n")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=InversionConfig().guidance_scale,
                   help="classifier-free guidance of text-to-image, inversion and edits (default: the release's); "
                        "a diagnostic: what a model calibrated to act as this guidance at 7.5 would do")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--grid", default="out/quality.png")
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = p.parse_args()
    try:  # the release's own checks of the settings, before the model loads
        InversionConfig(num_steps=args.steps, guidance_scale=args.guidance)
    except nulltext.NulltextError as e:
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = nulltext.load_pipeline(args.model, device=args.device)
    held = list(scenes.scenes(args.n, demo.HELDOUT_SEED))
    figures: dict = {"model": args.model, "n": args.n, "steps": args.steps, "guidance": args.guidance}
    lines = [f"# nulltext quality: model {args.model}, {args.n} held-out scenes, T={args.steps}, guidance {args.guidance:g}", ""]
    grid_rows: list[list] = [[] for _ in range(min(8, args.n))]
    t_start = time.time()

    def cell(k, img, label):
        if k < len(grid_rows):
            grid_rows[k].append((img.resize((128, 128), 0), label))

    for k, s in enumerate(held[:len(grid_rows)]):
        cell(k, s.image, "input")

    if "adherence" in args.sections:
        t0 = time.time()
        images = []
        for i in range(0, len(held), 25):
            images += demo.generate(pipe, [s.caption for s in held[i:i + 25]], seed=i, num_steps=args.steps,
                                    guidance_scale=args.guidance)
        j = [scenes.judge(im) for im in images]
        col = [a.color == s.color for a, s in zip(j, held)]
        shp = [a.shape == s.shape for a, s in zip(j, held)]
        bgc = [a.background == s.background for a, s in zip(j, held)]
        allc = [a and b and c for a, b, c in zip(col, shp, bgc)]
        figures["adherence"] = {"color": float(np.mean(col)), "shape": float(np.mean(shp)),
                                "background": float(np.mean(bgc)), "all": float(np.mean(allc))}
        lines += ["## Text-to-image adherence", "", "| object colour | shape | background | all three |",
                  "|---|---|---|---|", f"| {pct(col)} | {pct(shp)} | {pct(bgc)} | {pct(allc)} |", "",
                  f"({time.time() - t0:.0f} s)", ""]
        for k, im in enumerate(images[:len(grid_rows)]):
            cell(k, im, "generated")
        print("\n".join(lines[-7:]), flush=True)
        # two objects: does each colour go with its own shape? (the model must bind words to places)
        t0 = time.time()
        pairs = list(scenes.pair_scenes(args.n, demo.HELDOUT_PAIR_SEED))
        images = []
        for i in range(0, len(pairs), 25):
            images += demo.generate(pipe, [s.caption for s in pairs[i:i + 25]], seed=1000 + i, num_steps=args.steps,
                                    guidance_scale=args.guidance)
        got = [scenes.judge_objects(im) for im in images]
        colors = [sorted(c for c, _, _ in objs) == sorted(s.colors) for (_, objs), s in zip(got, pairs)]
        bound = [sorted((c, sh) for c, sh, _ in objs) == sorted(zip(s.colors, s.shapes)) for (_, objs), s in zip(got, pairs)]
        bgp = [bg == s.background for (bg, _), s in zip(got, pairs)]
        figures["adherence_pairs"] = {"colors": float(np.mean(colors)), "colors_and_shapes": float(np.mean(bound)),
                                      "background": float(np.mean(bgp))}
        lines += ["## Text-to-image adherence, two objects (\"a red circle and a blue square on a green background\")", "",
                  "| both colours | both colour-shape pairs | background |", "|---|---|---|",
                  f"| {pct(colors)} | {pct(bound)} | {pct(bgp)} |", "", f"({time.time() - t0:.0f} s)", ""]
        print("\n".join(lines[-7:]), flush=True)

    need_inv = any(x in args.sections for x in ("localisation", "reconstruction", "edits"))
    if not need_inv:
        return finish(args, lines, figures, grid_rows)

    recon: dict[str, list[float]] = {"VAE round trip (upper bound)": []}
    times: dict[str, list[float]] = {}
    loc = {"colour word": [], "shape word": [], "filler 'a'": []}
    edits = {"color": [], "shape": []}
    main_rows = [r for r in RECON_ROWS if r[1] == "ddim" or (r[1] == "nti" and r[2] == 10)]
    for k, s in enumerate(held):
        rows = RECON_ROWS if "reconstruction" in args.sections and k < args.ablation_n else main_rows
        if "reconstruction" not in args.sections:
            rows = [r for r in main_rows if r[1] == "nti"]
        target = s.image
        recon["VAE round trip (upper bound)"].append(psnr(decode(pipe, encode(pipe, target))[0], target))
        nti = None
        for label, method, inner in rows:
            cfg = InversionConfig(num_steps=args.steps, num_inner_steps=inner, method=method, seed=k,
                                  guidance_scale=args.guidance)
            t0 = time.time()
            inv = nulltext.invert(pipe, target, s.caption, cfg, progress=False)
            times.setdefault(label, []).append(time.time() - t0)
            rec = decode(pipe, reconstruct_latent(pipe, inv, progress=False))[0]
            recon.setdefault(label, []).append(psnr(rec, target))
            if method == "nti" and inner == 10:
                nti = inv
            if k < len(grid_rows) and (method == "ddim" or (method == "nti" and inner == 10)):
                cell(k, rec, f"{method} {recon[label][-1]:.1f} dB")
        if "localisation" in args.sections:
            maps = nulltext.attention_maps(pipe, nti, progress=False, size=(16, 16)).maps[0]  # (16, 16, L)
            h, w = maps.shape[:2]
            frac = torch.from_numpy(s.mask.astype(np.float32))[None, None]
            frac = torch.nn.functional.adaptive_avg_pool2d(frac, (h, w))[0, 0]  # mask share per cell
            area = frac.mean().item()
            for name, pos in (("filler 'a'", 1), ("colour word", 2), ("shape word", 3)):
                m = maps[..., pos].float()
                loc[name].append(((m * frac).sum() / m.sum()).item() / area)
        if "edits" in args.sections:
            new_c, new_s = other_color(s), other_shape(s)
            t_col = scenes.caption(new_c, s.shape, s.background)
            t_shp = scenes.caption(s.color, new_s, s.background)
            res_c = nulltext.edit(pipe, nti, t_col, EditConfig(blend_source=(s.shape,), blend_target=(s.shape,)),
                                  progress=False)
            res_s = nulltext.edit(pipe, nti, t_shp, EditConfig(blend_source=(s.shape,), blend_target=(new_s,)),
                                  progress=False)
            jc, js = scenes.judge(res_c.images[1]), scenes.judge(res_s.images[1])
            edits["color"].append({
                "ok": jc.color == new_c, "iou": iou(jc.mask, s.mask),
                "region_ok": scenes.region_color(res_c.images[1], s.mask) == new_c,
                "bg_kept": jc.background == s.background,
                "bg": masked_psnr(res_c.images[1], target, ~s.mask),
                "bg_dilated": masked_psnr(res_c.images[1], target, ~scenes.dilate(s.mask))})
            union = s.mask | js.mask
            edits["shape"].append({
                "ok": js.shape == new_s, "bg_kept": js.background == s.background, "shift": float(np.linalg.norm(centroid(js.mask) - centroid(s.mask))),
                "bg": masked_psnr(res_s.images[1], target, ~union),
                "bg_dilated": masked_psnr(res_s.images[1], target, ~scenes.dilate(union))})
            cell(k, res_c.images[1], f"-> {new_c}")
            cell(k, res_s.images[1], f"-> {new_s}")
        print(f"scene {k + 1}/{len(held)} done ({time.time() - t_start:.0f} s)", flush=True)

    if True:  # the VAE and default null-text rows are computed whenever inversions are
        lines += ["## Reconstruction PSNR", "", "| method | scenes | PSNR dB (mean) | min | vs VAE on the same scenes | s / image |",
                  "|---|---|---|---|---|---|"]
        figures["reconstruction"] = {}
        for label, vals in recon.items():
            t = f"{np.mean(times[label]):.1f}" if label in times else "-"
            vae = np.mean(recon["VAE round trip (upper bound)"][:len(vals)])
            lines.append(f"| {label} | {len(vals)} | {np.mean(vals):.2f} | {np.min(vals):.2f} | {np.mean(vals) - vae:+.2f} | {t} |")
            figures["reconstruction"][label] = {"n": len(vals), "mean": float(np.mean(vals)), "min": float(np.min(vals)),
                                               "seconds": float(np.mean(times[label])) if label in times else None}
        lines.append("")
    if "localisation" in args.sections:
        lines += ["## Cross-attention localisation (mass inside the object / object's share; 1.0 = none)", "",
                  "| word | mean | min | max |", "|---|---|---|---|"]
        figures["localisation"] = {}
        for name, vals in loc.items():
            lines.append(f"| {name} | {np.mean(vals):.2f} | {np.min(vals):.2f} | {np.max(vals):.2f} |")
            figures["localisation"][name] = float(np.mean(vals))
        lines.append("")
    if "edits" in args.sections:
        c, sh = edits["color"], edits["shape"]
        figures["edits"] = {
            "color": {"success": float(np.mean([e["ok"] for e in c])),
                      "region_recoloured": float(np.mean([e["region_ok"] for e in c])),
                      "background_colour_kept": float(np.mean([e["bg_kept"] for e in c])), "iou": float(np.mean([e["iou"] for e in c])),
                      "bg_psnr": float(np.mean([e["bg"] for e in c])),
                      "bg_psnr_dilated": float(np.mean([e["bg_dilated"] for e in c]))},
            "shape": {"success": float(np.mean([e["ok"] for e in sh])),
                      "background_colour_kept": float(np.mean([e["bg_kept"] for e in sh])),
                      "centroid_shift": float(np.nanmean([e["shift"] for e in sh])),
                      "bg_psnr": float(np.mean([e["bg"] for e in sh])),
                      "bg_psnr_dilated": float(np.mean([e["bg_dilated"] for e in sh]))}}
        fc, fs = figures["edits"]["color"], figures["edits"]["shape"]
        lines += ["## Edits with local blend (P2P replace, release defaults, on the NTI inversion)", "",
                  "| edit | success (judged) | object region in the target colour | background colour kept "
                  "| structure | background PSNR dB | same, mask dilated 1 px |", "|---|---|---|---|---|---|---|",
                  f"| colour swap | {100 * fc['success']:.0f} % | {100 * fc['region_recoloured']:.0f} % "
                  f"| {100 * fc['background_colour_kept']:.0f} % | mask IoU {fc['iou']:.2f} | {fc['bg_psnr']:.2f} | {fc['bg_psnr_dilated']:.2f} |",
                  f"| shape swap | {100 * fs['success']:.0f} % | - | {100 * fs['background_colour_kept']:.0f} % | centroid shift {fs['centroid_shift']:.2f} px | {fs['bg_psnr']:.2f} | {fs['bg_psnr_dilated']:.2f} |",
                  ""]
    lines.append(f"total {time.time() - t_start:.0f} s on {pipe.device}, torch threads {torch.get_num_threads()}")
    return finish(args, lines, figures, grid_rows)


def finish(args, lines, figures, grid_rows) -> int:
    print("\n".join(lines))
    if args.grid and grid_rows and grid_rows[0]:
        os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
        labelled_grid(grid_rows).save(args.grid)
        print(f"wrote {args.grid}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's Fig. 8: SDEdit from noise (plain SDEdit: the photo's latent noised to t0 with seeded
noise, then denoised with the target prompt and the plain null text) against SDEdit on the
null-text inversion (the inverted trajectory from t0 on, with its optimised null embeddings), for
t0 (``--strengths``) from 10 % to 90 %: the edit's distance to the input against its agreement with
the target prompt.

The metrics are ``nulltext eval``'s: LPIPS to the input with ``--lpips NET`` and the CLIP score
with ``--clip-model MODEL``. Without them (their weights are not downloaded here) the table says
what stands in: the pixel MSE to the input for LPIPS; for CLIP, on the demo model's scenes, the
share of edits whose object the scene judge reads in the target's colour
(``nulltext.demo.scenes.judge``), and nothing on other images.

Writes ``fig8.md`` and ``fig8.png`` (target agreement against distance, one point per t0)."""

from __future__ import annotations

import textwrap

import numpy as np

from ..config import EditConfig, InversionConfig
from ..errors import NulltextError
from . import common

SUMMARY = "SDEdit from noise against SDEdit on the null-text inversion, t0 from 10 %% to 90 %%"
FILES = ("fig8.md", "fig8.png")
SOURCES = ("noise", "inversion")
LABELS = {"noise": "SDEdit (from noise)", "inversion": "SDEdit on null-text inversion"}


def add_arguments(p) -> None:
    p.add_argument("--strengths", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                   metavar="S", help="t0 as a fraction of the steps (default 0.1 ... 0.9)")
    p.add_argument("--lpips", choices=["alex", "vgg", "squeeze"],
                   help="LPIPS to the input with this backbone (needs torchvision and its weights; "
                        "default: the pixel MSE stands in)")
    p.add_argument("--clip-model", metavar="MODEL",
                   help="CLIP score against the target with this transformers CLIPModel (hub id or folder; default: "
                        "the demo scenes' judge stands in, nothing on other images)")


def pixel_mse(a, b) -> float:
    """The mean squared difference of two RGB images in [0, 1] (``nulltext eval``'s ``recon_mse``)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float32) / 255.0
    y = np.asarray(b.convert("RGB"), dtype=np.float32) / 255.0
    return float(np.mean((x - y) ** 2))


def metrics(args, items, device):
    """-> (distance(edit, input), its name, agreement(edit, sample) or None, its name)."""
    models = None
    if args.clip_model or args.lpips:
        from ..evaluation import ModelMetrics

        models = ModelMetrics(clip_model=args.clip_model, lpips=args.lpips, device=device)
    if models is not None and models.lpips is not None:
        distance, dname = models.lpips_distance, f"LPIPS ({args.lpips})"
    else:
        distance, dname = pixel_mse, "pixel MSE (stand-in for LPIPS: no --lpips)"
    agree = None
    if models is not None and models.clip is not None:
        def agree(img, s):
            return models.clip_score(img, s.target)

        aname = "CLIP score"
    elif all(s.target_color for s in items):
        def agree(img, s):
            return 100.0 * (common.judge_color(img) == s.target_color)

        aname = "target colour read by the scene judge, % (stand-in for CLIP: no --clip-model)"
    else:
        aname = "not measured (no --clip-model)"
    return distance, dname, agree, aname


def run(args, pipe, items: list[common.Sample], paths: dict[str, str]) -> list[dict]:
    import nulltext

    from ..editing import PhotoLatent
    from ..image import preprocess

    common.need_targets(items, "fig8")
    if any(not 0 < s <= 1 for s in args.strengths):
        raise NulltextError("--strengths must lie in (0, 1]")
    distance, dname, agree, aname = metrics(args, items, pipe.device)
    size = (args.size, args.size) if args.size else pipe.native_size
    config = InversionConfig(num_steps=args.steps, guidance_scale=args.guidance, size=size,
                             num_inner_steps=args.inner_steps, seed=args.seed)
    values = {(src, s): ([], []) for src in SOURCES for s in args.strengths}
    for sample in common.bar(items, len(items), "invert + SDEdit", args.quiet):
        inv = nulltext.invert(pipe, sample.image, sample.prompt, config, progress=False)
        target = preprocess(sample.image, inv.image_size)
        photo = PhotoLatent.of_inversion(pipe, inv, target)
        for s in args.strengths:
            for src in SOURCES:
                ec = EditConfig(method="sdedit", sdedit_strength=s, sdedit_from=src, noise_seed=args.seed)
                edited = nulltext.edit(pipe, photo if src == "noise" else inv, [sample.target], ec,
                                       progress=False).images[1]
                d, a = values[(src, s)]
                d.append(distance(edited, target))
                if agree is not None:
                    a.append(agree(edited, sample))
    rows = [{"strength": s, "source": src, "distance": float(np.mean(values[(src, s)][0])),
             "agreement": float(np.mean(values[(src, s)][1])) if agree is not None else None}
            for src in SOURCES for s in args.strengths]

    notes = [f"Model {args.model}, {size[0]}x{size[1]}, T = {args.steps}, w = {args.guidance:g}, null-text inversion "
             f"with {args.inner_steps} iterations per step, noise seed {args.seed}, {len(items)} image(s), device "
             f"{pipe.device}. Means per image. Distance: {dname}. Target: {aname}."]
    table = common.markdown_table(["t0 (strength)", "edit", f"distance to input: {dname.split(' (')[0]}",
                                   f"target: {aname.split(' (')[0].split(',')[0]}"],
                                  [[r["strength"], LABELS[r["source"]], f"{r['distance']:.4g}", r["agreement"]]
                                   for r in rows], notes)
    common.write_text(paths["fig8.md"], table, args.force)

    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for src in SOURCES:
        pts = [r for r in rows if r["source"] == src]
        ys = [r["agreement"] if r["agreement"] is not None else 0.0 for r in pts]
        ax.plot([r["distance"] for r in pts], ys, "o-", label=LABELS[src])
        for r, y in zip(pts, ys):
            ax.annotate(f"{r['strength']:g}", (r["distance"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("\n".join(textwrap.wrap(f"distance to input: {dname}", 60)), fontsize=8)
    ax.set_ylabel("\n".join(textwrap.wrap(f"target: {aname}", 45)), fontsize=8)
    ax.set_title(f"{args.model}, T={args.steps}, {len(items)} image(s); labels: t0", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    common.save_figure(fig, paths["fig8.png"], args.force)
    return rows


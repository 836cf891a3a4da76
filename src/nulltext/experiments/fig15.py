"""The paper's Fig. 15: null-text inversion against textual inversion with a pivot
(``textual-inversion-pivot``: the pivotal scheme optimising the conditional embedding instead of
the null one), each image inverted both ways at the same budget, then its source prompt's
cross-attention maps over the reconstruction and a Prompt-to-Prompt word swap to its target.

Writes ``fig15.png`` (per image, the two methods side by side: the reconstruction and the edit,
then the attention map of each word of the caption) and ``fig15.md``: per method, the
reconstruction PSNR, and where the images come with the object's pixels (the demo model's scenes)
the share of the swapped word's attention that falls on the object, and the share of edits whose
object the scene judge reads in the target's colour."""

from __future__ import annotations

import numpy as np

from ..config import InversionConfig
from . import common

SUMMARY = "attention maps and a word swap: null-text inversion against textual inversion with a pivot"
FILES = ("fig15.md", "fig15.png")
METHODS = ("nti", "textual-inversion-pivot")


def add_arguments(p) -> None:
    p.add_argument("--grid-images", type=int, default=2, metavar="N", help="images shown in fig15.png (default 2)")


def swapped_word(prompt: str, target: str) -> str | None:
    """The first word of the prompt that the target replaces (a word swap), or None."""
    a, b = prompt.split(), target.split()
    return next((x for x, y in zip(a, b) if x != y), None)


def on_object(maps, positions: list[int], mask: np.ndarray) -> float:
    """The share of the word's attention (its tokens' maps summed, source row) inside the object."""
    from PIL import Image

    m = maps.maps[0, :, :, positions].sum(-1).float().cpu().numpy()
    h, w = m.shape
    inside = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((w, h), Image.Resampling.BOX))
    return float((m * inside).sum() / max(m.sum(), 1e-12))


def run(args, pipe, items: list[common.Sample], paths: dict[str, str]) -> dict:
    import nulltext

    from ..alignment import word_positions
    from ..image import preprocess, psnr
    from ..visual import attention_grid, labelled_grid

    common.need_targets(items, "fig15")
    size = (args.size, args.size) if args.size else pipe.native_size
    stats = {m: {"psnr": [], "on_object": [], "edit_ok": []} for m in METHODS}
    blocks = []
    for k, s in enumerate(common.bar(items, len(items), "invert x2 + attention + edit", args.quiet)):
        target_img = preprocess(s.image, size)
        word = swapped_word(s.prompt, s.target)
        row_blocks = []
        for method in METHODS:
            config = InversionConfig(num_steps=args.steps, guidance_scale=args.guidance, size=size, method=method,
                                     num_inner_steps=args.inner_steps, seed=args.seed)
            inv = nulltext.invert(pipe, s.image, s.prompt, config, progress=False)
            maps = nulltext.attention_maps(pipe, inv, [s.target], progress=False)
            recon, edited = maps.images[0], maps.images[1]
            st = stats[method]
            st["psnr"].append(psnr(recon, target_img))
            positions = word_positions(pipe.tokenizer, s.prompt, word) if word else []
            if s.mask is not None and positions:
                st["on_object"].append(on_object(maps, positions, s.mask))
            if s.target_color:
                st["edit_ok"].append(100.0 * (common.judge_color(edited) == s.target_color))
            if k < args.grid_images:
                images = labelled_grid([[(target_img, "input"), (recon, f"{method}: reconstruction"),
                                         (edited, f"edit: {s.target}")]])
                att = attention_grid(maps.maps[:1], maps.tokens[:1], [recon], skip_special=True)
                row_blocks.append((images, att))
        if row_blocks:
            blocks.append(row_blocks)

    def mean(v):
        return float(np.mean(v)) if v else None

    header = ["method", "reconstruction PSNR dB", "swapped word's attention on the object", "edits in the target colour %"]
    rows = [[m, mean(stats[m]["psnr"]), mean(stats[m]["on_object"]), mean(stats[m]["edit_ok"])] for m in METHODS]
    notes = [f"Model {args.model}, {size[0]}x{size[1]}, T = {args.steps}, w = {args.guidance:g}, "
             f"{args.inner_steps} iterations per step, {len(items)} image(s), device {pipe.device}. Means per image. "
             "Attention: the source prompt's cross-attention averaged over steps, heads and layers (the edit's "
             "attention maps); its share inside the object's pixels for the word the target swaps; '-': the "
             "images carry no object mask or target colour (only the demo model's scenes do)."]
    common.write_text(paths["fig15.md"], common.markdown_table(header, rows, notes), args.force)
    common.save_grid(_compose(blocks), paths["fig15.png"], args.force)
    return {m: {k: mean(v) for k, v in stats[m].items()} for m in METHODS}


def _compose(blocks):
    """Per image a band: the methods side by side, each its images above its attention maps."""
    from PIL import Image

    bands = []
    for row in blocks:
        cols = []
        for images, att in row:
            col = Image.new("RGB", (max(images.width, att.width), images.height + att.height), "white")
            col.paste(images, (0, 0))
            col.paste(att, (0, images.height))
            cols.append(col)
        band = Image.new("RGB", (sum(c.width for c in cols) + 16 * (len(cols) - 1), max(c.height for c in cols)),
                         "white")
        x = 0
        for c in cols:
            band.paste(c, (x, 0))
            x += c.width + 16
        bands.append(band)
    out = Image.new("RGB", (max(b.width for b in bands), sum(b.height for b in bands) + 16 * (len(bands) - 1)),
                    "white")
    y = 0
    for b in bands:
        out.paste(b, (0, y))
        y += b.height + 16
    return out

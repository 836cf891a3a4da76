"""Pictures for people: a labelled side-by-side grid of edits, and the grid of per-token
cross-attention maps the release shows in its notebook."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LINE_H = 12  # pixels per caption line
PAD = 4


def _font():
    return ImageFont.load_default()


def wrap_label(label: str, width: int, font=None) -> list[str]:
    """Break ``label`` into lines at spaces so each fits ``width`` pixels; a word wider than a line
    gets a line of its own and is never cut. Joining the lines with spaces gives the label back."""
    font = font or _font()
    lines: list[str] = []
    for word in label.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def labelled_grid(rows: Sequence[Sequence[tuple[Image.Image, str]]], cell: tuple[int, int] | None = None) -> Image.Image:
    """Cells (image, caption) in rows; every image is resized to ``cell`` (w, h) (default: the
    first image's size), captions drawn below, wrapped at word boundaries and shown whole (the
    caption area grows to the longest caption)."""
    first = rows[0][0][0]
    cw, ch = cell or first.size
    font = _font()
    wrapped = [[wrap_label(label, cw - 4, font) for _img, label in row] for row in rows]
    label_h = LINE_H * max(len(lines) for row in wrapped for lines in row) + 4
    ncols = max(len(r) for r in rows)
    W = ncols * (cw + PAD) + PAD
    H = len(rows) * (ch + label_h + PAD) + PAD
    grid = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, (img, _label) in enumerate(row):
            x, y = PAD + c * (cw + PAD), PAD + r * (ch + label_h + PAD)
            grid.paste(img.convert("RGB").resize((cw, ch), Image.Resampling.NEAREST if img.width < cw // 2
                                                 else Image.Resampling.BICUBIC), (x, y))
            for k, line in enumerate(wrapped[r][c]):
                draw.text((x + 2, y + ch + 2 + LINE_H * k), line, fill="black", font=font)
    return grid


def side_by_side(images: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """One row: the reconstruction, then each edit, with its prompt below."""
    return labelled_grid([list(zip(images, labels))])


def heatmap(m: np.ndarray) -> np.ndarray:
    """(h, w) map in [0, 1] -> (h, w, 3) uint8, dark blue -> yellow (no matplotlib needed)."""
    m = np.clip(m, 0.0, 1.0)[..., None]
    lo, mid, hi = np.array([20, 20, 90.0]), np.array([200, 40, 80.0]), np.array([255, 240, 60.0])
    rgb = np.where(m < 0.5, lo + (mid - lo) * (m / 0.5), mid + (hi - mid) * ((m - 0.5) / 0.5))
    return rgb.astype(np.uint8)


def attention_grid(maps, tokens: Sequence[Sequence[str]], images: Sequence[Image.Image] | None = None,
                   cell: int = 128, overlay: float = 0.5, skip_special: bool = False) -> Image.Image:
    """One row per prompt: (its image,) then each token's map, normalised by its own maximum as
    the release does. ``maps``: (rows, h, w, K) tensor; ``overlay``: heat-map opacity over the
    image (0 = the map alone, grey as in the release)."""
    rows = []
    for r, toks in enumerate(tokens):
        row = []
        base = images[r].convert("RGB").resize((cell, cell * images[r].height // images[r].width),
                                               Image.Resampling.BICUBIC) if images else None
        if base is not None:
            row.append((base, "image"))
        for k, tok in enumerate(toks):
            if skip_special and (k == 0 or k == len(toks) - 1):
                continue
            m = maps[r, :, :, k].float().cpu().numpy()
            m = m / m.max() if m.max() > 0 else m
            size = base.size if base is not None else (cell, cell * m.shape[0] // m.shape[1])
            if base is not None and overlay > 0:
                heat = Image.fromarray(heatmap(m)).resize(size, Image.Resampling.BICUBIC)
                img = Image.blend(base, heat, overlay)
            else:
                img = Image.fromarray((255 * m).astype(np.uint8)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
            row.append((img, tok.replace("<|startoftext|>", "<start>").replace("<|endoftext|>", "<end>")))
        rows.append(row)
    first = rows[0][0][0]
    return labelled_grid(rows, cell=first.size)

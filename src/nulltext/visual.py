"""Pictures for people: a labelled side-by-side grid of edits, and the grid of per-token
cross-attention maps the release shows in its notebook."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LINE_H = 12  # pixels per caption line
PAD = 4  # pixels between tiles
MIN_TILE = 192  # a narrower image is enlarged by a whole factor to at least this width
ELLIPSIS = "\u2026"


def _font():
    return ImageFont.load_default()


def _width(text: str, font) -> float:
    """Pixels ``text`` covers: its advance or its ink, whichever reaches further right."""
    return max(font.getlength(text), font.getbbox(text)[2]) if text else 0


def _cut(word: str, width: int, font) -> str:
    """The longest start of ``word`` that fits ``width`` pixels with an ellipsis after it."""
    for n in range(len(word) - 1, 0, -1):
        if _width(word[:n] + ELLIPSIS, font) <= width:
            return word[:n] + ELLIPSIS
    return ELLIPSIS


def wrap_label(label: str, width: int, font=None) -> list[str]:
    """Break ``label`` into lines at spaces so each fits ``width`` pixels; a word wider than a line
    gets a line of its own, cut with an ellipsis. Where every word fits, joining the lines with
    spaces gives the label back."""
    font = font or _font()
    lines: list[str] = []
    for word in label.split():
        if lines and _width(f"{lines[-1]} {word}", font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word if _width(word, font) <= width else _cut(word, width, font))
    return lines or [""]


def scale_factor(width: int, min_width: int = MIN_TILE) -> int:
    """The whole factor that enlarges ``width`` pixels to at least ``min_width`` (1: not enlarged)."""
    return max(1, -(-min_width // width))


def labelled_grid(rows: Sequence[Sequence[tuple[Image.Image, str]]], cell: tuple[int, int] | None = None,
                  min_width: int = MIN_TILE) -> Image.Image:
    """Cells (image, caption) in rows; every image is resized to ``cell`` (w, h) (default: the
    first image's size), then, if ``cell`` is narrower than ``min_width``, enlarged by a whole
    factor with nearest neighbour (sharp pixels) to at least that width. Captions are drawn below
    their tile, wrapped at word boundaries to its width (a word wider than the tile is cut with an
    ellipsis), so they never reach a neighbour's; each row grows to its longest caption."""
    first = rows[0][0][0]
    cw, ch = cell or first.size
    k = scale_factor(cw, min_width)
    tw, th = cw * k, ch * k
    font = _font()
    wrapped = [[wrap_label(label, tw - 4, font) for _img, label in row] for row in rows]
    label_hs = [LINE_H * max(len(lines) for lines in row) + 4 for row in wrapped]
    ncols = max(len(r) for r in rows)
    W = ncols * (tw + PAD) + PAD
    H = sum(th + label_h + PAD for label_h in label_hs) + PAD
    grid = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(grid)
    y = PAD
    for r, row in enumerate(rows):
        for c, (img, _label) in enumerate(row):
            x = PAD + c * (tw + PAD)
            img = img.convert("RGB")
            if img.size != (cw, ch):
                img = img.resize((cw, ch), Image.Resampling.NEAREST if img.width < cw // 2 else Image.Resampling.BICUBIC)
            if k > 1:
                img = img.resize((tw, th), Image.Resampling.NEAREST)
            grid.paste(img, (x, y))
            for n, line in enumerate(wrapped[r][c]):
                draw.text((x + 2, y + th + 2 + LINE_H * n), line, fill="black", font=font)
        y += th + label_hs[r] + PAD
    return grid


def side_by_side(images: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """One row: (the input photo,) the reconstruction, then each edit, with its caption below."""
    return labelled_grid([list(zip(images, labels))])


def heatmap(m: np.ndarray) -> np.ndarray:
    """(h, w) map in [0, 1] -> (h, w, 3) uint8, dark blue -> yellow (no matplotlib needed)."""
    m = np.clip(m, 0.0, 1.0)[..., None]
    lo, mid, hi = np.array([20, 20, 90.0]), np.array([200, 40, 80.0]), np.array([255, 240, 60.0])
    rgb = np.where(m < 0.5, lo + (mid - lo) * (m / 0.5), mid + (hi - mid) * ((m - 0.5) / 0.5))
    return rgb.astype(np.uint8)


def attention_grid(maps, tokens: Sequence[Sequence[str]], images: Sequence[Image.Image] | None = None,
                   cell: int = MIN_TILE, overlay: float = 0.5, skip_special: bool = False) -> Image.Image:
    """One row per prompt: (its image,) then each token's map, normalised by its own maximum as
    the release does. ``maps``: (rows, h, w, K) tensor; ``cell``: the tiles' width: an image
    narrower than that is enlarged by a whole factor (nearest neighbour) to at least that width, a
    wider one scaled down to it; ``overlay``: heat-map opacity over the image (0 = the map alone,
    grey as in the release)."""
    rows = []
    for r, toks in enumerate(tokens):
        row = []
        base = None
        if images:
            base = images[r].convert("RGB")
            if base.width < cell:
                f = scale_factor(base.width, cell)
                base = base.resize((base.width * f, base.height * f), Image.Resampling.NEAREST)
            elif base.width > cell:
                base = base.resize((cell, cell * base.height // base.width), Image.Resampling.BICUBIC)
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
    return labelled_grid(rows, cell=first.size, min_width=cell)

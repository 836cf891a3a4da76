"""Procedural scenes with captions and ground-truth object masks: "a red circle on a blue
background". The training data and the yardstick of the demo model: every fact a test
or benchmark needs (colour, shape, background, where the object is) is known exactly.

Deterministic from a seed; no downloads. Object edges are anti-aliased by supersampling, and the
mask is the set of pixels the object covers at least half of.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

# RGB of each colour word. Objects and backgrounds use the same palette; an object never has its
# background's colour.
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
SUPERSAMPLE = 4  # sub-pixels per side for anti-aliased edges


@dataclass(frozen=True)
class Scene:
    image: Image.Image  # RGB, size x size
    mask: np.ndarray  # (size, size) bool: pixels the object covers at least half of
    color: str
    shape: str
    background: str
    center: tuple[float, float]  # (x, y) in pixels
    radius: float  # half the object's extent in pixels

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.background)


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def coverage(shape: str, size: int, center: tuple[float, float], radius: float,
             supersample: int = SUPERSAMPLE) -> np.ndarray:
    """(size, size) float in [0, 1]: the fraction of each pixel inside the shape.

    circle: |p - c| <= r; square: axis-aligned, half side r; triangle: upright, equilateral,
    inscribed in the circle of radius r."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample  # sub-pixel centres in pixel units
    x, y = np.meshgrid(coords, coords)
    cx, cy = center
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2
    elif shape == "square":
        inside = (np.abs(x - cx) <= radius) & (np.abs(y - cy) <= radius)
    elif shape == "triangle":
        # apex up at (cx, cy - r), base at y = cy + r/2, half-width r*sqrt(3)/2
        top, base = cy - radius, cy + radius / 2
        half = radius * np.sqrt(3) / 2
        frac = (y - top) / (base - top)  # 0 at the apex, 1 at the base
        inside = (frac >= 0) & (frac <= 1) & (np.abs(x - cx) <= frac * half)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(color: str, shape: str, background: str, center: tuple[float, float], radius: float,
           size: int = 64) -> Scene:
    if color == background:
        raise ValueError("the object and the background must have different colours")
    cov = coverage(shape, size, center, radius)[..., None]
    fg, bg = np.array(PALETTE[color], float), np.array(PALETTE[background], float)
    pixels = np.rint(cov * fg + (1 - cov) * bg).astype(np.uint8)
    return Scene(Image.fromarray(pixels), cov[..., 0] >= 0.5, color, shape, background, center, radius)


def random_scene(rng: np.random.Generator, size: int = 64, min_radius: float = 0.18,
                 max_radius: float = 0.32) -> Scene:
    """A scene with uniformly drawn colour, shape, background (other than the colour), radius
    (as a fraction of the side) and a centre that keeps the object inside the image."""
    colors = list(PALETTE)
    color = colors[rng.integers(len(colors))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    others = [c for c in colors if c != color]
    background = others[rng.integers(len(others))]
    radius = float(rng.uniform(min_radius, max_radius)) * size
    lo, hi = radius + 1, size - radius - 1
    center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    return render(color, shape, background, center, radius, size)


def scenes(n: int, seed: int, size: int = 64) -> Iterator[Scene]:
    """``n`` scenes, the same ones for the same seed (scene k depends only on (seed, k))."""
    for k in range(n):
        yield random_scene(np.random.default_rng([seed, k]), size)


@dataclass(frozen=True)
class PairScene:
    """Two objects of different colours on a background: "a red circle and a blue square on a
    green background". Training the demo model on these makes it bind each colour and shape word
    to a place (one-object scenes can be drawn from global conditioning alone)."""

    image: Image.Image
    masks: tuple[np.ndarray, np.ndarray]  # each (size, size) bool, in caption order
    colors: tuple[str, str]
    shapes: tuple[str, str]
    background: str
    centers: tuple[tuple[float, float], tuple[float, float]]
    radii: tuple[float, float]

    @property
    def caption(self) -> str:
        return pair_caption(self.colors, self.shapes, self.background)


def pair_caption(colors, shapes, background: str) -> str:
    return f"a {colors[0]} {shapes[0]} and a {colors[1]} {shapes[1]} on a {background} background"


def render_pair(colors, shapes, background: str, centers, radii, size: int = 64) -> PairScene:
    if len({colors[0], colors[1], background}) != 3:
        raise ValueError("the two objects and the background must have three different colours")
    pixels = np.broadcast_to(np.array(PALETTE[background], float), (size, size, 3)).copy()
    masks = []
    for color, shape, center, radius in zip(colors, shapes, centers, radii):
        cov = coverage(shape, size, center, radius)[..., None]
        pixels = cov * np.array(PALETTE[color], float) + (1 - cov) * pixels
        masks.append(cov[..., 0] >= 0.5)
    if (masks[0] & masks[1]).any():
        raise ValueError("the two objects overlap")
    return PairScene(Image.fromarray(np.rint(pixels).astype(np.uint8)), tuple(masks), tuple(colors),
                     tuple(shapes), background, tuple(centers), tuple(radii))


def random_pair_scene(rng: np.random.Generator, size: int = 64, min_radius: float = 0.12,
                      max_radius: float = 0.22) -> PairScene:
    """Two objects with three different colours (objects and background), uniformly drawn shapes
    and radii, placed inside the image without touching (redrawn until they do not)."""
    names = list(PALETTE)
    c0, c1, bg = (names[i] for i in rng.permutation(len(names))[:3])
    shapes = tuple(SHAPES[i] for i in rng.integers(len(SHAPES), size=2))
    while True:
        radii = tuple(float(r) * size for r in rng.uniform(min_radius, max_radius, size=2))
        centers = tuple((float(rng.uniform(r + 1, size - r - 1)), float(rng.uniform(r + 1, size - r - 1)))
                        for r in radii)
        # circumscribed circles apart by two pixels: the shapes cannot touch
        if np.hypot(centers[0][0] - centers[1][0], centers[0][1] - centers[1][1]) >= radii[0] * 1.42 + radii[1] * 1.42 + 2:
            return render_pair((c0, c1), shapes, bg, centers, radii, size)


def pair_scenes(n: int, seed: int, size: int = 64) -> Iterator[PairScene]:
    """``n`` two-object scenes, the same ones for the same seed (scene k depends only on (seed, k))."""
    for k in range(n):
        yield random_pair_scene(np.random.default_rng([seed, k]), size)


# ---------------------------------------------------------------------------------------------
# Judging an image (generated or edited) against the generator's palette and geometry


@dataclass(frozen=True)
class Judgement:
    color: str | None  # the object's palette colour (None: no object found)
    shape: str | None
    background: str
    mask: np.ndarray  # (H, W) bool: the object (largest connected non-background region)
    fill: float  # object area / bounding-box area (square 1, circle pi/4, triangle 1/2)


# fill ratio boundaries between triangle (0.5), circle (0.785) and square (1.0)
FILL_TRIANGLE_CIRCLE = 0.64
FILL_CIRCLE_SQUARE = 0.89


def nearest_colors(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) index into PALETTE of the nearest colour (Euclidean in RGB)."""
    pal = np.array(list(PALETTE.values()), float)
    d = ((pixels[..., None, :].astype(float) - pal) ** 2).sum(-1)
    return d.argmin(-1)


def dilate(mask: np.ndarray) -> np.ndarray:
    """A boolean mask grown by one pixel (4-neighbourhood, no wrap-around)."""
    m = mask.copy()
    m[1:] |= mask[:-1]
    m[:-1] |= mask[1:]
    m[:, 1:] |= mask[:, :-1]
    m[:, :-1] |= mask[:, 1:]
    return m


def region_color(image, mask: np.ndarray) -> str:
    """The palette colour nearest the mean of ``image`` inside ``mask`` shrunk by one pixel (so
    anti-aliased edge pixels do not count; the whole mask if nothing is left): what an object's
    region shows, whatever the rest of the image looks like."""
    inner = ~dilate(~mask)
    inner = inner if inner.any() else mask
    return list(PALETTE)[nearest_colors(np.asarray(image, np.float64)[inner].mean(0))]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask."""
    h, w = mask.shape
    labels = np.zeros((h, w), int)
    best, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        stack, size = [(y0, x0)], 0
        labels[y0, x0] = label
        while stack:
            y, x = stack.pop()
            size += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1),
                           (y - 1, x - 1), (y - 1, x + 1), (y + 1, x - 1), (y + 1, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = label
                    stack.append((yy, xx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask, bool)


def _palette_indices(image) -> tuple[np.ndarray, np.ndarray, int]:
    """(pixels, index of each pixel's nearest palette colour, index of the background: the
    commonest colour on the border)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    idx = nearest_colors(pixels)
    border = np.concatenate([idx[0], idx[-1], idx[:, 0], idx[:, -1]])
    return pixels, idx, int(np.bincount(border, minlength=len(PALETTE)).argmax())


def _shape_of(mask: np.ndarray) -> tuple[str, float]:
    """(shape, fill): the shape told by how much of its bounding box a region fills."""
    ys, xs = np.nonzero(mask)
    fill = float(mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    return ("triangle" if fill < FILL_TRIANGLE_CIRCLE else "circle" if fill < FILL_CIRCLE_SQUARE else "square"), fill


def judge(image) -> Judgement:
    """Read colour, shape and background off an image with the generator's palette: every pixel
    takes the nearest palette colour; the background is the commonest colour on the border; the
    object is the largest connected region of other colours, its colour the commonest there (the
    region is then redrawn at half coverage between the two colours), its shape told by how much
    of its bounding box it fills."""
    pixels, idx, bg = _palette_indices(image)
    names = list(PALETTE)
    mask = largest_component(idx != bg)
    if mask.sum() < 4:
        return Judgement(None, None, names[bg], mask, 0.0)
    color = names[int(np.bincount(idx[mask], minlength=len(names)).argmax())]
    # refine the edge: the fraction of the object colour in each pixel, read off the line from the
    # background colour to the object colour (the renderer's anti-aliasing), at least one half
    fg, bgc = np.array(PALETTE[color], float), np.array(PALETTE[names[bg]], float)
    cov = ((pixels.astype(float) - bgc) @ (fg - bgc)) / ((fg - bgc) @ (fg - bgc))
    mask = largest_component(cov >= 0.49)  # 0.49: a half-covered pixel stays in after 8-bit rounding
    shape, fill = _shape_of(mask)
    return Judgement(color, shape, names[bg], mask, fill)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a boolean mask, largest first."""
    rest, out = mask.copy(), []
    while rest.any():
        c = largest_component(rest)
        out.append(c)
        rest &= ~c
    return out


def judge_objects(image, k: int = 2) -> tuple[str, list[tuple[str, str, np.ndarray]]]:
    """(background, [(colour, shape, mask), ...]) for the ``k`` largest objects of an image: as
    :func:`judge`, with the non-background pixels split by palette colour into connected regions,
    each region's shape told by its fill ratio. Regions of under 16 pixels or under an eighth of
    the largest region (strips of anti-aliased edge pixels nearest a third colour) are ignored."""
    _, idx, bg = _palette_indices(image)
    names = list(PALETTE)
    found = []
    for c in range(len(names)):
        if c != bg:
            found += [(int(m.sum()), names[c], m) for m in components(idx == c) if m.sum() >= 16]
    found.sort(key=lambda f: -f[0])
    found = [f for f in found if f[0] >= found[0][0] / 8]
    objects = []
    for _, color, m in found[:k]:
        objects.append((color, _shape_of(m)[0], m))
    return names[bg], objects

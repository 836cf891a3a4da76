"""Draw the example inputs (no downloads): examples/red_ball.png, a 640x480 photo-like scene to
try the commands on (a stand-in for a photograph), and examples/red_circle.png, a 64x64 scene of the demo model's
world ("a red circle on a blue background", drawn by nulltext.demo.scenes) for ``make demo``."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def draw(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy = np.linspace(0, 1, height)[:, None, None]
    sky = (1 - yy) * np.array([110, 160, 230]) + yy * np.array([200, 220, 245])
    img = np.broadcast_to(sky, (height, width, 3)).copy()
    horizon = int(height * 0.6)
    grass = np.array([70, 140, 60]) + rng.normal(0, 12, size=(height - horizon, width, 3))
    img[horizon:] = grass
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    cx, cy, r = int(width * 0.55), int(height * 0.62), int(height * 0.17)
    d.ellipse((cx - r * 1.1, cy + r * 0.75, cx + r * 1.1, cy + r * 1.05), fill=(40, 80, 35))  # shadow
    for k in range(r, 0, -1):  # shaded ball, lit from the upper left
        t = k / r
        colour = (int(120 + 120 * (1 - t) ** 0.5), int(20 + 40 * (1 - t)), int(25 + 30 * (1 - t)))
        off = int((r - k) * 0.35)
        d.ellipse((cx - k - off, cy - k - off, cx + k - off, cy + k - off), fill=colour)
    return pil.filter(ImageFilter.GaussianBlur(0.8))


def red_circle() -> Image.Image:
    from nulltext.demo.scenes import render

    return render("red", "circle", "blue", center=(34.0, 30.0), radius=15.0).image


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    for name, img in (("red_ball.png", draw()), ("red_circle.png", red_circle())):
        img.save(os.path.join(here, name))
        print(f"wrote {os.path.join(here, name)}")

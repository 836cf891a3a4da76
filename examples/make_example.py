"""Draw the example input (no downloads): examples/red_circle.png, a 64x64 scene of the demo model's
world ("a red circle on a blue background", drawn by nulltext.demo.scenes) for ``make demo``."""

from __future__ import annotations

import os

from PIL import Image


def red_circle() -> Image.Image:
    from nulltext.demo.scenes import render

    return render("red", "circle", "blue", center=(34.0, 30.0), radius=15.0).image


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "red_circle.png")
    red_circle().save(path)
    print(f"wrote {path}")

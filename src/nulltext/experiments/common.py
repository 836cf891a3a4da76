"""What every figure's command shares: the samples (a folder of captioned photos, the demo model's
held-out scenes, or seeded synthetic pictures), the target prompt of an edit, progress bars, and the
outputs (a markdown table, a matplotlib plot, an image grid), each written atomically."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import NulltextError
from ..files import atomic_write, check_writable, save_image

# synthetic pictures' captions and their word-swap targets (any model's tokenizer splits them)
SYNTHETIC = (("a photo of a cat", "a photo of a dog"), ("a photo of a dog", "a photo of a cat"),
             ("a photo of a bird", "a photo of a horse"), ("a photo of a horse", "a photo of a bird"))


@dataclasses.dataclass
class Sample:
    image: object  # PIL RGB
    prompt: str
    target: str | None  # a word swap of the prompt, for the edits (None: the folder gives none)
    name: str
    mask: np.ndarray | None = None  # the object's pixels (demo scenes), for the attention's accuracy
    target_color: str | None = None  # demo scenes: the colour the edit asks for


def demo_target(color: str, background: str, shape: str) -> tuple[str, str]:
    """A demo scene's word swap: the object's colour becomes the next palette colour (in the
    palette's order) that is neither its own nor the background's. -> (target prompt, colour)."""
    from ..demo import scenes

    names = list(scenes.PALETTE)
    k = names.index(color)
    new = next(c for c in names[k + 1:] + names[:k] if c not in (color, background))
    return scenes.caption(new, shape, background), new


def judge_color(image) -> str | None:
    """The object's palette colour in a demo-world image, as the scene judge reads it."""
    from ..demo import scenes

    return scenes.judge(image).color


def synthetic_images(n: int, size: int, seed: int) -> list[Sample]:
    """Seeded pictures: a gradient with a disc, captioned from :data:`SYNTHETIC`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c = rng.uniform(0, 255, (3, 3))
        img = c[0] * xx[..., None] + c[1] * yy[..., None] + c[2] * (1 - xx[..., None]) * yy[..., None]
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2] = rng.uniform(0, 255, 3)
        prompt, target = SYNTHETIC[i % len(SYNTHETIC)]
        out.append(Sample(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), prompt, target, f"synthetic{i}"))
    return out


def folder_images(folder: str) -> list[Sample]:
    """``folder/captions.csv`` with columns image,prompt (and optionally target: the edit's prompt)."""
    from ..image import load_image

    path = os.path.join(folder, "captions.csv")
    if not os.path.isfile(path):
        raise NulltextError(f"--images {folder}: no captions.csv there (columns image,prompt[,target])")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"image", "prompt"} <= set(rows[0]):
        raise NulltextError(f"{path}: needs a header with the columns image,prompt (and optionally target)")
    return [Sample(load_image(os.path.join(folder, r["image"])).image, r["prompt"], (r.get("target") or None),
                   r["image"]) for r in rows]


def demo_scenes(n: int) -> list[Sample]:
    from .. import demo
    from ..demo import scenes

    out = []
    for k, s in enumerate(scenes.scenes(n, demo.HELDOUT_SEED)):
        target, color = demo_target(s.color, s.background, s.shape)
        out.append(Sample(s.image, s.caption, target, f"scene{k}", mask=s.mask, target_color=color))
    return out


def samples(args, size: tuple[int, int]) -> list[Sample]:
    if args.scenes:
        found = demo_scenes(args.scenes)
    elif args.images:
        found = folder_images(args.images)
    else:
        found = synthetic_images(args.images_count, size[0], args.seed)
    if not found:
        raise NulltextError("no images to run on")
    return found


def need_targets(items: Sequence[Sample], figure: str) -> None:
    missing = [s.name for s in items if not s.target]
    if missing:
        raise NulltextError(f"{figure} edits each image: captions.csv needs a target column (missing for "
                            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")


def bar(items: Iterable, total: int, desc: str, quiet: bool):
    """A progress bar on stderr (tqdm), or the items as they are with ``--quiet``."""
    if quiet:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False)


def fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], notes: Sequence[str] = ()) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)


def write_text(path: str, text: str, force: bool) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write, force=force)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or a one-line error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NulltextError("the figures need matplotlib: pip install 'nulltext[plot]'") from None
    return plt


def save_figure(fig, path: str, force: bool) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    pyplot().close(fig)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())

    return atomic_write(path, write, force=force)


def save_grid(img, path: str, force: bool) -> str:
    return save_image(img, path, force=force)


def outputs(out: str, names: Sequence[str], force: bool) -> dict[str, str]:
    """The output files' paths, each checked before any work (exists without --force, unwritable)."""
    paths = {n: os.path.join(out, n) for n in names}
    for p in paths.values():
        check_writable(p, force)
    return paths

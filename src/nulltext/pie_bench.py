"""The adapter of PIE-Bench (Ju et al. 2024, "Direct Inversion"): its ``mapping_file.json`` turned
into the rows of nulltext's manifests (:mod:`nulltext.jobs`), its run-length masks into mask images.

A mapping file is ``{id: {image_path, original_prompt, editing_prompt, blended_word, mask, ...}}``.
The brackets PIE-Bench puts around edited words are removed from the prompts; ``blended_word`` is
the row's ``blend``; images are looked up under ``annotation_images/`` beside the file (or
``images_root``); each ``mask`` (the edited region, run-length encoded over the photo's pixels) is
written as a PNG (white = edited) into ``mask_dir``, and the row's ``mask`` is its path. The other
fields (``editing_type_id``, ``editing_instruction``) are not used. A sample that cannot be adapted
(a field of the wrong type, a malformed mask, a photo that cannot be read for its size) becomes a
row with its reason, failed alone like any bad line of a manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np

from .errors import NulltextError, one_line
from .files import atomic_write, slug
from .jobs import check_manifest


def decode_rle(rle, shape: tuple[int, int] = (512, 512)) -> np.ndarray:
    """PIE-Bench's run-length mask: pairs (start, length) over the flattened image; as its own
    decoder, the one-pixel border is marked too. Raises ValueError on a malformed encoding."""
    if not isinstance(rle, (list, tuple)) or len(rle) % 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rle):
        raise ValueError("bad RLE mask: expected a flat list of non-negative integer (start, length) pairs")
    n = shape[0] * shape[1]
    flat = np.zeros(n, dtype=bool)
    for start, length in zip(rle[0::2], rle[1::2]):
        if start >= n:
            raise ValueError(f"bad RLE mask: run starts at {start}, beyond {shape[0]}x{shape[1]}")
        flat[start:min(n, start + length)] = True
    mask = flat.reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def mask_png(rle, size: tuple[int, int]) -> bytes:
    """The PNG of an RLE mask over an image of ``size`` (width, height): white = the edited region."""
    from PIL import Image

    w, h = size
    buf = io.BytesIO()
    Image.fromarray(decode_rle(rle, (h, w)).astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def _write_once(path: str, data: bytes) -> None:
    """Write ``data`` unless the file holds it already: every run (and every accelerate process)
    writes the same masks, and an unchanged file keeps the jobs' keys and skips the write."""
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return
    except OSError:
        pass

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write, force=True)


def _strip_brackets(text: str) -> str:
    return " ".join(text.replace("[", " ").replace("]", " ").split())


def _row(key: str, item, root: str, mask_dir: str) -> dict:
    from .image import load_image

    if not isinstance(item, dict) or not isinstance(item.get("image_path"), str) or not all(
            isinstance(item.get(k, ""), str) for k in ("original_prompt", "editing_prompt", "blended_word")):
        raise NulltextError(f"sample {key!r} needs text fields image_path, original_prompt, editing_prompt, "
                            f"blended_word")
    row = {"id": key, "image": os.path.abspath(os.path.join(root, item["image_path"])),
           "prompt": _strip_brackets(item.get("original_prompt", ""))}
    if item.get("editing_prompt"):
        row["targets"] = [_strip_brackets(item["editing_prompt"])]
    if item.get("blended_word"):
        row["blend"] = item["blended_word"]
    if item.get("mask") is not None:
        size = load_image(row["image"]).image.size  # the run-length code counts this image's pixels
        try:
            data = mask_png(item["mask"], size)
        except ValueError as e:
            raise NulltextError(str(e)) from None
        name = f"{slug(key, 60, default='sample')}-{hashlib.sha256(key.encode()).hexdigest()[:8]}.png"
        os.makedirs(mask_dir, exist_ok=True)
        row["mask"] = os.path.join(mask_dir, name)
        _write_once(row["mask"], data)
    return row


def read_mapping_file(path: str, mask_dir: str, images_root: str | None = None,
                      limit: int | None = None) -> list[dict]:
    """The manifest rows of a PIE-Bench mapping file (its first ``limit`` samples), their masks
    written into ``mask_dir``; a sample that cannot be adapted is a row ``{"id", "__error__"}``."""
    check_manifest(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise NulltextError(f"cannot read the manifest {path} ({e.__class__.__name__})") from None
    except (ValueError, RecursionError) as e:
        raise NulltextError(f"cannot read the manifest {path} as JSON ({one_line(e)})") from None
    if not isinstance(doc, dict):
        raise NulltextError(f"{path}: a PIE-Bench mapping file is a JSON object of samples")
    folder = os.path.dirname(os.path.abspath(path))
    images = os.path.join(folder, "annotation_images")
    root = images_root or (images if os.path.isdir(images) else folder)
    rows = []
    for key, item in list(doc.items())[:limit]:
        try:
            rows.append(_row(str(key), item, root, mask_dir))
        except NulltextError as e:
            rows.append({"id": str(key), "__error__": str(e)})
    return rows

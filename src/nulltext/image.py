"""Images in and out: loading (any common mode, converted to RGB), the release's crop/resize,
PIL <-> tensor, and VAE encode/decode."""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .errors import NonFiniteError, NulltextError, NulltextWarning

MIN_SIDE = 64  # pixels; smaller inputs carry too little detail for an 8x-downsampling VAE


@dataclass
class ImageSource:
    image: Image.Image  # RGB
    sha256: str  # of the file's bytes (or of the RGB pixels for an in-memory image)
    name: str
    original_mode: str

    @classmethod
    def from_pil(cls, img: Image.Image, name: str = "<memory>") -> "ImageSource":
        rgb = to_rgb(img)
        digest = hashlib.sha256(np.asarray(rgb).tobytes()).hexdigest()
        return cls(rgb, digest, name, img.mode)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB. Alpha is dropped (as the release's ``[:, :, :3]``),
    16-bit and float greyscale are rescaled rather than clipped."""
    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif mode == "I":  # 32-bit integer greyscale; PNG 16-bit data lands here in some Pillow versions
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        img = img.convert("RGB")  # drops alpha, keeping the stored colour
    return img.convert("RGB") if img.mode != "RGB" else img


def read_input(path, what: str) -> bytes:
    """The bytes of a user's input file, with one clear error for what is not a readable regular
    file (missing, a folder, a pipe or device, which could block or never end, no permission)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise NulltextError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise NulltextError(f"expected {'an' if what[0] in 'aeiou' else 'a'} {what} file, got a directory: {path}")
    if not os.path.isfile(path):
        raise NulltextError(f"{what} {path} is not a regular file (a pipe, socket or device)")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise NulltextError(f"cannot read {what} {path} ({e.strerror or e.__class__.__name__})") from None


@contextmanager
def _pillow_errors(path: str, what: str):
    """Pillow's errors while opening or decoding ``path`` as one-line messages (a decompression
    bomb, a format it does not know, damaged data)."""
    try:
        yield
    except Image.DecompressionBombError:
        raise NulltextError(f"{what} {path} is too large to open safely (over {2 * Image.MAX_IMAGE_PIXELS} pixels, "
                            f"Pillow's decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise NulltextError(f"cannot read {path} as an image (not an image format Pillow knows)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise NulltextError(f"cannot read {path} as an image ({e.__class__.__name__}: {e})") from None


def load_image(path) -> ImageSource:
    """Open an image file as RGB, with a clear error for anything that is not a usable image."""
    path = os.fspath(path)
    data = read_input(path, "image")
    if not data:
        raise NulltextError(f"image file is empty: {path}")
    with _pillow_errors(path, "image"):
        img = Image.open(io.BytesIO(data))
        frames, fmt = getattr(img, "n_frames", 1), img.format
        img = ImageOps.exif_transpose(img)  # phone photos stored sideways come out upright
        img.load()
        mode = img.mode
        rgb = to_rgb(img)
    if min(rgb.size) < MIN_SIDE:
        raise NulltextError(f"image {path} is {rgb.size[0]}x{rgb.size[1]} pixels; "
                            f"nulltext needs at least {MIN_SIDE} pixels on each side")
    if frames > 1 and fmt != "MPO":  # (MPO: a phone photo with its depth map or gain map, not frames)
        warnings.warn(f"{os.path.basename(path)} has {frames} frames; nulltext inverts the first",
                      NulltextWarning, stacklevel=2)
    return ImageSource(rgb, hashlib.sha256(data).hexdigest(), os.path.basename(path), mode)


def probe(path, what: str = "image") -> tuple[int, int]:
    """The (width, height) an image file will have upright, from its header, without decoding its
    pixels: the checks :func:`load_image` makes that need no decoding (a readable file of a format
    Pillow knows, not a decompression bomb, at least ``MIN_SIDE`` a side), with the same messages.
    A file whose pixel data is damaged passes and fails when it is decoded, once, later."""
    path = os.fspath(path)
    data = read_input(path, what)
    if not data:
        raise NulltextError(f"{what} file is empty: {path}")
    with _pillow_errors(path, what), Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations stored sideways
            w, h = h, w
    if what == "image" and min(w, h) < MIN_SIDE:
        raise NulltextError(f"image {path} is {w}x{h} pixels; nulltext needs at least {MIN_SIDE} pixels on each side")
    return w, h


def as_source(image) -> ImageSource:
    """Accept a path, a PIL image or an :class:`ImageSource`."""
    if isinstance(image, ImageSource):
        return image
    if isinstance(image, Image.Image):
        return ImageSource.from_pil(image)
    return load_image(image)


def cropped_size(image_size: tuple[int, int], crop=(0, 0, 0, 0)) -> tuple[int, int]:
    """(width, height) left of an image of ``image_size`` after cutting ``crop`` = (left, right,
    top, bottom) pixels; an error when nothing is left."""
    left, right, top, bottom = crop
    w, h = image_size[0] - left - right, image_size[1] - top - bottom
    if w <= 0 or h <= 0:
        raise NulltextError(f"crop {left},{right},{top},{bottom} leaves nothing of a {image_size[0]}x{image_size[1]} image")
    return w, h


def output_size(size, image_size: tuple[int, int], crop=(0, 0, 0, 0), native: tuple[int, int] = (512, 512),
                multiple: int = 8) -> tuple[int, int]:
    """(width, height) an image is inverted at. ``size``: None (the model's ``native`` size, the
    release's square), (W, H), or one number N: the long side N and the short side following the
    aspect of the cropped image, both rounded to ``multiple`` (at least one multiple)."""
    if size is None:
        return tuple(native)
    if not isinstance(size, int):
        return int(size[0]), int(size[1])
    w, h = cropped_size(image_size, crop)

    def snap(x: float) -> int:
        return max(multiple, int(math.floor(x / multiple + 0.5)) * multiple)

    long, short = snap(size), snap(size * min(w, h) / max(w, h))
    out = (long, short) if w >= h else (short, long)
    if long != size:  # the user's number changed (the short side follows the aspect: no news)
        # stacklevel 1: one place, so the default filter shows it once, however many callers and images
        warnings.warn(f"size {size} is not a multiple of {multiple} pixels, as this model needs: the long side is "
                      f"{long} ({out[0]}x{out[1]})", NulltextWarning, stacklevel=1)
    return out


def preprocess(img: Image.Image, size: tuple[int, int], crop=(0, 0, 0, 0), multiple: int = 8,
               resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Cut ``crop`` = (left, right, top, bottom) pixels, centre-crop to the aspect of ``size`` and
    resize to ``size`` = (width, height) with bicubic filtering (Pillow's default for RGB, which the
    release uses; masks pass ``resample=NEAREST``). For a square size this is exactly the release's
    ``load_512``."""
    width, height = size
    if width % multiple or height % multiple:
        raise NulltextError(f"size {width}x{height} must be a multiple of {multiple} pixels for this model")
    left, right, top, bottom = crop
    w, h = img.size
    cropped_size(img.size, crop)
    img = img.crop((left, top, w - right, h - bottom))
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise NulltextError(f"crop {left},{right},{top},{bottom} leaves {w}x{h} pixels; "
                            f"at least {MIN_SIDE} on each side are needed")
    # centre crop to the target aspect; for a square target: offset = (long - short) // 2
    if w * height > h * width:  # too wide
        new_w = h * width // height
        offset = (w - new_w) // 2
        img = img.crop((offset, 0, offset + new_w, h))
    elif w * height < h * width:  # too tall
        new_h = w * height // width
        offset = (h - new_h) // 2
        img = img.crop((0, offset, w, offset + new_h))
    if min(img.size) < 1:
        raise NulltextError("the crop leaves an empty image")
    return img.resize((width, height), resample)


def pil_to_tensor(img: Image.Image) -> Tensor:
    """RGB uint8 -> (1, 3, H, W) float32 in [-1, 1] (x / 127.5 - 1, as the release)."""
    arr = torch.from_numpy(np.array(img, dtype=np.uint8)).float() / 127.5 - 1
    return arr.permute(2, 0, 1).unsqueeze(0)


def tensor_to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images; like the release: clamp, *255, truncate to uint8."""
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    arr = (x.cpu().permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def _vae_run(pipe, fn, x: Tensor, what: str) -> Tensor:
    """``fn(x)`` on the VAE in its dtype; where a half-precision VAE overflows (NaN or infinity:
    the SDXL VAE in fp16 is known to), the VAE moves to float32 for good, with a warning, and
    runs again, as diffusers' pipelines upcast it. A float32 overflow is an error."""
    out = fn(x.to(pipe.device, pipe.vae.dtype))
    if bool(torch.isfinite(out).all()):
        return out
    if pipe.vae.dtype != torch.float32:
        warnings.warn(f"the VAE overflowed in {pipe.dtype_name} while {what}; it now runs in float32",
                      NulltextWarning, stacklevel=3)
        pipe.vae.to(torch.float32)
        out = fn(x.to(pipe.device, torch.float32))
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"the VAE produced a NaN or infinity while {what}")
    return out


@torch.no_grad()
def encode(pipe, img: Image.Image) -> Tensor:
    """z0 = s * (mean(E(x)) - shift): the VAE posterior mean (not a sample), shifted and scaled as
    the model's family says (SD: scale only)."""
    scale, shift = pipe.latent_scale_shift
    mean = _vae_run(pipe, lambda x: pipe.vae.encode(x).latent_dist.mean, pil_to_tensor(img), "encoding the image")
    z = mean.float() if not shift else mean.float() - shift  # no shift: exactly s * mean, bit for bit
    return z * scale  # (1, C, H/8, W/8)


@torch.no_grad()
def decode(pipe, z: Tensor) -> list[Image.Image]:
    scale, shift = pipe.latent_scale_shift
    z = z / scale if not shift else z / scale + shift
    x = _vae_run(pipe, lambda z: pipe.vae.decode(z).sample, z, "decoding")
    return tensor_to_pil(x)


def _mask_gray(img: Image.Image) -> Image.Image:
    """One channel; where the image has transparency, transparent pixels are black (kept)."""
    gray = img.convert("L")
    if "A" in img.getbands() or "transparency" in img.info:
        alpha = np.asarray(img.convert("RGBA"))[..., 3]
        gray = Image.fromarray(np.where(alpha >= 128, np.asarray(gray), 0).astype(np.uint8), mode="L")
    return gray


def read_mask(path) -> Image.Image:
    """A mask file as a one-channel image, with a clear error for a missing, unreadable or
    all-black one."""
    path = os.fspath(path)
    data = read_input(path, "mask")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            out = _mask_gray(img)
    except Image.DecompressionBombError:
        raise NulltextError(f"mask {path} is too large to open safely") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise NulltextError(f"cannot read the mask {path} as an image ({e.__class__.__name__})") from None
    if not (np.asarray(out) >= 128).any():
        raise NulltextError(f"the mask {path} has no white (editable) pixels: the edit could change nothing")
    return out


def load_mask(mask, size: tuple[int, int], original_size: tuple[int, int] | None = None,
              crop=(0, 0, 0, 0)) -> Tensor:
    """A user's edit mask as an (H, W) boolean tensor at the inverted image's ``size`` (width,
    height): True (white, values >= 128) where the edit may change the image. ``mask``: a path, a
    PIL image, or an (H, W) array or tensor (numbers in [0, 1] or [0, 255], or booleans). It must
    have the inverted size, or the original photo's (``original_size``), in which case it is cut and
    resized as the photo was (``crop``, centre crop, nearest-neighbour resize)."""
    if isinstance(mask, (str, os.PathLike)):
        mask = read_mask(mask)
    if isinstance(mask, Image.Image):
        img = _mask_gray(mask)
    else:
        arr = np.asarray(mask.detach().cpu() if isinstance(mask, Tensor) else mask)
        if arr.ndim != 2:
            raise NulltextError(f"a mask must be one channel (H, W), got shape {arr.shape}")
        if arr.dtype == bool or (arr.size and float(arr.max()) <= 1.0):
            arr = arr.astype(np.float64) * 255
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    width, height = size
    if original_size is not None and tuple(img.size) == tuple(original_size):
        # drawn on the photo (also when the photo has the inverted size: a crop still applies)
        img = preprocess(img, (width, height), crop, multiple=1, resample=Image.Resampling.NEAREST)
    elif img.size != (width, height):
        expected = f"{width}x{height} (the inverted size)"
        if original_size is not None:
            expected += f" or {original_size[0]}x{original_size[1]} (the photo's)"
        raise NulltextError(f"the mask is {img.size[0]}x{img.size[1]} pixels; it must be {expected}")
    out = torch.from_numpy(np.asarray(img) >= 128)
    if not out.any():
        raise NulltextError("the mask has no white (editable) pixels: the edit could change nothing")
    return out


def latent_mask(mask: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """(1, 1, h, w) boolean: a latent cell is editable where any of its pixels is."""
    m = F.interpolate(mask[None, None].float(), size=tuple(latent_hw), mode="area")
    return m > 0


def composite(edited: Image.Image, source: Image.Image, mask: Tensor) -> Image.Image:
    """``edited`` where ``mask`` (H, W) is True, ``source`` elsewhere, pixel for pixel."""
    keep = mask.cpu().numpy()[..., None]
    return Image.fromarray(np.where(keep, np.asarray(edited), np.asarray(source)))


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB between two same-size 8-bit RGB images."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)

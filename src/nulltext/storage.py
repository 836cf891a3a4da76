"""The :class:`Inversion` (an inverted image) and its files: safetensors tensors plus JSON
metadata in the safetensors header. Never pickle.

Layout (format version 3; versions 1 and 2 still load):
- tensors ``latent_T`` (1, 4, h, w) float32 and ``null_embeddings`` (T, L, d) float32 (SDXL: L + 1
  rows, the last the pooled embedding, see ``Pipeline.embedding_shape``), or (1, L, d)
  for the methods with one embedding for all steps (global-nti, npi, ddim, direct); ``corrections``
  (T, 4, h, w) float32 for Direct Inversion only;
- one header metadata key ``nulltext``: JSON ``{"format": "nulltext-inversion", "format_version",
  "meta": {model, family, prediction type, model fingerprint, scheduler, T, guidance, prompt,
  image sha256, preprocessing,
  config, method, optimisation diagnostics, timings}, "tensors_sha256": {name: sha256 of bytes}}``.
Loading checks all of it, and with a pipeline also that the file fits that model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import InversionConfig, SchedulerConfig
from .errors import NulltextError, one_line
from .files import atomic_write

FORMAT = "nulltext-inversion"
# 2: methods, shared (1, L, d) null embeddings, Direct Inversion corrections; 3: model families
# (family, prediction type, the checkpoint's scheduler, SDXL's packed conditioning), size N
FORMAT_VERSION = 3
REQUIRED_META = ("model", "model_fingerprint", "scheduler", "num_steps", "guidance_scale", "prompt",
                 "image", "preprocessing", "config", "method")


@dataclass
class Inversion:
    """An inverted image: the noise latent z_T and one null-text embedding per timestep.

    ``meta`` holds everything needed to check that the inversion fits the model, image and
    settings it is used with (see :func:`load_inversion`).
    """

    latent_T: Tensor  # (1, 4, h, w) float32
    null_embeddings: Tensor  # (T, L, d) float32 per step, or (1, L, d) shared by all steps
    prompt: str
    config: InversionConfig
    meta: dict = field(default_factory=dict)
    corrections: Tensor | None = None  # (T, 4, h, w): Direct Inversion's source-branch corrections

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    @property
    def method(self) -> str:
        return self.config.method

    def step_nulls(self, device=None) -> Tensor:
        """The unconditional embedding of every step, (T, 1, L, d) (a view when shared)."""
        nulls = self.null_embeddings.to(device) if device is not None else self.null_embeddings
        if nulls.shape[0] == 1:
            nulls = nulls.expand(self.num_steps, -1, -1)
        return nulls[:, None]

    def step_corrections(self, device=None) -> Tensor | None:
        """(T, 1, C, h, w) corrections of the source branch, or None."""
        if self.corrections is None:
            return None
        return (self.corrections.to(device) if device is not None else self.corrections)[:, None]

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the preprocessed image in pixels."""
        w, h = self.meta["preprocessing"]["size"]
        return int(w), int(h)

    def save(self, path, force: bool = False, reproducible: bool = False) -> None:
        """Write a .safetensors file (atomically; refuses to overwrite unless ``force``)."""
        save_inversion(self, path, force=force, reproducible=reproducible)

    @classmethod
    def load(cls, path, pipe=None) -> "Inversion":
        """Load and validate a file; with ``pipe``, also check it fits that model."""
        return load_inversion(path, pipe=pipe)


def _sha256(t: Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def _tensors(inv: Inversion) -> dict[str, Tensor]:
    tensors = {"latent_T": inv.latent_T.detach().float().cpu().contiguous(),
               "null_embeddings": inv.null_embeddings.detach().float().cpu().contiguous()}
    if inv.corrections is not None:
        tensors["corrections"] = inv.corrections.detach().float().cpu().contiguous()
    return tensors


# what differs between two runs on the same inputs: left out of reproducible files
RUN_SPECIFIC = ("timings",)


def save_inversion(inv: Inversion, path, force: bool = False, reproducible: bool = False) -> str:
    """Write ``inv`` atomically. ``reproducible`` leaves out wall-clock timings, so the same inputs
    on the same machine give a byte-identical file."""
    from safetensors.torch import save_file

    tensors = _tensors(inv)
    meta = dict(inv.meta, prompt=inv.prompt, config=inv.config.to_dict(), format_version=FORMAT_VERSION)
    if reproducible:
        for key in RUN_SPECIFIC:
            meta.pop(key, None)
    # One header key: safetensors does not keep the order of several, and files must be reproducible.
    header = {"nulltext": json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta,
                                      "tensors_sha256": {k: _sha256(v) for k, v in tensors.items()}},
                                     sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header), force=force)


def _config_from_dict(d: dict) -> InversionConfig:
    d = dict(d)
    d["scheduler"] = SchedulerConfig(**d["scheduler"])
    d["crop"] = tuple(d["crop"])
    d["size"] = tuple(d["size"]) if isinstance(d.get("size"), list) else d.get("size")
    return InversionConfig(**d)


# far above what nulltext writes (SDXL at 1024 px, 50 steps: about 32 MiB; metadata:
# tens of kB), far below what could exhaust a machine
MAX_FILE_BYTES = 1 << 30
MAX_META_CHARS = 1 << 22


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:  # NaN is a number here: a timestep without iterations has a NaN first loss
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _damaged(path: str, field: str) -> NulltextError:
    return NulltextError(f"{path} has damaged metadata ({field})")


def _check_meta(path: str, meta: dict) -> None:
    """The metadata fields nulltext reads have the types it writes (a file's header is user input)."""
    for key in ("model", "prompt", "method"):
        if not isinstance(meta[key], str):
            raise _damaged(path, key)
    if not _is_int(meta["num_steps"]) or not 1 <= meta["num_steps"] <= 10000:
        raise _damaged(path, "num_steps")
    if isinstance(meta["guidance_scale"], bool) or not isinstance(meta["guidance_scale"], (int, float)):
        raise _damaged(path, "guidance_scale")
    for key in ("model_fingerprint", "scheduler", "image", "preprocessing", "config"):
        if not isinstance(meta[key], dict):
            raise _damaged(path, key)
    if not isinstance(meta.get("family", ""), str):
        raise _damaged(path, "family")
    fp = meta["model_fingerprint"]
    if not all(isinstance(fp.get(k, ""), str) for k in ("config_sha256", "weights_sample_sha256")) or not (
            isinstance(fp.get("weights_mean_square", []), list) and all(_is_number(v) for v in fp.get("weights_mean_square", []))):
        raise _damaged(path, "model_fingerprint")
    pre = meta["preprocessing"]
    size, crop = pre.get("size"), pre.get("crop", [0, 0, 0, 0])
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and 0 < v <= 1 << 16 for v in size)):
        raise _damaged(path, "preprocessing size")
    if not (isinstance(crop, list) and len(crop) == 4 and all(_is_int(v) and v >= 0 for v in crop)):
        raise _damaged(path, "preprocessing crop")


def _check_info(path: str, meta: dict) -> None:
    """What ``nulltext info`` shows has the types nulltext writes, or the file is refused as damaged."""
    T = meta["num_steps"]
    for key in ("family", "prediction_type", "dtype", "device"):
        if key in meta and not isinstance(meta[key], str):
            raise _damaged(path, key)
    if "batch_size" in meta and (not _is_int(meta["batch_size"]) or meta["batch_size"] < 1):
        raise _damaged(path, "batch_size")
    image = meta["image"]
    if not all(isinstance(image.get(k, ""), str) for k in ("name", "sha256", "original_mode")) or not (
            isinstance(image.get("original_size", []), list) and all(_is_int(v) for v in image.get("original_size", []))):
        raise _damaged(path, "image")
    timings = meta.get("timings", {})
    if not isinstance(timings, dict) or not all(_is_number(v) for v in timings.values()):
        raise _damaged(path, "timings")
    opt = meta.get("optimisation", {})
    if not isinstance(opt, dict):
        raise _damaged(path, "optimisation")
    for key, value in opt.items():
        if key not in ("iterations", "retries", "lrs", "losses_first", "losses_last", "losses_after", "loss_scales",
                       "diverged_steps"):
            continue  # what this version does not read (a later version's field) is left alone
        if key == "diverged_steps":
            ok = isinstance(value, list) and all(_is_int(v) and 0 <= v < T for v in value)
        elif key == "iterations" or key == "retries":
            ok = isinstance(value, list) and len(value) == T and all(_is_int(v) and v >= 0 for v in value)
        else:
            ok = isinstance(value, list) and len(value) == T and all(_is_number(v) for v in value)
            if key == "loss_scales":
                ok = ok and all(0 < v < math.inf for v in value)
        if not ok:
            raise _damaged(path, f"optimisation {key}")
    if "iterations" in opt:
        missing = [k for k in ("lrs", "losses_first", "losses_last", "losses_after") if k not in opt]
        if missing:
            raise _damaged(path, f"optimisation lacks {', '.join(missing)}")


def load_inversion(path, pipe=None) -> Inversion:
    """Read and validate an inversion file. With ``pipe``, also check it fits that model."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise NulltextError(f"inversion file not found: {path}")
    if not os.path.isfile(path):
        raise NulltextError(f"{path} is not an inversion file (a directory, pipe or device)")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise NulltextError(f"{path} is {size / 2**20:.0f} MiB, larger than any inversion file "
                            f"(at most {MAX_FILE_BYTES // 2**20} MiB); it is not one")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as e:
        raise NulltextError(f"cannot read {path} ({e.strerror or e.__class__.__name__})") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # truncated, not safetensors: safetensors' errors (a Rust panic is a BaseException)
        raise NulltextError(f"{path} is not a readable inversion file (damaged or not safetensors: "
                            f"{one_line(e)})") from None
    if "nulltext" not in header:
        raise NulltextError(f"{path} has no nulltext metadata; it was not written by nulltext invert")
    if len(header["nulltext"]) > MAX_META_CHARS:
        raise NulltextError(f"{path} has {len(header['nulltext'])} characters of metadata, more than nulltext "
                            f"writes (at most {MAX_META_CHARS}); it was altered")
    try:
        doc = json.loads(header["nulltext"])
        version, meta, sums = int(doc["format_version"]), doc["meta"], doc["tensors_sha256"]
        if doc["format"] != FORMAT or not isinstance(meta, dict) or not isinstance(sums, dict):
            raise ValueError
    except (ValueError, TypeError, KeyError, RecursionError, OverflowError):
        raise NulltextError(f"{path} has damaged or foreign nulltext metadata") from None
    if version < 1:
        raise NulltextError(f"{path} has an invalid format version {version}")
    if version > FORMAT_VERSION:
        raise NulltextError(f"{path} uses inversion format {version}; this nulltext reads up to "
                            f"{FORMAT_VERSION}: upgrade nulltext")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise NulltextError(f"{path} lacks metadata {', '.join(missing)}; it cannot be checked or used")
    for name in ("latent_T", "null_embeddings", "corrections"):
        if name not in tensors:
            if name == "corrections":
                continue
            raise NulltextError(f"{path} lacks the tensor {name!r}")
        if tensors[name].dtype != torch.float32:
            raise NulltextError(f"{path}: tensor {name} is {tensors[name].dtype}, expected float32")
        if sums.get(name) != _sha256(tensors[name]):
            raise NulltextError(f"{path}: tensor {name} does not match its checksum; the file was altered or damaged")
        if not bool(torch.isfinite(tensors[name]).all()):
            raise NulltextError(f"{path}: tensor {name} holds NaN or infinite values; the inversion is unusable")
    latent, nulls = tensors["latent_T"], tensors["null_embeddings"]
    extra = sorted(set(tensors) - {"latent_T", "null_embeddings", "corrections"})
    if extra:
        raise NulltextError(f"{path} holds tensors nulltext does not know: {', '.join(extra)}")
    _check_meta(path, meta)
    T = meta["num_steps"]
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise NulltextError(f"{path}: latent_T has shape {tuple(latent.shape)}, expected (1, C, h, w)")
    if nulls.ndim != 3 or nulls.shape[0] not in (T, 1):
        raise NulltextError(f"{path}: null_embeddings has shape {tuple(nulls.shape)}, expected ({T}, L, d) "
                            f"or (1, L, d)")
    corrections = tensors.get("corrections")
    if (meta.get("method") == "direct") != (corrections is not None):
        raise NulltextError(f"{path}: method {meta.get('method')!r} "
                            f"{'needs' if meta.get('method') == 'direct' else 'has no'} correction tensors")
    if corrections is not None and tuple(corrections.shape) != (T, *latent.shape[1:]):
        raise NulltextError(f"{path}: corrections has shape {tuple(corrections.shape)}, expected "
                            f"({T}, {', '.join(map(str, latent.shape[1:]))})")
    try:
        config = _config_from_dict(meta["config"])
    except (TypeError, KeyError, ValueError, AttributeError, NulltextError) as e:
        raise NulltextError(f"{path} has an invalid inversion config ({one_line(e)})") from None
    if config.method != meta.get("method") or config.num_steps != T or \
            config.guidance_scale != meta.get("guidance_scale"):
        raise NulltextError(f"{path} has inconsistent metadata (method, steps or guidance)")
    per_step = config.method in ("nti", "random-pivot")
    if nulls.shape[0] != (T if per_step else 1) and not (T == 1):
        raise NulltextError(f"{path}: method {config.method!r} stores {'one null embedding per step' if per_step else 'one null embedding'}, "
                            f"but null_embeddings has shape {tuple(nulls.shape)}")
    _check_info(path, meta)
    inv = Inversion(latent_T=latent, null_embeddings=nulls, prompt=meta["prompt"], config=config, meta=meta,
                    corrections=corrections)
    if pipe is not None:
        check_fits(inv, pipe, path)
    return inv


def check_fits(inv: Inversion, pipe, path="inversion") -> None:
    """Refuse an inversion made with another model (or whose shapes this model cannot take)."""
    from .fingerprint import fingerprints_match

    family = inv.meta.get("family", "stable-diffusion")  # files from before families were recorded: SD
    if family != pipe.family:
        raise NulltextError(f"{path} was made with a {family} model; '{pipe.model_id}' is {pipe.family}: "
                            f"pass the model it was made with via --model")
    same, why = fingerprints_match(inv.meta["model_fingerprint"], pipe.fingerprint)
    if not same:
        raise NulltextError(f"{path} was made with model '{inv.meta['model']}', which does not match "
                            f"'{pipe.model_id}' ({why}); pass the model it was made with via --model")
    _, c, h, w = inv.latent_T.shape
    width, height = inv.image_size
    f = pipe.vae_scale_factor
    if c != pipe.latent_channels or (h * f, w * f) != (height, width):
        raise NulltextError(f"{path}: latent_T shape {tuple(inv.latent_T.shape)} does not fit this model "
                            f"at {width}x{height} pixels")
    L, d = inv.null_embeddings.shape[1:]
    if (L, d) != pipe.embedding_shape:
        raise NulltextError(f"{path}: null embeddings are {L}x{d}, this model's text embeddings are "
                            f"{pipe.embedding_shape[0]}x{pipe.embedding_shape[1]}")
    if dict(inv.meta["scheduler"]) != {k: v for k, v in pipe.scheduler_config.items() if k in inv.meta["scheduler"]}:
        raise NulltextError(f"{path} was made with another scheduler configuration than this pipeline's")
